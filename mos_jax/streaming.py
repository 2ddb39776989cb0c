"""Log-normalisers of tied decoders, streamed over vocabulary chunks.

`chunked_logsumexp(x, embedding, bias, chunk)` is `logsumexp(x @ embedding^T + bias)`
over the vocabulary for every row of `x` [N, D], computed chunk by chunk with a running
maximum and sum, so the [N, V] logits never exist at once, forward or backward: the
backward pass (a `jax.custom_vjp`) recomputes each chunk's logits and accumulates the
gradients of `x`, of the embedding rows and of the bias chunk by chunk.

`transform` (static, default "identity") applies an element-wise g to the logits before
the logsumexp: "sigsoftmax" is g(z) = z + log_sigmoid(z) (Kanai et al., 2018), whose
normaliser is logsumexp_v(g(z_v)); the backward pass multiplies softmax(g) by
g'(z) = 2 - sigmoid(z).

`valid` (a bool [V], or None: every row) marks the rows that are words: the others (a
padded vocabulary's last rows, `collectives.valid_rows`) get logit -inf after their
finite logits are computed, so they add nothing to the normaliser and get no gradient.

A head that needs only target log-probabilities (training, scoring) gets everything from
these normalisers and the target logits, which are a gather. The plain path (whole
logits) stays for full distributions and for comparison; `resolve_chunk` decides.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Padding rows of a last, partial chunk get this bias: exp(_PAD - m) is exactly 0.
_PAD = -1e30


def _chunks(embedding: jax.Array, bias: jax.Array, chunk: int, valid=None):
    """[V, D], [V] (and `valid` [V] or None) -> [C, chunk, D], [C, chunk] (and
    [C, chunk] or None), padding V up to a multiple of chunk."""
    v, d = embedding.shape
    n = -(-v // chunk)
    pad = n * chunk - v
    if pad:
        embedding = jnp.concatenate([embedding, jnp.zeros((pad, d), embedding.dtype)])
        bias = jnp.concatenate([bias, jnp.full((pad,), _PAD, bias.dtype)])
        if valid is not None:
            valid = jnp.concatenate([valid, jnp.zeros((pad,), bool)])
    valid = None if valid is None else valid.reshape(n, chunk)
    return embedding.reshape(n, chunk, d), bias.reshape(n, chunk), valid


def _masked(logits, valid_c):
    """Logits of the rows that are not words (`valid_c` False) at -inf."""
    return logits if valid_c is None else jnp.where(valid_c, logits, -jnp.inf)


def _chunk_logits(x, emb_c, bias_c, dtype):
    return jnp.matmul(x.astype(dtype), emb_c.astype(dtype).T,
                      preferred_element_type=jnp.float32) + bias_c


TRANSFORMS = ("identity", "sigsoftmax")


def transform_logits(z: jax.Array, transform: str) -> jax.Array:
    """g(z) element-wise: z ("identity") or z + log_sigmoid(z) ("sigsoftmax")."""
    if transform == "identity":
        return z
    if transform == "sigsoftmax":
        return z + jax.nn.log_sigmoid(z)
    raise ValueError(f"unknown logit transform {transform!r}: use one of {TRANSFORMS}")


def _transform_grad(z, transform):
    """g'(z); None for the identity (a factor of 1)."""
    if transform == "sigsoftmax":
        return 1.0 + jax.nn.sigmoid(-z)  # d/dz (z + log_sigmoid(z)) = 2 - sigmoid(z)
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def chunked_logsumexp(x: jax.Array, embedding: jax.Array, bias: jax.Array,
                      chunk: int, dtype=jnp.float32, transform: str = "identity",
                      valid: jax.Array | None = None) -> jax.Array:
    """`logsumexp(g(x @ embedding^T + bias), axis=-1)` for x [N, D]: [N] float32.

    g is `transform_logits(., transform)` (the identity by default). Matmul operands
    are cast to `dtype` (accumulation in float32); the running max/sum and the result
    are float32. Padding words of a last partial chunk get logit -1e30, so g(z) is
    about -2e30 for the sigsoftmax transform: still no contribution. `valid` (bool
    [V] or None): the rows that are words (the module docstring); the first row must
    be one (else the normaliser is -inf).
    """
    return _forward(x, embedding, bias, chunk, dtype, transform, valid)


def _forward(x, embedding, bias, chunk, dtype, transform="identity", valid=None):
    emb_c, bias_c, valid_c = _chunks(embedding, bias, chunk, valid)
    n = x.shape[0]

    def body(state, c):
        m, s = state
        logits = _masked(transform_logits(_chunk_logits(x, c[0], c[1], dtype), transform),
                         c[2])
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=-1)
        return (m_new, s), None

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
    (m, s), _ = jax.lax.scan(body, init, (emb_c, bias_c, valid_c))
    return m + jnp.log(s)


def _fwd(x, embedding, bias, chunk, dtype, transform, valid):
    lse = _forward(x, embedding, bias, chunk, dtype, transform, valid)
    return lse, (x, embedding, bias, lse, valid)


def _bwd(chunk, dtype, transform, residuals, g):
    x, embedding, bias, lse, valid = residuals
    emb_c, bias_c, valid_c = _chunks(embedding, bias, chunk, valid)
    xd = x.astype(dtype)

    def body(dx, c):
        logits = _chunk_logits(xd, c[0], c[1], dtype)
        # d lse / d logits = softmax(g(logits)) * g'(logits); times the incoming
        # cotangent of each row.
        dlogits = (jnp.exp(transform_logits(logits, transform) - lse[:, None])
                   * g[:, None])
        dg = _transform_grad(logits, transform)
        if dg is not None:
            dlogits = dlogits * dg
        if c[2] is not None:  # the rows that are not words: no gradient
            dlogits = jnp.where(c[2], dlogits, 0.0)
        dx = dx + jnp.matmul(dlogits.astype(dtype), c[0].astype(dtype),
                             preferred_element_type=jnp.float32)
        demb = jnp.matmul(dlogits.astype(dtype).T, xd, preferred_element_type=jnp.float32)
        return dx, (demb, jnp.sum(dlogits, axis=0))

    dx, (demb, dbias) = jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32),
                                     (emb_c, bias_c, valid_c))
    v = embedding.shape[0]
    demb = demb.reshape(-1, embedding.shape[1])[:v].astype(embedding.dtype)
    dbias = dbias.reshape(-1)[:v].astype(bias.dtype)
    return dx.astype(x.dtype), demb, dbias, None


chunked_logsumexp.defvjp(_fwd, _bwd)


# `auto` streams when the whole logits would be at least this large (float32 bytes):
# below it the plain path's single matmul is as fast and memory is no issue. Its chunks
# hold about AUTO_CHUNK_BYTES of logits (a few live at once in the backward pass).
AUTO_MIN_LOGITS_BYTES = 64 << 20
AUTO_CHUNK_BYTES = 64 << 20
AUTO_CHUNK_RANGE = (256, 4096)


def auto_chunk(rows: int) -> int:
    """Words per chunk for `rows` rows: ~AUTO_CHUNK_BYTES of logits, a multiple of 128."""
    lo, hi = AUTO_CHUNK_RANGE
    return int(min(hi, max(lo, AUTO_CHUNK_BYTES // (4 * rows) // 128 * 128)))


def resolve_chunk(vocab_chunk, rows: int, vocab: int) -> int:
    """The chunk size a head uses for `rows` x `vocab` logits; 0 means the plain path.

    `vocab_chunk`: an int (0 = plain, n > 0 = chunks of n words), or "auto" (or
    "fused", for losses a head cannot fuse), which streams in chunks of `auto_chunk(rows)` words once the logits reach
    `AUTO_MIN_LOGITS_BYTES`.
    """
    if vocab_chunk in ("auto", "fused"):  # "fused": heads without a fused loss stream
        if rows * vocab * 4 < AUTO_MIN_LOGITS_BYTES:
            return 0
        chunk = auto_chunk(rows)
        return chunk if chunk < vocab else 0
    chunk = int(vocab_chunk)
    if chunk <= 0 or chunk >= vocab:
        return 0
    return chunk


# The fused training loss (`mos_jax.fused`) works on tiles of [rows x components, V]
# logits. On CPU the fastest tile grows with the embedding size D (more matmul work per
# logit to amortise each pass over the tile) and shrinks as V grows (the tile has to
# stay near the caches): about 2 * D logit rows at V = 10,000, scaled by 10,000 / V above
# that. Measured (BENCHMARKS.md, train step): PTB (D 280) 512 rows 147 tokens/s against
# 139 at 256 and 137 at 128; the small config (D 64) 128 rows 2,356 against 2,237 at 256;
# WikiText-2 (D 300, V 33,278) 160 rows 36.3 against 35.1 at 256 and 31.6 at 600. On
# accelerators, where bigger matmuls pay, many more rows.
FUSED_TILE_ROWS_CPU = (64, 1024)  # bounds of the CPU rule
FUSED_TILE_ROWS_DEFAULT = 16384


def fused_tile_rows(dim: int, vocab: int, backend: str | None = None) -> int:
    """Logit rows per fused-loss tile for embedding size `dim` and vocabulary `vocab`."""
    if (backend or jax.default_backend()) != "cpu":
        return FUSED_TILE_ROWS_DEFAULT
    lo, hi = FUSED_TILE_ROWS_CPU
    return int(min(hi, max(lo, round(2 * dim * min(1.0, 10000 / vocab)))))


def fused_rows(vocab_chunk, rows: int, components: int, vocab: int, dim: int) -> int:
    """Rows (of `components` logit rows each) per chunk of the fused training loss; 0
    when `vocab_chunk` does not ask for it. "auto" and "fused" use it wherever a head
    offers it."""
    if vocab_chunk not in ("auto", "fused"):
        return 0
    target = int(max(1, min(rows, fused_tile_rows(dim, vocab) // components)))
    return balanced_chunk(rows, target)


def balanced_chunk(rows: int, target: int) -> int:
    """A chunk of at most `target` rows, and at least `int(0.8 * target)`, that wastes
    the fewest padding rows over `rows` (ties: the larger chunk).

    The last chunk of a scan is padded to full size, and padding rows cost as much as
    real ones: 840 rows in chunks of 37 are 23 chunks and 11 padding rows, in chunks of
    35 exactly 24. Measured (`benchmarks/fused_chunks.py`, BENCHMARKS.md): the small
    config's 420 rows take 0.158 s in chunks of 30 against 0.171 s in chunks of 32
    (448 rows padded).
    """
    best, best_padded = target, -(-rows // target) * target
    for r in range(target - 1, max(1, int(0.8 * target)) - 1, -1):
        padded = -(-rows // r) * r
        if padded < best_padded:
            best, best_padded = r, padded
    return best
