"""AWD-LSTM building blocks: embedding dropout, locked dropout, the weight-dropped LSTM.

Arrays are time-major (`[T, B, ...]`). Dropout functions take an explicit PRNG key and
scale kept values by `1 / (1 - rate)`; a rate of 0 returns the input unchanged.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Carry = tuple[jax.Array, jax.Array]  # (h, c), each [B, H]


def uniform_init(scale: float) -> Callable:
    """Initialiser drawing U(-scale, scale), like PyTorch's `uniform_(-s, s)`."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


def dot(x: jax.Array, w: jax.Array, dtype=jnp.float32) -> jax.Array:
    """`x @ w` with operands in `dtype` and float32 accumulation and result."""
    return jnp.matmul(x.astype(dtype), w.astype(dtype),
                      preferred_element_type=jnp.float32)


def _keep_mask(rng: jax.Array, rate: float, shape) -> jax.Array:
    keep = 1.0 - rate
    return jax.random.bernoulli(rng, keep, shape).astype(jnp.float32) / keep


def embedding_dropout(embedding: jax.Array, ids: jax.Array, rate: float,
                      rng: jax.Array | None) -> jax.Array:
    """Look up `ids` in `embedding` [V, D], dropping whole vocabulary rows.

    One Bernoulli keep per row, drawn once per call, so every occurrence of a word in
    the batch drops together (SPEC.md section 2, step 1). Returns `[*ids.shape, D]`.
    """
    vectors = jnp.take(embedding, ids, axis=0)
    if rng is None or rate == 0.0:
        return vectors
    row_mask = _keep_mask(rng, rate, (embedding.shape[0],))
    return vectors * jnp.take(row_mask, ids, axis=0)[..., None]


def locked_dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Variational dropout on `x` [T, B, F]: one mask [B, F] shared over time."""
    if rng is None or rate == 0.0:
        return x
    return x * _keep_mask(rng, rate, x.shape[1:])[None]


class WeightDropLSTM(nn.Module):
    """One LSTM layer with DropConnect on the recurrent matrix (SPEC.md section 2).

    Parameters (Flax kernels are the transposes of PyTorch weights; gate columns in
    order i, f, g, o): `ih_kernel` [I, 4H], `hh_kernel` [H, 4H], `ih_bias` [4H],
    `hh_bias` [4H], all U(-1/sqrt(H), 1/sqrt(H)).

    The input projection of all T steps is one matmul outside the scan; only
    `h @ hh_kernel` runs inside it. With `wdrop > 0` and not deterministic, one mask
    over `hh_kernel` is drawn per call and shared by every step and batch column.
    """

    features: int
    wdrop: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, carry: Carry, *, deterministic: bool = True,
                 valid: jax.Array | None = None) -> tuple[jax.Array, Carry]:
        """Run over `x` [T, B, I] from `carry`; returns outputs [T, B, H] and the carry.

        `valid` [T] bool marks real steps: the carry does not advance on padded steps
        (padding is at the end, so the returned carry is the one after the last real
        step). Outputs at padded steps are unspecified.
        """
        h_size = self.features
        init = uniform_init(h_size ** -0.5)
        ih_kernel = self.param("ih_kernel", init, (x.shape[-1], 4 * h_size))
        hh_kernel = self.param("hh_kernel", init, (h_size, 4 * h_size))
        ih_bias = self.param("ih_bias", init, (4 * h_size,))
        hh_bias = self.param("hh_bias", init, (4 * h_size,))
        if not deterministic and self.wdrop > 0.0:
            mask = _keep_mask(self.make_rng("dropout"), self.wdrop, hh_kernel.shape)
            self.sow("intermediates", "hh_mask", mask)  # no-op unless asked for
            hh_kernel = hh_kernel * mask
        x_proj = dot(x, ih_kernel, self.dtype) + (ih_bias + hh_bias)
        if valid is None:
            valid = jnp.ones(x.shape[:1], dtype=bool)
        hh = hh_kernel.astype(self.dtype)

        def step(state, inp):
            h, c = state
            xp, ok = inp
            z = xp + dot(h, hh, self.dtype)
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
            state = (jnp.where(ok, h_new, h), jnp.where(ok, c_new, c))
            return state, h_new

        carry, outputs = jax.lax.scan(step, carry, (x_proj, valid))
        return outputs, carry
