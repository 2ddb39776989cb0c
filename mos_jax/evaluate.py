"""Evaluation: per-token log-probabilities with carried state, and perplexity.

The stream is batchified (SPEC.md section 1) and scored in windows of `bptt` rows with
no dropout, the carry passed from window to window starting from zeros. Every window,
the last (shorter) one included, is padded to `bptt` rows so one program serves all.
Perplexity is `exp` of the true per-token mean NLL (the reference divides by rows
instead, SPEC.md section 3; mos-jax does not).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np

from mos_jax import model as model_lib
from mos_jax.batching import batchify, eval_windows, padded_window
from mos_jax.model import ModelConfig, Params


def score_window(config: ModelConfig, params: Params, carry, inputs, targets, length):
    """Target log-probabilities [T, B] of one window, no dropout, and the new carry."""
    # Any weights do (only the log-probabilities are used); with them, heads that can
    # score in the fused loss's row tiles do (`mos_jax.fused`).
    weights = model_lib.token_weights(targets.shape, length, mean=False)
    out = model_lib.apply(config, params, inputs, carry, targets, length=length,
                          target_weights=weights)
    return out.target_logprobs, out.carry


_score_window = jax.jit(score_window, static_argnums=0, donate_argnums=2)


def token_logprobs(model_config: ModelConfig, params: Params, ids: np.ndarray,
                   batch_size: int, bptt: int,
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Log-probability of every target, shape `[nrows - 1, batch_size]`.

    Row r, column j is log p(rows[r+1, j] | rows[:r+1, j]) in the batchified layout of
    `ids` (`nrows = len(ids) // batch_size`). `progress(done_rows, total_rows)` is called
    after each window when given.
    """
    rows = batchify(ids, batch_size)
    total = len(rows) - 1
    carry = model_lib.init_carry(model_config, batch_size)
    pieces = []
    for start, length in eval_windows(len(rows), bptt):
        inputs, targets, length = padded_window(rows, start, length, bptt)
        logp, carry = _score_window(model_config, params, carry, inputs, targets, length)
        pieces.append((logp, length))
        if progress is not None:
            progress(start + length, total)
    out = np.concatenate([np.asarray(logp)[:length] for logp, length in pieces])
    assert out.shape == (total, batch_size)
    return out


def perplexity(model_config: ModelConfig, params: Params, ids: np.ndarray,
               batch_size: int = 10, bptt: int = 70) -> float:
    """`exp` of the mean negative log-probability over all scored tokens."""
    logp = token_logprobs(model_config, params, ids, batch_size, bptt)
    return math.exp(-float(np.mean(logp, dtype=np.float64)))
