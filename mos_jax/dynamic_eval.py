"""Dynamic evaluation (Krause et al., 2018), functional and jitted (docs/reference.md section 4).

Two pure functions:

- `gradient_statistics`: over the training stream (batchified with 100 columns, windows
  of 5 rows, carry passed along, no dropout), the sum of squared gradients of each
  window's mean NLL, `MS = sqrt(sum g^2)` (or `sqrt(mean g^2)` for the RMS variant),
  and `decrate = MS / sum_over_tensors(mean(MS))` clipped element-wise at `1/lambda`.
- `dynamic_evaluate`: over the evaluation stream, each window is scored with the
  current parameters, then every parameter moves as
  `theta += lambda * decrate * (theta0 - theta) - lr * grad / (MS + epsilon)`.

Both run as `lax.scan` over windows in fixed-size chunks (one compiled program for the
whole stream; the Python loop, `mos_jax.evaluate.scan_windows`, is per chunk, for
progress output, not per window). The last window of a stream that is not a multiple
of the window length is scored and counted at its true length; padding windows never
update anything. Both take a placement plan (`mos_jax.parallel`): the statistics pass
splits its columns over the plan's devices; the update pass (one stream updated in
sequence) runs on one of them.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax import model as model_lib
from mos_jax import parallel
from mos_jax.batching import make_windows
from mos_jax.evaluate import scan_windows
from mos_jax.errors import ConfigError
from mos_jax.model import ModelConfig, Params

PRESETS = {  # docs/reference.md sections 4 and 5
    "default": dict(lr=0.002, lamb=0.02, epsilon=0.001),
    "ptb": dict(lr=0.002, lamb=0.075, epsilon=0.001),
    "wt2": dict(lr=0.002, lamb=0.02, epsilon=0.002),
}
CHUNK = 128  # windows per compiled scan call


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


@functools.lru_cache(maxsize=16)
def statistics_chunk(plan: parallel.Plan, config: ModelConfig):
    """`stats_scan` mapped by `plan`: `(params, sq_sum, carry, inputs [C, T, B],
    targets, lengths [C]) -> (sq_sum, carry)`, `sq_sum` and the carry donated. On one
    device a `jax.jit` function (`.lower(...)` compiles ahead of time)."""
    return plan.map(functools.partial(stats_scan, config, axis_name=plan.axis_name),
                    in_axes=(None, None, 0, 2, 2, None), out_axes=(parallel.Like(1), 0),
                    donate_argnums=(1, 2))


class GradientStatistics(NamedTuple):
    ms: Params  # sqrt of the summed (or mean) squared gradients, like params
    decrate: Params  # MS / sum_over_tensors(mean(MS)), clipped at 1 / lamb
    windows: int  # windows the statistics came from


def _require_carry(model_config: ModelConfig) -> None:
    """Dynamic evaluation adapts along a stream scored in short windows with the
    carry passed on; an encoder without carry would see 5-token contexts."""
    if not model_config.encoder_cls.stateful:
        raise ConfigError(
            f"dynamic evaluation is not supported for the {model_config.encoder} encoder "
            "yet: it scores the stream in short windows and relies on a carry between "
            "them. Use mos-jax evaluate (sliding windows) for this model.")


def gradient_statistics(model_config: ModelConfig, params: Params, train_ids: np.ndarray,
                        *, lamb: float = 0.02, batch_size: int = 100, bptt: int = 5,
                        max_batches: int | None = None, rms: bool = False,
                        progress: Callable[[int, int], None] | None = None,
                        plan: parallel.Plan | None = None,
                        log: Callable[[str], None] | None = None) -> GradientStatistics:
    """The gradient statistics pass of docs/reference.md section 4, step 1.

    `max_batches` caps the number of windows; `rms` takes `sqrt(mean g^2)` over the
    windows instead of `sqrt(sum g^2)`. `progress(done_windows, total)` is called
    once each chunk has finished (not when it is dispatched). With a `plan` over several devices the columns split over them: each
    window's gradient is the `pmean` of the devices' gradients (the gradient of the
    whole window's mean NLL), then squared and summed as on one device. A batch that
    does not split runs on one device, with a note to `log`.
    """
    _require_carry(model_config)
    if lamb <= 0:
        raise ConfigError(f"lamb must be positive (decrate is clipped at 1/lamb), got {lamb}")
    plan = parallel.resolve(plan)
    plan = plan.for_batch(batch_size, log, (
        f"gradient statistics with batch size {batch_size} do not split over "
        f"{plan.columns_over()}: they run on one device"))
    w = make_windows(train_ids, batch_size, bptt, max_batches, multiple=CHUNK,
                     columns=plan.host_slice(batch_size))
    n_real = int((w.lengths > 0).sum())
    params = plan.place_params(params)
    # zeros made where each leaf lives (no split parameter gathered to build them)
    sq_sum = jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), params)
    chunk = statistics_chunk(plan, model_config)

    def fn(state, inputs, targets, lengths):
        return chunk(params, *state, inputs, targets, lengths), None

    (sq_sum, _), _ = scan_windows(
        fn, (sq_sum, plan.place_carry(model_lib.init_carry(model_config, batch_size))),
        w, per_call=CHUNK, progress=progress)
    sq_sum = plan.local_copy(sq_sum)
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


def update_scan(config: ModelConfig, params, carry, theta0, decay, step, inputs, targets,
                lengths):
    """Score and update over a chunk of windows: `(params, carry, logprobs [C, T, B])`.

    `decay = lamb * decrate`, `step = lr / (MS + epsilon)`, precomputed per tensor
    (`update_coefficients`).
    """
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


@functools.lru_cache(maxsize=16)
def update_chunk(plan: parallel.Plan, config: ModelConfig):
    """`update_scan` on the first device of `plan`, `params` and the carry donated.
    A `jax.jit` function (`.lower(...)` compiles ahead of time)."""
    return plan.one_device().map(functools.partial(update_scan, config),
                                 in_axes=(None, 0, None, None, None, 2, 2, None),
                                 out_axes=(None, 0, 2), donate_argnums=(0, 1))


@jax.jit
def update_coefficients(ms, decrate, lr, lamb, epsilon):
    """`(lamb * decrate, lr / (MS + epsilon))`, per tensor."""
    decay = jax.tree_util.tree_map(lambda d: lamb * d, decrate)
    step = jax.tree_util.tree_map(lambda m: lr / (m + epsilon), ms)
    return decay, step


def update_pass_note(plan: parallel.Plan, batch_size: int) -> str | None:
    """What the update pass runs on, when the plan has several devices."""
    if plan.n_devices == 1:
        return None
    return (f"dynamic evaluation (batch {batch_size}) updates the weights after every "
            f"window, one stream in sequence: it runs on one device, not the "
            f"{plan.n_devices} available")


def dynamic_evaluate(model_config: ModelConfig, params: Params, ms: Params,
                     decrate: Params, ids: np.ndarray, *, lr: float = 0.002,
                     lamb: float = 0.02, epsilon: float = 0.001, bptt: int = 5,
                     batch_size: int = 1,
                     progress: Callable[[int, int], None] | None = None,
                     plan: parallel.Plan | None = None,
                     log: Callable[[str], None] | None = None) -> DynamicEvalResult:
    """Score `ids` with dynamic evaluation (docs/reference.md section 4, steps 2 and 3).

    Runs on the first device of `plan` (a note to `log` when it has more).
    `progress(done_windows, total)` is called once each chunk has finished.
    """
    _require_carry(model_config)
    plan = parallel.resolve(plan)
    plan = plan.one_device(update_pass_note(plan, batch_size), log)
    w = make_windows(ids, batch_size, bptt, multiple=CHUNK)
    params = plan.place_params(params)
    decay, step = update_coefficients(ms, decrate, lr, lamb, epsilon)
    theta0 = params
    params = jax.tree_util.tree_map(jnp.copy, params)  # donated below; keep theta0
    chunk = update_chunk(plan, model_config)

    def fn(state, inputs, targets, lengths):
        params, carry, logp = chunk(*state, theta0, decay, step, inputs, targets, lengths)
        return (params, carry), logp

    carry = plan.place_carry(model_lib.init_carry(model_config, batch_size))
    (params, _), logp = scan_windows(fn, (params, carry),
                                     w, per_call=CHUNK, progress=progress)
    nll = -float(np.mean(logp, dtype=np.float64))
    return DynamicEvalResult(logp, nll, math.exp(nll), params)
