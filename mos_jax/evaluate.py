"""Evaluation: per-token log-probabilities with carried state, and perplexity.

The stream is batchified (docs/reference.md section 1) and scored in windows of `bptt` rows with
no dropout, the carry passed from window to window starting from zeros. Every window,
the last (shorter) one included, is padded to `bptt` rows so one program serves all.
Perplexity is `exp` of the true per-token mean NLL (the reference divides by rows
instead, docs/reference.md section 3; mos-jax does not).

`scan_windows` is the one loop over the windows of a stream with the carry passed on;
evaluation, rank and both passes of dynamic evaluation run on it. Every function here
takes a placement plan (`mos_jax.parallel`; default: one device): the columns split
over the plan's devices.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import numpy as np

from mos_jax import model as model_lib
from mos_jax import parallel
from mos_jax.batching import Windows, make_windows, sliding_windows
from mos_jax.model import ModelConfig, Params


def scan_windows(fn: Callable, carry: Any, windows: Windows, *, per_call: int = 0,
                 fetch: Callable = np.asarray, sync: bool = False,
                 progress: Callable[[int, int], None] | None = None):
    """Run `fn` over `windows` in order, the carry passed from each call to the next.

    `fn(carry, inputs, targets, lengths) -> (carry, out)`. With `per_call` 0 each call
    gets one window (`inputs`, `targets` `[T, B]`, `lengths` an int) and `out` is
    `[T, ...]`; with `per_call` k, k windows at once (`[k, T, B]`, lengths `[k]`, `out`
    `[k, T, ...]`: a compiled scan over them). The carry is any pytree (the model's,
    or that and parameters or sums being updated).

    Returns `(carry, rows)`: `rows` the real rows of every window's `out` (its first
    `length` rows), in order, `fetch`ed to the host, or None when `fn` returns
    None. Outputs are fetched after the last call, or after each with `sync` (large
    outputs).

    `progress(done_windows, real_windows)` reports finished work, never dispatched
    work: a call is reported once its results are ready. Calls that return an `out`
    are reported when the next call has been dispatched (one call in flight, so the
    device does not wait on the host); calls that return none (their carry is
    donated to the next call) are waited on before the next is dispatched. The last
    report comes after the last call has finished. Without `progress` nothing waits.
    """
    lengths = np.asarray(windows.lengths)
    n_real = int((lengths > 0).sum())
    step = per_call or 1
    stop = len(lengths) if per_call else n_real
    pieces = []
    due = None  # (out, done) of the last call dispatched but not reported yet

    def keep(out, sl):
        if out is None:
            return None
        if per_call:
            out = fetch(out)
            real = [out[k, :n] for k, n in enumerate(lengths[sl]) if n]
            return np.concatenate(real) if real else None
        return fetch(out)[:int(lengths[sl])]

    def report(ready, done):
        jax.block_until_ready(ready)
        progress(done, n_real)

    for start in range(0, stop, step):
        sl = slice(start, start + per_call) if per_call else start
        length = lengths[sl] if per_call else int(lengths[sl])
        carry, out = fn(carry, windows.inputs[sl], windows.targets[sl], length)
        pieces.append(keep(out, sl) if sync else (out, sl))
        if progress is None:
            continue
        if due is not None:  # the previous call, now that this one is queued
            report(*due)
            due = None
        done = min(start + step, n_real)
        if out is None or sync:  # the carry goes to the next call; or out is fetched
            report(carry if out is None else out, done)
        else:
            due = (out, done)
    if due is not None:
        report(*due)
    if not sync:
        pieces = [keep(out, sl) for out, sl in pieces]
    pieces = [p for p in pieces if p is not None]
    return carry, (np.concatenate(pieces) if pieces else None)


def score_window(config: ModelConfig, params: Params, carry, inputs, targets, length):
    """Target log-probabilities [T, B] of one window, no dropout, and the new carry."""
    # Any weights do (only the log-probabilities are used); with them, heads that can
    # score in the fused loss's row tiles do (`mos_jax.fused`).
    weights = model_lib.token_weights(targets.shape, length, mean=False)
    out = model_lib.apply(config, params, inputs, carry, targets, length=length,
                          target_weights=weights)
    return out.target_logprobs, out.carry


@functools.lru_cache(maxsize=32)
def window_scorer(plan: parallel.Plan, config: ModelConfig):
    """`score_window` mapped by `plan`: `(params, carry, inputs [T, B], targets,
    length) -> (logprobs [T, B], carry)`, the carry donated; one program per shape.
    On one device a `jax.jit` function (`.lower(...)` compiles ahead of time)."""
    return plan.map(functools.partial(score_window, config), in_axes=(None, 0, 1, 1, None),
                    out_axes=(1, 0), donate_argnums=1)


def token_logprobs(model_config: ModelConfig, params: Params, ids: np.ndarray,
                   batch_size: int, bptt: int,
                   progress: Callable[[int, int], None] | None = None, *,
                   plan: parallel.Plan | None = None,
                   log: Callable[[str], None] | None = None) -> np.ndarray:
    """Log-probability of every target, shape `[nrows - 1, batch_size]`.

    Row r, column j is log p(rows[r+1, j] | rows[:r+1, j]) in the batchified layout of
    `ids` (`nrows = len(ids) // batch_size`). `progress(done_rows, total_rows)` is called
    when given, once each window's result is ready. With a `plan` over several devices the columns split
    over them (the same result, on every process); a batch that does not split (batch
    1, say) is scored on one device, with a note to `log`.

    An encoder without carry (the Transformer) is scored in sliding windows of `bptt`
    tokens with stride `model_config.eval_stride` (0: bptt // 2), in the same layout
    (`sliding_token_logprobs`).
    """
    if not model_config.encoder_cls.stateful:  # no carry: overlapping windows
        return sliding_token_logprobs(
            model_config, params, ids, batch_size, bptt,
            model_config.eval_stride or max(bptt // 2, 1), progress, plan=plan, log=log)
    plan = parallel.resolve(plan).for_batch(batch_size, log)
    w = make_windows(ids, batch_size, bptt, columns=plan.host_slice(batch_size))
    total = int(w.lengths.sum())
    params = plan.place_params(params)
    score = window_scorer(plan, model_config)

    def fn(carry, inputs, targets, length):
        logp, carry = score(params, carry, inputs, targets, length)
        return carry, logp

    rows = None if progress is None else (
        lambda done, n: progress(min(done * bptt, total), total))
    carry = plan.place_carry(model_lib.init_carry(model_config, batch_size))
    _, out = scan_windows(fn, carry, w, fetch=lambda x: plan.fetch(x, 1), progress=rows)
    out = plan.gather_columns(out)
    assert out.shape == (total, batch_size), out.shape
    return out


def sliding_token_logprobs(model_config: ModelConfig, params: Params, ids: np.ndarray,
                           batch_size: int, context: int, stride: int,
                           progress: Callable[[int, int], None] | None = None, *,
                           plan: parallel.Plan | None = None,
                           log: Callable[[str], None] | None = None) -> np.ndarray:
    """`token_logprobs`' layout `[nrows - 1, batch_size]` from overlapping windows.

    Windows of `context` tokens, one every `stride` (`mos_jax.batching.sliding_windows`):
    every target is scored exactly once, each (beyond the first window) with at least
    `context - stride` tokens of context. The encoder's carry (if any) restarts from
    zeros in every window. One program serves all windows.
    """
    plan = parallel.resolve(plan).for_batch(batch_size, log)
    w = sliding_windows(ids, batch_size, context, stride, plan.host_slice(batch_size))
    params = plan.place_params(params)
    score = window_scorer(plan, model_config)
    total = int(len(ids) // batch_size - 1)
    pieces = []
    for k, (length, first) in enumerate(zip(w.lengths, w.first)):
        zero = model_lib.init_carry(model_config, batch_size)  # a new one: donated
        logp, _ = score(params, plan.place_carry(zero),
                        w.inputs[k], w.targets[k], int(length))
        pieces.append((logp, int(first), int(length)))
        if progress is not None:
            progress(min(k * stride + int(length), total), total)
    out = np.concatenate([plan.fetch(x, 1)[a:b] for x, a, b in pieces])
    out = plan.gather_columns(out)
    assert out.shape == (total, batch_size), out.shape
    return out


def word_perplexity(nll: float, tokens: int, words: int) -> float:
    """Perplexity per word of a text of `words` words (as the word tokenizer counts
    them, `<eos>` included) that a subword model scores at a mean NLL of `nll` per
    piece, the text being `tokens` pieces: exp(nll * tokens / words)."""
    return math.exp(nll * tokens / words)


def perplexity(model_config: ModelConfig, params: Params, ids: np.ndarray,
               batch_size: int = 10, bptt: int = 70, *,
               plan: parallel.Plan | None = None) -> float:
    """`exp` of the mean negative log-probability over all scored tokens."""
    logp = token_logprobs(model_config, params, ids, batch_size, bptt, plan=plan)
    return math.exp(-float(np.mean(logp, dtype=np.float64)))
