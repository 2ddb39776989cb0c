"""Optimisation: one Optax transformation with state, and NT-ASGD iterate averaging.

The optimiser is one `optax.GradientTransformationExtraArgs`, built from the config's
`optim` section by `Optimizer.transform()`:

    clip_by_global_norm(clip) -> the named optimiser's part -> -learning_rate * u

and the train step applies it with `optax.apply_updates`. The learning rate is the
update's `learning_rate` keyword argument, a traced value in the jitted step, so a
per-step `lr * seq_len / bptt` never recompiles. The state (`tx.init(params)`) is part
of the train state and of every checkpoint; plain SGD's is empty.

Optimisers (`optim.name`), each a few lines in `OPTIMIZERS`:

- `sgd` (the paper's, docs/reference.md section 3): `p -= lr_t * (clip(g) + wdecay * p)`;
- `momentum`: the same L2 term, then a momentum trace (`optim.momentum`, `optim.nesterov`);
- `adam`: the L2 term added to the clipped gradient, then Adam (`b1`, `b2`, `eps`),
  as torch's `Adam(weight_decay=...)`;
- `adamw`: Adam on the clipped gradient, then decoupled decay: `u = adam(g) + wdecay * p`.

A schedule (`warmup_steps`, `decay_steps`, `min_lr_ratio`: linear warm-up, then a
cosine decay) is a per-step multiplier of the learning rate, `lr_multiplier(step)`,
computed in the train step from the traced step count; without one (the default)
the step is exactly as before.

Adding one: write a function `Optimizer -> list of transformations` (what comes between
clipping and the learning rate), decorate it with `@register("name")`, and add a
field plus a config line for any new hyperparameter.

NT-ASGD averaging follows Optax's shape: `averaging_init(params)` and
`averaging_update(state, params)` are pure functions over pytrees. The switch is a
boolean in the state (so switching does not recompile), turned on by `should_switch`,
the non-monotone trigger checked on the host after each epoch's validation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from mos_jax.errors import ConfigError

Params = Any
Transforms = list  # of optax.GradientTransformation


# ------------------------------------------------------------------- the optimiser

@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The config's `optim` optimiser keys (the field names are the keys): hashable, so
    that a train step built for it can be cached."""

    name: str = "sgd"
    clip: float = 0.25  # global-norm clipping of the gradient; 0: none
    wdecay: float = 0.0  # weight decay (L2 for sgd, momentum, adam; decoupled for adamw)
    momentum: float = 0.9  # momentum: the trace's decay
    nesterov: bool = False  # momentum: Nesterov's variant
    b1: float = 0.9  # adam, adamw
    b2: float = 0.999
    eps: float = 1e-8
    # The schedule, a per-step multiplier of the learning rate (`lr_multiplier`):
    warmup_steps: int = 0  # linear warm-up over the first steps; 0: none
    decay_steps: int = 0  # cosine decay over these steps after warm-up; 0: none
    min_lr_ratio: float = 0.0  # the multiplier at the end of the decay (and after it)

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimiser optim.name={self.name!r}: use one of "
                              f"{', '.join(sorted(OPTIMIZERS))}")
        for key in ("momentum", "b1", "b2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"optim.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps must be positive, got {self.eps}")
        for key in ("warmup_steps", "decay_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key} must be >= 0 (0: none), got "
                                  f"{getattr(self, key)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got "
                              f"{self.min_lr_ratio}")

    @property
    def has_schedule(self) -> bool:
        return bool(self.warmup_steps or self.decay_steps)

    def lr_multiplier(self, step: jax.Array) -> jax.Array:
        """The schedule's factor at optimiser step `step` (0-based, traced): float32.

        `min(1, (step + 1) / warmup_steps)` during warm-up, then over `decay_steps`
        a cosine from 1 down to `min_lr_ratio`, where it stays. 1 without a schedule.
        The train step multiplies its learning rate by it, so changing step never
        recompiles.
        """
        step = jnp.asarray(step, jnp.float32)
        factor = jnp.ones((), jnp.float32)
        if self.warmup_steps:
            factor = jnp.minimum(1.0, (step + 1.0) / self.warmup_steps)
        if self.decay_steps:
            done = jnp.clip((step - self.warmup_steps) / self.decay_steps, 0.0, 1.0)
            cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * done))
            factor = factor * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
        return factor

    def transform(self) -> optax.GradientTransformationExtraArgs:
        """The whole chain; its `update` takes `learning_rate=` (the step's lr)."""
        parts = [optax.clip_by_global_norm(self.clip)] if self.clip and self.clip > 0 else []
        return optax.chain(*parts, *OPTIMIZERS[self.name](self), scale_by_learning_rate())


def from_config(optim_config) -> Optimizer:
    """The `Optimizer` of a config's `optim` section (keys it lacks keep their default,
    so configs written before a key existed still load)."""
    keys = {f.name for f in dataclasses.fields(Optimizer)}
    return Optimizer(**{k: optim_config[k] for k in keys if k in optim_config})


OPTIMIZERS: dict[str, Callable[[Optimizer], Transforms]] = {}


def register(name: str):
    """Decorator: `fn(optimizer) -> [transformations between clipping and the lr]`."""
    def add(fn):
        OPTIMIZERS[name] = fn
        return fn
    return add


def _decay(wdecay: float) -> Transforms:
    return [optax.add_decayed_weights(wdecay)] if wdecay else []


@register("sgd")
def _sgd(o: Optimizer) -> Transforms:
    return _decay(o.wdecay)


@register("momentum")
def _momentum(o: Optimizer) -> Transforms:
    return [*_decay(o.wdecay), optax.trace(decay=o.momentum, nesterov=o.nesterov)]


@register("adam")
def _adam(o: Optimizer) -> Transforms:
    return [*_decay(o.wdecay), optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps)]


@register("adamw")
def _adamw(o: Optimizer) -> Transforms:
    return [optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps), *_decay(o.wdecay)]


def scale_by_learning_rate() -> optax.GradientTransformationExtraArgs:
    """`u -> -(learning_rate * u)`, the learning rate given to each `update` call
    (`update(updates, state, params, learning_rate=lr)`), so it may be traced."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, learning_rate, **extra):
        del params, extra
        return jax.tree_util.tree_map(lambda u: -(learning_rate * u), updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def sgd_transform(clip: float, weight_decay: float) -> optax.GradientTransformation:
    """`g -> clip_by_global_norm(g) + weight_decay * params` (no lr, no sign): SGD's
    chain without its learning rate, for `apply_updates`."""
    parts = []
    if clip and clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    return optax.chain(*parts)


def apply_updates(params: Params, updates: Params, lr: jax.Array | float) -> Params:
    """`params - lr * updates`, leaf by leaf (for `sgd_transform`'s updates)."""
    return jax.tree_util.tree_map(lambda p, u: p - lr * u.astype(p.dtype), params, updates)


# ------------------------------------------------------------------ NT-ASGD averaging

class AveragingState(NamedTuple):
    """NT-ASGD state: on/off, number of averaged iterates, their running mean."""

    active: jax.Array  # bool scalar
    count: jax.Array  # int32 scalar
    average: Params


def averaging_init(params: Params, active: bool = False) -> AveragingState:
    return AveragingState(jnp.asarray(active), jnp.zeros((), jnp.int32),
                          jax.tree_util.tree_map(jnp.copy, params))


def averaging_update(state: AveragingState, params: Params) -> AveragingState:
    """Fold the iterate `params` (after an optimiser step) into the running mean.

    While inactive, the state is unchanged. When active, after k steps the average is
    the mean of the k iterates produced since the switch (the first one included,
    unlike torch's ASGD, whose mean starts at the second; docs/reference.md section 3).
    """
    count = state.count + state.active.astype(jnp.int32)
    weight = jnp.where(state.active, 1.0 / jnp.maximum(count, 1), 0.0)
    average = jax.tree_util.tree_map(lambda a, p: a + weight * (p - a),
                                     state.average, params)
    return AveragingState(state.active, count, average)


def switch_on(state: AveragingState) -> AveragingState:
    """Start averaging from the next iterate (count 0)."""
    return AveragingState(jnp.asarray(True), jnp.zeros((), jnp.int32), state.average)


def eval_params(state: AveragingState, params: Params) -> Params:
    """The weights to evaluate and save: the average once averaging has taken a step."""
    if bool(state.active) and int(state.count) > 0:
        return state.average
    return params


def should_switch(previous: Sequence[float], current: float, nonmono: int) -> bool:
    """The non-monotone trigger of docs/reference.md section 3 (also finetune's stop rule).

    `previous` holds the validation losses of the epochs logged before this one;
    `current` is this epoch's. True when more than `nonmono` epochs are logged and
    `current` exceeds the minimum over all but the last `nonmono` of them. (The
    reference appends `current` to the log after this check.)
    """
    return len(previous) > nonmono and current > min(previous[:-nonmono])


def stopped_improving(history: Sequence[float], min_improvement: float,
                      patience: int = 1) -> bool:
    """Early stopping on validation: `history` holds the validation losses (mean NLL,
    nats) of every epoch so far, this one last. True when the best perplexity of the
    last `patience` epochs is less than `min_improvement` (relative, per epoch) below
    the best before them: exp(best_before - best_now) < (1 + min_improvement)^patience.
    Never before `patience + 1` epochs, never when `min_improvement` is 0."""
    if min_improvement <= 0 or len(history) <= patience:
        return False
    before = min(history[:-patience])
    now = min(before, min(history[-patience:]))
    return before - now < patience * math.log1p(min_improvement)
