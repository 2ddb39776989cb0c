"""The vocabulary split over a mesh axis, as the model sees it inside a mapped body.

Placement (`mos_jax.parallel`) decides *whether* the vocabulary is split and over which
mesh axis; this module is the vocabulary's side of it, low in the layers so that the
model, the encoders and the heads can use it without knowing the mesh:

- `logical axes of parameters`: a parameter that has a vocabulary axis declares its
  logical axis names by parameter name (`declare_param_axes("embedding", ("vocab",
  "embed"))`; `PARAM_AXES`). The placement maps logical names to mesh axes with the
  config's rules (`parallel.rules`); a name not declared is replicated.
- `vocab_axis()`: inside a body mapped by a plan whose rules split `vocab`, the mesh
  axis name that splits it (set by the plan with `splitting_vocab` while it traces the
  body); None everywhere else, and then every function below is the identity or its
  plain single-device form, so the heads have one code path.

Inside such a body every vocabulary-sized parameter holds its own contiguous block of
rows, `[V / M, ...]` on shard `i` of `M` starting at row `i V / M`. The heads combine
their shards with these operations (the Megatron-style pair `enter` / `shard_sum`,
each a `jax.custom_vjp` so that their gradients do not depend on how the mapped body
transposes collectives):

- `enter(x)`: `x` (replicated over the axis) about to meet a block of the vocabulary:
  identity forward, the gradient summed over the shards backward (each shard's
  gradient covers only its rows' contributions).
- `shard_sum(x)`: the sum over shards of per-shard partial values (a masked lookup, a
  target's logit held by one shard): a psum forward, identity backward.
- `combine_lse(lse)`: the log-normaliser of the whole vocabulary from each shard's
  own: `m + log psum(exp(lse_i - m))` with `m` the max over shards; backward,
  `g exp(lse_i - lse)` on each shard (no collective).
- `local_ids(ids, rows)`: ids as rows of this shard's block and the mask of those it
  holds; `lookup(table, ids)`: rows of a split table, gathered from their shards.
- `gather_vocab(x, words)`: a `[..., V / M]` result made whole `[..., V]` (full
  distributions only: rank and generation need them on the host anyway), cut to its
  first `words` columns.

Padded vocabularies (`model.vocab_multiple`): the vocabulary-sized parameters may have
more rows than there are words (V rounded up to a multiple, so that any model size
can split it). The rows past the last word are never a word: `valid_rows(rows, words)`
is the mask of this block's rows that are words (None when every row is one, as
without padding), and `mask_rows(logits, valid)` sets the others' (finite) logits to
-inf, so they carry no probability and get no gradient.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp

_VOCAB_AXIS: contextvars.ContextVar = contextvars.ContextVar("mos_jax_vocab_axis",
                                                              default=None)

# parameter name -> its logical axis names (a vocabulary-sized parameter declares its
# own; `mos_jax.parallel` maps them to mesh axes). Every other parameter: replicated.
PARAM_AXES: dict[str, tuple[str, ...]] = {}


def declare_param_axes(name: str, axes: tuple[str, ...]) -> None:
    """Declare the logical axes of every parameter called `name` (and of the optimiser
    state that mirrors it). A name declared twice must have the same axes."""
    axes = tuple(axes)
    if PARAM_AXES.get(name, axes) != axes:
        raise ValueError(f"parameter {name!r} is declared with axes {PARAM_AXES[name]}; "
                         f"cannot redeclare it as {axes}")
    PARAM_AXES[name] = axes


@contextlib.contextmanager
def splitting_vocab(axis: str | None):
    """While tracing a mapped body: the vocabulary is split over mesh axis `axis`."""
    token = _VOCAB_AXIS.set(axis)
    try:
        yield
    finally:
        _VOCAB_AXIS.reset(token)


def vocab_axis() -> str | None:
    """The mesh axis splitting the vocabulary in the body being traced, else None."""
    return _VOCAB_AXIS.get()


def shard_count() -> int:
    """How many shards split the vocabulary (1 when it is not split)."""
    axis = vocab_axis()
    return 1 if axis is None else jax.lax.axis_size(axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _enter(x, axis):
    return x


def _enter_fwd(x, axis):
    return x, None


def _enter_bwd(axis, _, g):
    return (jax.lax.psum(g, axis),)


_enter.defvjp(_enter_fwd, _enter_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _shard_sum(x, axis):
    return jax.lax.psum(x, axis)


def _shard_sum_fwd(x, axis):
    return jax.lax.psum(x, axis), None


def _shard_sum_bwd(axis, _, g):
    return (g,)


_shard_sum.defvjp(_shard_sum_fwd, _shard_sum_bwd)


def _lse_forward(lse, axis):
    m = jax.lax.pmax(jax.lax.stop_gradient(lse), axis)
    return m + jnp.log(jax.lax.psum(jnp.exp(lse - m), axis))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _combine_lse(lse, axis):
    return _lse_forward(lse, axis)


def _combine_fwd(lse, axis):
    out = _lse_forward(lse, axis)
    return out, (lse, out)


def _combine_bwd(axis, res, g):
    lse, out = res
    return (g * jnp.exp(lse - out),)


_combine_lse.defvjp(_combine_fwd, _combine_bwd)


def enter(x: jax.Array) -> jax.Array:
    axis = vocab_axis()
    return x if axis is None else _enter(x, axis)


def shard_sum(x: jax.Array) -> jax.Array:
    axis = vocab_axis()
    return x if axis is None else _shard_sum(x, axis)


def combine_lse(lse: jax.Array) -> jax.Array:
    axis = vocab_axis()
    return lse if axis is None else _combine_lse(lse, axis)


def local_ids(ids: jax.Array, rows: int) -> tuple[jax.Array, jax.Array | None]:
    """`(index, mask)`: `ids` as rows of this shard's block of `rows` rows (0 where the
    shard does not hold the id) and where it does; `(ids, None)` when not split."""
    axis = vocab_axis()
    if axis is None:
        return ids, None
    local = ids - jax.lax.axis_index(axis) * rows
    mask = (local >= 0) & (local < rows)
    return jnp.where(mask, local, 0), mask


def masked(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`x` where `mask` (broadcast over `x`'s trailing axes), else 0; `x` for None."""
    if mask is None:
        return x
    mask = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    return jnp.where(mask, x, jnp.zeros_like(x))


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """`table[ids]` for a table `[V, ...]` split by rows: each shard looks up the ids
    it holds, the shards' parts summed (`jnp.take` when not split)."""
    index, mask = local_ids(ids, table.shape[0])
    return shard_sum(masked(jnp.take(table, index, axis=0), mask))


def gather_vocab(x: jax.Array, words: int | None = None) -> jax.Array:
    """`[..., V / M]` blocks of every shard as the whole `[..., V]`, then its first
    `words` columns (all for None): a padded vocabulary's rows past the last word cut."""
    axis = vocab_axis()
    if axis is not None:
        x = jax.lax.all_gather(x, axis, axis=x.ndim - 1, tiled=True)
    return x if words is None or words >= x.shape[-1] else x[..., :words]


def valid_rows(rows: int, words: int | None) -> jax.Array | None:
    """Which of this shard's `rows` rows of a vocabulary-sized parameter are words
    (global row < `words`): a bool [rows], or None when all of them are (`words` None
    or at least the whole vocabulary's rows, `rows` times the shards)."""
    if words is None or words >= rows * shard_count():
        return None
    axis = vocab_axis()
    start = 0 if axis is None else jax.lax.axis_index(axis) * rows
    return start + jnp.arange(rows) < words


def mask_rows(logits: jax.Array, valid: jax.Array | None) -> jax.Array:
    """`logits` [..., rows] with the columns that are not words (`valid_rows`) at
    -inf; `logits` itself for None. Apply it to finite logits: the -inf is a constant
    of `jnp.where`, so no gradient reaches (or comes from) the masked columns."""
    if valid is None:
        return logits
    return jnp.where(valid, logits, -jnp.inf)

