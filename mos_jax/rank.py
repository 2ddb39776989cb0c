"""The empirical rank of a model's log-probability matrix (the softmax bottleneck).

Yang et al. (ICLR 2018) frame language modelling as matrix factorisation: over N
contexts, the model's log-probabilities form an `[N, V]` matrix. A softmax head with
hidden size d computes `H W^T + 1 b^T - lse 1^T` (context vectors H [N, d], tied decoder
W [V, d], bias b [V], log-normaliser lse [N]), so its rank is at most d + 2, and d + 1
while the decoder bias is zero (it starts at zero). The paper, which folds the bias
into the hidden size, states the bound as d + 1. A mixture of softmaxes is a nonlinear
function of those matrices, so its rank can be as high as min(N, V).

`logprob_matrix` computes that matrix for a trained model over the first N positions
of a token stream; `empirical_rank` counts its singular values above a round-off
threshold.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from mos_jax import model as model_lib
from mos_jax import parallel
from mos_jax.batching import cut_windows
from mos_jax.evaluate import scan_windows
from mos_jax.errors import MosJaxError
from mos_jax.heads import get_head
from mos_jax.model import ModelConfig, Params


def window_logprobs(config: ModelConfig, params: Params, carry, inputs, length):
    """Full log-probabilities [T, B, V] of one padded window, and the carry after it."""
    out = model_lib.apply(config, params, inputs, carry, None, length=length,
                          return_logprobs=True)
    return out.logprobs, out.carry


@functools.lru_cache(maxsize=8)
def _window_fn(plan: parallel.Plan, config: ModelConfig):
    return plan.map(functools.partial(window_logprobs, config), in_axes=(None, 0, 1, None),
                    out_axes=(1, 0), donate_argnums=1)


def logprob_matrix(model_config: ModelConfig, params: Params, ids: np.ndarray,
                   n_contexts: int, batch_size: int = 1, bptt: int = 70, *,
                   plan: parallel.Plan | None = None) -> np.ndarray:
    """Next-word log-probabilities at the first `n_contexts` positions of `ids`.

    Row t is `log p(. | ids[:t+1])`: the full distribution over the vocabulary after
    reading `ids[0..t]`, without dropout, the LSTM carry starting from zeros. Only
    `ids[:n_contexts]` is read (the inputs); the next words themselves are not needed.

    With `batch_size` B > 1 the `n_contexts` positions are cut into B contiguous
    columns of `ceil(n_contexts / B)` positions that run in parallel, each column's
    carry starting from zeros: row t then sees the history back to the start of its
    column only. With B = 1 (the default) every row sees the whole prefix. Columns are
    scored in windows of `bptt` steps, the carry passed across windows
    (`mos_jax.evaluate.scan_windows`); every window is padded to `bptt` steps so one
    compiled program serves them all. With a `plan` over several devices that divide
    B, the columns split over them.

    Returns:
      float32 array `[n_contexts, V]` (the model computes in float32; every row's
      exponentials sum to 1 up to float32 round-off).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise MosJaxError(f"logprob_matrix expects a 1-D id stream, got shape {ids.shape}")
    if n_contexts < 1 or n_contexts > len(ids):
        raise MosJaxError(f"n_contexts must be between 1 and the stream's length "
                          f"{len(ids):,}, got {n_contexts:,}")
    if batch_size < 1 or bptt < 1:
        raise MosJaxError(f"batch_size and bptt must be positive, got {batch_size} "
                          f"and {bptt}")
    batch_size = min(batch_size, n_contexts)
    plan = parallel.resolve(plan).for_batch(batch_size)
    steps = -(-n_contexts // batch_size)  # positions per column
    stream = np.zeros(steps * batch_size, np.int32)
    stream[:n_contexts] = ids[:n_contexts]  # padding only ever follows real positions
    columns = stream.reshape(batch_size, steps).T  # [steps, B], column j contiguous
    windows = cut_windows(columns, columns, bptt).columns(plan.host_slice(batch_size))
    params = plan.place_params(params)
    score = _window_fn(plan, model_config)

    def fn(carry, inputs, targets, length):  # the next words are not needed
        logp, carry = score(params, carry, inputs, length)
        return carry, logp

    carry = plan.place_carry(model_lib.init_carry(model_config, batch_size))
    _, out = scan_windows(fn, carry, windows, fetch=lambda x: plan.fetch(x, 1), sync=True)
    out = plan.gather_columns(out)  # [steps, B, V], row r of column j = position j*steps+r
    out = out.transpose(1, 0, 2).reshape(steps * batch_size, -1)
    return np.ascontiguousarray(out[:n_contexts], dtype=np.float32)


class RankResult(NamedTuple):
    """`rank`: singular values above `threshold`; `singular_values`: all, descending."""

    rank: int
    singular_values: np.ndarray
    threshold: float


def default_tolerance(singular_values: np.ndarray, shape: tuple[int, int],
                      eps: float) -> float:
    """Numerical Recipes' round-off threshold, `0.5 * sqrt(m + n + 1) * s_max * eps`."""
    m, n = shape
    s_max = float(singular_values[0]) if len(singular_values) else 0.0
    return 0.5 * float(np.sqrt(m + n + 1.0)) * s_max * eps


def _round_off_eps(dtype: np.dtype) -> float:
    """Machine epsilon of the precision a matrix of `dtype` was computed in.

    float16 and bfloat16 keep their own (larger) epsilon; anything else counts as
    float32 results, the precision of the model's log-probabilities.
    """
    try:
        info = jnp.finfo(dtype)  # knows bfloat16, unlike np.finfo
    except ValueError:  # integers, booleans
        info = np.finfo(np.float32)
    return float(max(info.eps, np.finfo(np.float32).eps))


def empirical_rank(matrix: np.ndarray, tol: float | None = None,
                   eps: float | None = None) -> RankResult:
    """The numerical rank of `matrix` [m, n]: its singular values above a threshold.

    The singular values are computed in float64 whatever the input dtype. The default
    threshold is the one of Numerical Recipes (Press et al., 2007, section 2.6), which
    the paper's rank measurement follows: `tol = 0.5 * sqrt(m + n + 1) * s_max * eps`,
    with `s_max` the largest singular value and `eps` the machine epsilon of the
    precision the matrix was *computed* in. That is float32 (eps ~1.19e-7) for model
    log-probabilities, which carry float32 round-off even when stored as float64, so by
    default `eps` is that of the matrix's dtype when it is float32 or narrower, and
    float32's otherwise (a float64 matrix is assumed to be float32 results, widened).
    Pass `eps=np.finfo(np.float64).eps` for a matrix that is exact in float64, or an
    explicit `tol` to override the threshold altogether.

    Returns:
      `RankResult(rank, singular_values [min(m, n)] float64 descending, threshold)`.
    """
    a = np.asarray(matrix)
    if a.ndim != 2:
        raise MosJaxError(f"empirical_rank expects a 2-D matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise MosJaxError("the matrix has non-finite entries (a log-probability of "
                          "-inf?): its rank is undefined")
    if eps is None:
        eps = _round_off_eps(a.dtype)
    s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    threshold = default_tolerance(s, a.shape, eps) if tol is None else float(tol)
    return RankResult(int(np.sum(s > threshold)), s, threshold)


# ------------------------------------------------------------------ the experiment

# Peak bytes per matrix entry of `analyse`: the float32 matrix, its float64 copy and
# LAPACK's working copy of that (the singular values alone need O(m + n) more).
BYTES_PER_ENTRY = 4 + 8 + 8


def default_contexts(vocab_size: int, n_tokens: int, max_memory_gb: float = 4.0
                     ) -> tuple[int, str | None]:
    """The number of contexts N of the rank experiment, and a note when it was capped.

    As many as the rank can use, `min(V, n_tokens)` (the rank is at most `min(N, V)`),
    but no more than fit the memory cap: the `[N, V]` matrix and its SVD take about
    `BYTES_PER_ENTRY * N * V` bytes.
    """
    if max_memory_gb <= 0:
        raise MosJaxError(f"the memory cap must be positive, got {max_memory_gb} GB")
    wanted = min(vocab_size, n_tokens)
    fits = int(max_memory_gb * 2**30 // (BYTES_PER_ENTRY * vocab_size))
    if fits < 1:
        raise MosJaxError(f"not even one context of the {vocab_size:,}-word vocabulary "
                          f"fits in {max_memory_gb} GB: raise --max-memory-gb")
    if fits >= wanted:
        return wanted, None
    return fits, (f"contexts capped at {fits:,} (of {wanted:,}) so the [N, V] matrix and "
                  f"its SVD fit in {max_memory_gb:g} GB; raise --max-memory-gb for more")


def matrix_gb(n_contexts: int, vocab_size: int) -> float:
    """The memory `analyse` needs for `n_contexts` contexts, in GiB."""
    return BYTES_PER_ENTRY * n_contexts * vocab_size / 2**30


def analyse(model_config: ModelConfig, params: Params, ids: np.ndarray,
            n_contexts: int | None = None, *, max_memory_gb: float = 4.0,
            batch_size: int = 1, bptt: int = 70, log=None,
            plan: parallel.Plan | None = None) -> dict:
    """The rank experiment of Yang et al.: the empirical rank of `logprob_matrix`.

    The model computes in float32 whatever its `compute_dtype` (bfloat16 round-off
    would read as rank), and the rank counts the singular values above the Numerical
    Recipes threshold for float32 results (`empirical_rank`).

    Args:
      ids: the token stream whose first `n_contexts` positions are the contexts.
      n_contexts: None for `default_contexts(V, len(ids), max_memory_gb)`; an explicit
        number must fit in `max_memory_gb` too.
      batch_size, bptt: as in `logprob_matrix` (batch size 1: every row sees its whole
        prefix).
      log: called with progress notes, and a note when the default number of contexts
        was capped.

    Returns:
      a dict: `rank`, `max_rank` (min(N, V)), `contexts` (N), `vocab_size` (V),
      `hidden_size` (d, the last layer's size: a softmax head's rank is at most d + 2),
      `head`, `rank_bound` (the bound the head declares, `Head.rank_bound`, or None),
      `threshold`, `eps`, `s_max`, `s_min`, `matrix_seconds`, `svd_seconds`,
      `capped` (the note, or None) and `singular_values` (a float64 array, descending).
    """
    vocab_size = model_config.vocab_size
    capped = None
    if n_contexts is None:
        n_contexts, capped = default_contexts(vocab_size, len(ids), max_memory_gb)
        if capped and log is not None:
            log(f"note: {capped}")
    elif matrix_gb(n_contexts, vocab_size) > max_memory_gb:
        raise MosJaxError(
            f"{n_contexts:,} contexts of a {vocab_size:,}-word vocabulary need about "
            f"{matrix_gb(n_contexts, vocab_size):.1f} GB for the matrix and its SVD, over "
            f"the cap of {max_memory_gb:g} GB: lower --contexts or raise --max-memory-gb")
    log = log or (lambda message: None)
    config = model_config.replace(compute_dtype="float32")
    log(f"log-probability matrix: {n_contexts:,} contexts x {vocab_size:,} words")
    start = time.perf_counter()
    matrix = logprob_matrix(config, params, ids, n_contexts, batch_size, bptt, plan=plan)
    matrix_s = time.perf_counter() - start
    eps = _round_off_eps(matrix.dtype)
    log(f"singular values of the {n_contexts:,} x {vocab_size:,} matrix")
    start = time.perf_counter()
    result = empirical_rank(matrix, eps=eps)
    svd_s = time.perf_counter() - start
    s = result.singular_values
    return {"rank": result.rank, "max_rank": int(min(matrix.shape)),
            "contexts": int(n_contexts), "vocab_size": vocab_size,
            "hidden_size": model_config.output_size, "head": model_config.head,
            "rank_bound": get_head(model_config.head).rank_bound(model_config),
            "threshold": result.threshold, "eps": eps, "s_max": float(s[0]),
            "s_min": float(s[-1]), "matrix_seconds": round(matrix_s, 3),
            "svd_seconds": round(svd_s, 3), "capped": capped, "singular_values": s}


def plot_spectrum(singular_values: np.ndarray, threshold: float, out_png,
                  title: str | None = None, size_inches: tuple[float, float] = (8.0, 5.0),
                  dpi: int = 100):
    """The singular values (descending, log scale) and the rank threshold, as a PNG.

    Zero singular values sit at the bottom of the plot. Returns the PNG's path.
    """
    from mos_jax.plot import finish, pyplot
    plt = pyplot()
    s = np.asarray(singular_values, dtype=np.float64)
    rank = int(np.sum(s > threshold))
    positive = s[s > 0]
    floor = min(positive.min() if positive.size else 1.0, threshold) / 10
    fig, ax = plt.subplots(figsize=size_inches, dpi=dpi)
    try:
        index = np.arange(1, len(s) + 1)
        ax.plot(index, np.maximum(s, floor), lw=1.5, marker="." if len(s) <= 200 else None,
                label=f"singular values ({len(s):,})")
        ax.axhline(threshold, color="tab:red", lw=1, ls="--",
                   label=f"round-off threshold {threshold:.3g}")
        if 0 < rank < len(s):
            ax.axvline(rank + 0.5, color="gray", lw=1, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel(f"index (empirical rank {rank:,})")
        ax.set_ylabel("singular value")
        return finish(fig, ax, out_png, title, dpi)
    finally:
        plt.close(fig)
