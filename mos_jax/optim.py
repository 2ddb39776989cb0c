"""Optimisation: clipped SGD with weight decay, and NT-ASGD iterate averaging.

The update of SPEC.md section 3 is `p -= lr_t * (clip(g) + wd * p)`: an Optax chain of
global-norm clipping and `add_decayed_weights` (after clipping), scaled by the step's
learning rate. The learning rate is an argument of `apply_updates`, a traced value in
the jitted step, so a per-step `lr * seq_len / bptt` never recompiles.

NT-ASGD averaging follows Optax's shape: `averaging_init(params)` and
`averaging_update(state, params)` are pure functions over pytrees. The switch is a
boolean in the state (so switching does not recompile), turned on by `should_switch`,
the non-monotone trigger checked on the host after each epoch's validation.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

Params = Any


def sgd_transform(clip: float, weight_decay: float) -> optax.GradientTransformation:
    """`g -> clip_by_global_norm(g) + weight_decay * params` (no lr, no sign)."""
    parts = []
    if clip and clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    return optax.chain(*parts)


def apply_updates(params: Params, updates: Params, lr: jax.Array | float) -> Params:
    """`params - lr * updates`, leaf by leaf."""
    return jax.tree_util.tree_map(lambda p, u: p - lr * u.astype(p.dtype), params, updates)


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
    unlike torch's ASGD, whose mean starts at the second; SPEC.md section 3).
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
    """The non-monotone trigger of SPEC.md section 3 (also finetune's stop rule).

    `previous` holds the validation losses of the epochs logged before this one;
    `current` is this epoch's. True when more than `nonmono` epochs are logged and
    `current` exceeds the minimum over all but the last `nonmono` of them. (The
    reference appends `current` to the log after this check.)
    """
    return len(previous) > nonmono and current > min(previous[:-nonmono])
