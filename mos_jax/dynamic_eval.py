"""Dynamic evaluation (Krause et al., 2018), functional and jitted (SPEC.md section 4).

Two pure functions:

- `gradient_statistics`: over the training stream (batchified with 100 columns, windows
  of 5 rows, carry passed along, no dropout), the sum of squared gradients of each
  window's mean NLL, `MS = sqrt(sum g^2)` (or `sqrt(mean g^2)` for the RMS variant),
  and `decrate = MS / sum_over_tensors(mean(MS))` clipped element-wise at `1/lambda`.
- `dynamic_evaluate`: over the evaluation stream, each window is scored with the
  current parameters, then every parameter moves as
  `theta += lambda * decrate * (theta0 - theta) - lr * grad / (MS + epsilon)`.

Both run as `lax.scan` over windows in fixed-size chunks (one compiled program for the
whole stream; the Python loop is per chunk, for progress output, not per window). The
last window of a stream that is not a multiple of the window length is scored and
counted at its true length; padding windows never update anything.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax import model as model_lib
from mos_jax.batching import batchify
from mos_jax.errors import ConfigError
from mos_jax.model import ModelConfig, Params

PRESETS = {  # SPEC.md sections 4 and 5
    "default": dict(lr=0.002, lamb=0.02, epsilon=0.001),
    "ptb": dict(lr=0.002, lamb=0.075, epsilon=0.001),
    "wt2": dict(lr=0.002, lamb=0.02, epsilon=0.002),
}
CHUNK = 128  # windows per compiled scan call


class Windows(NamedTuple):
    """A stream cut into windows: inputs/targets [n, bptt, B], true lengths [n]."""

    inputs: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray


def make_windows(ids: np.ndarray, batch_size: int, bptt: int,
                 max_windows: int | None = None) -> Windows:
    """Batchify `ids` and cut the rows into consecutive windows of `bptt` rows.

    Every target is covered once; the last window holds what is left (its length
    recorded), padded with zeros. The number of windows is rounded up to a multiple of
    `CHUNK` with empty (length 0) windows.
    """
    rows = batchify(ids, batch_size)
    n_targets = len(rows) - 1
    n = -(-n_targets // bptt)
    if max_windows:
        n = min(n, max_windows)
    n_padded = -(-n // CHUNK) * CHUNK
    total = n_padded * bptt
    inputs = np.zeros((total, batch_size), np.int32)
    targets = np.zeros((total, batch_size), np.int32)
    used = min(n * bptt, n_targets)
    inputs[:used] = rows[:used]
    targets[:used] = rows[1:used + 1]
    lengths = np.zeros(n_padded, np.int32)
    lengths[:n] = bptt
    lengths[n - 1] = used - (n - 1) * bptt
    shape = (n_padded, bptt, batch_size)
    return Windows(inputs.reshape(shape), targets.reshape(shape), lengths)


def _window_loss(config: ModelConfig, params, inputs, targets, carry, length):
    """Mean NLL over the window's real tokens; aux: target log-probs and new carry."""
    weights = model_lib.token_weights(targets.shape, length)
    out = model_lib.apply(config, params, inputs, carry, targets, length=length,
                          target_weights=weights)
    # out.nll: fused with its gradients by heads that can (`mos_jax.fused`)
    return out.nll, (out.target_logprobs, out.carry)


def _keep_if(valid, new, old):
    return jax.tree_util.tree_map(lambda n, o: jnp.where(valid, n, o), new, old)


def stats_scan(config: ModelConfig, params, sq_sum, carry, inputs, targets, lengths,
               axis_name: str | None = None):
    """Add the squared window gradients of a chunk of windows to `sq_sum`.

    With `axis_name` (the body of a data-parallel map, `mos_jax.parallel`), each device
    holds some of the columns and the window's gradient is their mean over the axis.
    """
    def body(state, window):
        sq_sum, carry = state
        inp, tgt, length = window
        grads, (_, new_carry) = jax.grad(_window_loss, argnums=1, has_aux=True)(
            config, params, inp, tgt, carry, length)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        valid = length > 0
        sq_sum = jax.tree_util.tree_map(lambda s, g: s + jnp.where(valid, g * g, 0.0),
                                        sq_sum, grads)
        return (sq_sum, _keep_if(valid, new_carry, carry)), None

    (sq_sum, carry), _ = jax.lax.scan(body, (sq_sum, carry), (inputs, targets, lengths))
    return sq_sum, carry


_stats_chunk = jax.jit(stats_scan, static_argnums=0, static_argnames="axis_name",
                       donate_argnums=(2, 3))


class GradientStatistics(NamedTuple):
    ms: Params  # sqrt of the summed (or mean) squared gradients, like params
    decrate: Params  # MS / sum_over_tensors(mean(MS)), clipped at 1 / lamb
    windows: int  # windows the statistics came from


def gradient_statistics(model_config: ModelConfig, params: Params, train_ids: np.ndarray,
                        *, lamb: float = 0.02, batch_size: int = 100, bptt: int = 5,
                        max_batches: int | None = None, rms: bool = False,
                        progress: Callable[[int, int], None] | None = None
                        ) -> GradientStatistics:
    """The gradient statistics pass of SPEC.md section 4, step 1.

    `max_batches` caps the number of windows; `rms` takes `sqrt(mean g^2)` over the
    windows instead of `sqrt(sum g^2)`. `progress(done_windows, total)` is called per
    chunk.
    """
    if lamb <= 0:
        raise ConfigError(f"lamb must be positive (decrate is clipped at 1/lamb), got {lamb}")
    w = make_windows(train_ids, batch_size, bptt, max_batches)
    n_real = int((w.lengths > 0).sum())
    sq_sum = jax.tree_util.tree_map(jnp.zeros_like, params)
    carry = model_lib.init_carry(model_config, batch_size)
    for start in range(0, len(w.lengths), CHUNK):
        sl = slice(start, start + CHUNK)
        sq_sum, carry = _stats_chunk(model_config, params, sq_sum, carry,
                                     w.inputs[sl], w.targets[sl], w.lengths[sl])
        if progress is not None:
            progress(min(start + CHUNK, n_real), n_real)
    divisor = float(n_real if rms else 1)
    ms = jax.tree_util.tree_map(lambda s: jnp.sqrt(s / divisor), sq_sum)
    return GradientStatistics(ms, decay_rates(ms, lamb), n_real)


@jax.jit
def decay_rates(ms: Params, lamb) -> Params:
    """`decrate = MS / sum_over_tensors(mean(MS))`, clipped element-wise at 1/lamb."""
    gsum = sum(jnp.mean(m) for m in jax.tree_util.tree_leaves(ms))
    return jax.tree_util.tree_map(lambda m: jnp.minimum(m / gsum, 1.0 / lamb), ms)


def save_statistics(path, stats: GradientStatistics) -> None:
    """MS (decrate is recomputed from it for any lambda) and the window count."""
    from mos_jax.data import atomic_write_bytes
    import io
    leaves = jax.tree_util.tree_leaves(stats.ms)
    buf = io.BytesIO()
    np.savez(buf, windows=stats.windows, **{f"ms_{i}": np.asarray(x) for i, x in enumerate(leaves)})
    atomic_write_bytes(path, buf.getvalue())


def load_statistics(path, params: Params, lamb: float) -> GradientStatistics:
    """Read what `save_statistics` wrote, shaped like `params`."""
    if not lamb > 0:  # as gradient_statistics: a cached file changes nothing
        raise ConfigError(f"lamb must be positive (decrate is clipped at 1/lamb), got {lamb}")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    with np.load(path) as z:
        ms_leaves = [jnp.asarray(z[f"ms_{i}"]) for i in range(len(leaves))]
        windows = int(z["windows"])
    ms = jax.tree_util.tree_unflatten(treedef, ms_leaves)
    return GradientStatistics(ms, decay_rates(ms, lamb), windows)


class DynamicEvalResult(NamedTuple):
    token_logprobs: np.ndarray  # [nrows - 1, B], scored before each update
    nll: float  # per-token mean
    perplexity: float
    params: Params  # the parameters after the last update


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _dyn_chunk(config: ModelConfig, params, carry, theta0, decay, step, inputs, targets,
               lengths):
    """`decay = lamb * decrate`, `step = lr / (MS + epsilon)`, precomputed per tensor."""
    def body(state, window):
        params, carry = state
        inp, tgt, length = window
        grads, (logp, new_carry) = jax.grad(_window_loss, argnums=1, has_aux=True)(
            config, params, inp, tgt, carry, length)
        updated = jax.tree_util.tree_map(
            lambda p, p0, d, s, g: p + d * (p0 - p) - s * g,
            params, theta0, decay, step, grads)
        valid = length > 0
        return (_keep_if(valid, updated, params), _keep_if(valid, new_carry, carry)), logp

    (params, carry), logp = jax.lax.scan(body, (params, carry), (inputs, targets, lengths))
    return params, carry, logp


@jax.jit
def _update_coefficients(ms, decrate, lr, lamb, epsilon):
    decay = jax.tree_util.tree_map(lambda d: lamb * d, decrate)
    step = jax.tree_util.tree_map(lambda m: lr / (m + epsilon), ms)
    return decay, step


def dynamic_evaluate(model_config: ModelConfig, params: Params, ms: Params,
                     decrate: Params, ids: np.ndarray, *, lr: float = 0.002,
                     lamb: float = 0.02, epsilon: float = 0.001, bptt: int = 5,
                     batch_size: int = 1,
                     progress: Callable[[int, int], None] | None = None
                     ) -> DynamicEvalResult:
    """Score `ids` with dynamic evaluation (SPEC.md section 4, steps 2 and 3)."""
    w = make_windows(ids, batch_size, bptt)
    n_real = int((w.lengths > 0).sum())
    decay, step = _update_coefficients(ms, decrate, lr, lamb, epsilon)
    theta0 = params
    params = jax.tree_util.tree_map(jnp.copy, params)  # donated below; keep theta0
    carry = model_lib.init_carry(model_config, batch_size)
    pieces = []
    for start in range(0, len(w.lengths), CHUNK):
        sl = slice(start, start + CHUNK)
        params, carry, logp = _dyn_chunk(model_config, params, carry, theta0, decay, step,
                                         w.inputs[sl], w.targets[sl], w.lengths[sl])
        pieces.append(logp)
        if progress is not None:
            progress(min(start + CHUNK, n_real), n_real)
    logp = np.concatenate([np.asarray(p) for p in pieces])  # [n, bptt, B]
    n_targets = len(ids) // batch_size - 1
    logp = logp.reshape(-1, batch_size)[:n_targets]
    nll = -float(np.mean(logp, dtype=np.float64))
    return DynamicEvalResult(logp, nll, math.exp(nll), params)
