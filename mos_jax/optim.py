"""Optimisation: one Optax transformation whose state holds everything it needs.

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
cosine decay) is a multiplier of the learning rate, `Optimizer.lr_multiplier(count)`
(an optimiser may be registered with its own: `Optimizer.schedule`), applied by the
last transformation (`scale_by_learning_rate`) at the count of updates its own state
holds (`LearningRateState`); without one (the default) that state is empty and the
step is exactly as before. `Optimizer.learning_rate(state, lr)` reads
from a state the learning rate its last update applied (what the progress line shows).

Adding one: write a function `Optimizer -> list of transformations` (what comes between
clipping and the learning rate), decorate it with `@register("name")` (with
`schedule=` for a schedule of its own), and add a field plus a config line for any new
hyperparameter.

NT-ASGD averaging is a wrapper of the whole transformation, `nt_asgd(tx)`
(`Optimizer.transform(averaging=True)`, what the train step uses): its state
(`AveragedState`) holds the optimiser's own state and an `AveragingState` (the on/off
switch, the number of averaged iterates, their running mean), folded in after every
update. `eval_params(state, params)` gives the weights to evaluate, `switch_on(state)`
turns averaging on (a boolean in the state: switching does not recompile), by
`should_switch`, the non-monotone trigger checked on the host after each epoch's
validation. `state_tree` / `state_from_tree` lay the state out for a checkpoint.
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
    # The schedule, a multiplier of the learning rate per update (`lr_multiplier`):
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

    @property
    def schedule(self) -> Callable[[jax.Array], jax.Array] | None:
        """The multiplier of the learning rate per update (`count -> factor`), or None:
        the optimiser's own when it was registered with one, else `lr_multiplier`
        when the schedule keys ask for one."""
        own = SCHEDULES.get(self.name)
        if own is not None:
            return own(self)
        return self.lr_multiplier if self.has_schedule else None

    def lr_multiplier(self, step: jax.Array) -> jax.Array:
        """The schedule's factor at update `step` (0-based, traced): float32.

        `min(1, (step + 1) / warmup_steps)` during warm-up, then over `decay_steps`
        a cosine from 1 down to `min_lr_ratio`, where it stays. 1 without a schedule.
        `scale_by_learning_rate` multiplies the learning rate by it at the count its
        state holds, so changing step never recompiles.
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

    def transform(self, averaging: bool = False) -> optax.GradientTransformationExtraArgs:
        """The whole chain; its `update` takes `learning_rate=` (the step's lr).
        `averaging`: wrapped in NT-ASGD averaging (`nt_asgd`), as the train step runs
        it."""
        parts = [optax.clip_by_global_norm(self.clip)] if self.clip and self.clip > 0 else []
        tx = optax.chain(*parts, *OPTIMIZERS[self.name](self),
                         scale_by_learning_rate(self.schedule))
        return nt_asgd(tx) if averaging else tx

    def learning_rate(self, state, lr: jax.Array | float) -> jax.Array:
        """The learning rate that the last update of `state` (this optimiser's state,
        averaged or not) applied, `lr` being the `learning_rate` it was given: `lr`
        times the schedule at that update (its `LearningRateState` counts the updates);
        `lr` itself without a schedule."""
        counter = _find(state, LearningRateState)
        if counter is None:
            return jnp.asarray(lr, jnp.float32)
        return lr * self.schedule(counter.count - 1)


def from_config(optim_config) -> Optimizer:
    """The `Optimizer` of a config's `optim` section (keys it lacks keep their default,
    so configs written before a key existed still load)."""
    keys = {f.name for f in dataclasses.fields(Optimizer)}
    return Optimizer(**{k: optim_config[k] for k in keys if k in optim_config})


OPTIMIZERS: dict[str, Callable[[Optimizer], Transforms]] = {}
# The optimisers registered with a schedule of their own: `schedule(optimizer)`.
SCHEDULES: dict[str, Callable[[Optimizer], Callable[[jax.Array], jax.Array]]] = {}


def register(name: str, schedule: Callable | None = None):
    """Decorator: `fn(optimizer) -> [transformations between clipping and the lr]`.
    `schedule`: the optimiser's own schedule, `schedule(optimizer) -> (count ->
    multiplier of the learning rate)`, in place of the schedule keys' warm-up and
    cosine; the learning-rate transformation counts the updates for it."""
    def add(fn):
        OPTIMIZERS[name] = fn
        if schedule is not None:
            SCHEDULES[name] = schedule
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


class LearningRateState(NamedTuple):
    """`scale_by_learning_rate`'s state with a schedule: the updates taken."""

    count: jax.Array  # int32 scalar


def scale_by_learning_rate(schedule: Callable[[jax.Array], jax.Array] | None = None
                           ) -> optax.GradientTransformationExtraArgs:
    """`u -> -(lr * u)`, `lr` the learning rate given to each `update` call
    (`update(updates, state, params, learning_rate=lr)`, so it may be traced), times
    `schedule(count)` when there is a schedule, `count` the updates taken before this
    one (held in the state, `LearningRateState`; without a schedule the state is
    empty).

    Not optax's `scale_by_schedule` + `scale_by_learning_rate`, nor `inject_hyperparams`:
    here the learning rate is an argument of each update (the window-length rescaling
    `lr * seq_len / bptt`), which the schedule multiplies before it scales the update,
    as the step did before the schedule moved into the state (the same rounding)."""

    def init(params):
        del params
        if schedule is None:
            return optax.EmptyState()
        return LearningRateState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, *, learning_rate, **extra):
        del params, extra
        if schedule is not None:
            learning_rate = learning_rate * schedule(state.count)
            state = LearningRateState(optax.safe_increment(state.count))
        return jax.tree_util.tree_map(lambda u: -(learning_rate * u), updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def _find(state, kind):
    """The first node of type `kind` in the pytree `state` (None when it has none)."""
    nodes = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, kind))
    return next((x for x in nodes if isinstance(x, kind)), None)


# ------------------------------------------------------------------ NT-ASGD averaging

class AveragingState(NamedTuple):
    """NT-ASGD's part of the state: on/off, number of averaged iterates, their mean."""

    active: jax.Array  # bool scalar
    count: jax.Array  # int32 scalar
    average: Params


class AveragedState(NamedTuple):
    """`nt_asgd(tx)`'s state: `tx`'s own, and the averaging of its iterates."""

    inner: Any
    averaging: AveragingState


def nt_asgd(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`tx` with NT-ASGD iterate averaging: the updates are `tx`'s; after each one the
    new iterate `params + updates` goes into the running mean while averaging is on.

    Averaging starts off (`switch_on` turns it on, from the next iterate). When on,
    after k updates the average is the mean of the k iterates produced since the
    switch (the first one included, unlike torch's ASGD, whose mean starts at the
    second; docs/reference.md section 3); while off, it is left as it is.
    """
    tx = optax.with_extra_args_support(tx)

    def init(params):
        return AveragedState(tx.init(params), AveragingState(
            jnp.asarray(False), jnp.zeros((), jnp.int32),
            jax.tree_util.tree_map(jnp.copy, params)))

    def update(updates, state, params=None, **extra):
        updates, inner = tx.update(updates, state.inner, params, **extra)
        new_params = optax.apply_updates(params, updates)
        avg = state.averaging
        count = avg.count + avg.active.astype(jnp.int32)
        weight = jnp.where(avg.active, 1.0 / jnp.maximum(count, 1), 0.0)
        average = jax.tree_util.tree_map(lambda a, p: a + weight * (p - a),
                                         avg.average, new_params)
        return updates, AveragedState(inner, AveragingState(avg.active, count, average))

    return optax.GradientTransformationExtraArgs(init, update)


def _is_averaging(x) -> bool:
    return isinstance(x, AveragingState)


def switch_on(state):
    """`state` (an `nt_asgd` state) with averaging on from the next iterate (count 0)."""
    return jax.tree_util.tree_map(
        lambda x: x._replace(active=jnp.asarray(True), count=jnp.zeros((), jnp.int32))
        if _is_averaging(x) else x, state, is_leaf=_is_averaging)


def eval_params(state, params: Params) -> Params:
    """The weights to evaluate and save, from an optimiser state and the current
    `params`: the average once averaging is on and has taken a step, else `params`
    (also for a state without averaging). On the host (reads the switch)."""
    avg = _find(state, AveragingState)
    if avg is not None and bool(avg.active) and int(avg.count) > 0:
        return avg.average
    return params


def state_tree(state) -> dict:
    """An `nt_asgd` state laid out for a checkpoint: `averaging` (a dict of its
    fields) and, when it has any, `opt_state`, the list of the optimiser's own leaves
    (plain SGD has none: its checkpoints are laid out as before optimisers had state)."""
    tree = {"averaging": state.averaging._asdict()}
    leaves = jax.tree_util.tree_leaves(state.inner)
    if leaves:
        tree["opt_state"] = leaves
    return tree


def state_from_tree(tx: optax.GradientTransformation, params: Params, tree: dict):
    """The `nt_asgd` state `state_tree` laid out (its keys in `tree`), its structure
    that of `tx.init(params)` (`tx` an `nt_asgd` transformation)."""
    shape = jax.eval_shape(tx.init, params)
    inner = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape.inner),
                                         tree.get("opt_state", []))
    return AveragedState(inner, AveragingState(**tree["averaging"]))


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
