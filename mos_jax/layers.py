"""AWD-LSTM building blocks: embedding dropout, locked dropout, the weight-dropped LSTM;
and `Encoder`, the interface every encoder of the model has (the AWD-LSTM,
`mos_jax.model.AWDLSTM`, and the Transformer, `mos_jax.transformer.Transformer`).

Arrays are time-major (`[T, B, ...]`). Dropout functions take an explicit PRNG key and
scale kept values by `1 / (1 - rate)`; a rate of 0 returns the input unchanged.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mos_jax import collectives

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
    the batch drops together (docs/reference.md section 2, step 1). Returns `[*ids.shape, D]`.
    """
    vectors = collectives.lookup(embedding, ids)  # from the shard holding each row
    if rng is None or rate == 0.0:
        return vectors
    # the whole vocabulary's mask on every shard: the same keep per word as one device
    row_mask = _keep_mask(rng, rate, (embedding.shape[0] * collectives.shard_count(),))
    return vectors * jnp.take(row_mask, ids, axis=0)[..., None]


def locked_dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Variational dropout on `x` [T, B, F]: one mask [B, F] shared over time."""
    if rng is None or rate == 0.0:
        return x
    return x * _keep_mask(rng, rate, x.shape[1:])[None]


def _cell(z, c):
    """Gate activations (i, f, g, o) and the new (h, c) from pre-activations z [B, 4H]."""
    zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
    c_new = f * c + i * g
    tanh_c = jnp.tanh(c_new)
    return (i, f, g, o), o * tanh_c, c_new, tanh_c


def _recurrence_scan(x_proj, hh, h0, c0, valid, dtype):
    """The forward recurrence; also returns what the backward pass needs."""
    def step(state, inp):
        h, c = state
        xp, ok = inp
        gates, h_new, c_new, tanh_c = _cell(xp + dot(h, hh, dtype), c)
        state = (jnp.where(ok, h_new, h), jnp.where(ok, c_new, c))
        return state, (h_new, (h, c, jnp.concatenate(gates, axis=-1), tanh_c))

    (h, c), (outputs, saved) = jax.lax.scan(step, (h0, c0), (x_proj, valid))
    return outputs, h, c, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def lstm_recurrence(x_proj, hh, h0, c0, valid, dtype=jnp.float32):
    """LSTM over time from pre-computed input projections.

    `x_proj` [T, B, 4H] holds `x W_ih + b_ih + b_hh`, `hh` [H, 4H] the (dropped)
    recurrent kernel, `valid` [T] bool the real steps (state frozen on the others).
    Returns outputs [T, B, H] and the final (h, c).

    The custom backward pass runs a reverse scan that emits each step's gate gradient
    dz_t [B, 4H], then forms `d hh = sum_t h_{t-1}^T dz_t` as one matmul over all T*B
    rows, instead of autodiff's accumulation into a [H, 4H] buffer at every step.
    """
    outputs, h, c, _ = _recurrence_scan(x_proj, hh, h0, c0, valid, dtype)
    return outputs, h, c


def _recurrence_fwd(x_proj, hh, h0, c0, valid, dtype):
    outputs, h, c, saved = _recurrence_scan(x_proj, hh, h0, c0, valid, dtype)
    return (outputs, h, c), (hh, valid, saved)


def _recurrence_bwd(dtype, residuals, cotangents):
    hh, valid, (h_prev, c_prev, gates, tanh_c) = residuals
    d_out, d_h, d_c = cotangents
    hh_t = hh.T

    def step(carry, inp):
        dh_state, dc_state = carry  # gradients reaching the state after step t
        d_o_t, ok, c_p, g_t, t_c = inp
        i, f, g, o = jnp.split(g_t, 4, axis=-1)
        dh_new = d_o_t + jnp.where(ok, dh_state, 0.0)
        dc_new = jnp.where(ok, dc_state, 0.0) + dh_new * o * (1.0 - t_c * t_c)
        dz = jnp.concatenate([dc_new * g * i * (1.0 - i),
                              dc_new * c_p * f * (1.0 - f),
                              dc_new * i * (1.0 - g * g),
                              dh_new * t_c * o * (1.0 - o)], axis=-1)
        dh_prev = dot(dz, hh_t, dtype) + jnp.where(ok, 0.0, dh_state)
        dc_prev = dc_new * f + jnp.where(ok, 0.0, dc_state)
        return (dh_prev, dc_prev), dz

    (dh0, dc0), dz = jax.lax.scan(step, (d_h, d_c), (d_out, valid, c_prev, gates, tanh_c),
                                  reverse=True)
    rows = h_prev.shape[0] * h_prev.shape[1]
    d_hh = dot(h_prev.reshape(rows, -1).T, dz.reshape(rows, -1), dtype)
    return dz, d_hh.astype(hh.dtype), dh0, dc0, None


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


class WeightDropLSTM(nn.Module):
    """One LSTM layer with DropConnect on the recurrent matrix (docs/reference.md section 2).

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
        outputs, h, c = lstm_recurrence(x_proj, hh_kernel, carry[0], carry[1], valid,
                                        self.dtype)
        return outputs, (h, c)


class Encoder:
    """What the model asks of an encoder: every entry of `mos_jax.model.ENCODERS`
    subclasses this and overrides each method (all static: an encoder is a class, its
    parameters live in the model's scope). It lives here, above both
    `mos_jax.transformer` and `mos_jax.model` in the layer order of ARCHITECTURE.md,
    because the model imports the encoders to list them.

    stateful: True when a carry passes from one window to the next (the LSTM); False
      when a window is the whole context (the Transformer: evaluation then scores a
      stream in sliding windows, `mos_jax.evaluate.sliding_token_logprobs`).
    width_key: the model config key that sets `output_size` (a tied head needs it
      equal to emsize).
    """

    stateful: bool = True
    width_key: str = ""

    @staticmethod
    def check(cfg) -> list[str]:
        """Problems with the config, each a message naming the key and the fix."""
        raise NotImplementedError

    @staticmethod
    def output_size(cfg) -> int:
        """The width of the output the head reads."""
        raise NotImplementedError

    @staticmethod
    def init_carry(cfg, batch_size: int):
        """The zero carry (any pytree; () for none)."""
        raise NotImplementedError

    @staticmethod
    def generation_state(cfg, batch_size: int, max_len: int):
        """The carry to generate up to `max_len` words with, one at a time (the zero
        carry; the Transformer's key/value cache)."""
        raise NotImplementedError

    @staticmethod
    def flops_per_token(cfg, context: int) -> int:
        """Forward matmul FLOPs per token for windows of `context` tokens (`mos-jax
        bench`)."""
        raise NotImplementedError

    @staticmethod
    def encode(module: nn.Module, cfg, embedding, inputs, carry, *, rng, deterministic,
               valid):
        """`(output, raw_output [T, B, output_size], carry)` of token ids `inputs`
        [T, B]: run inside the model's compact scope (`module`), so the submodules it
        builds are the model's children; `rng()` draws a dropout key (None when
        `deterministic`), `valid` [T] marks the real steps (None: all)."""
        raise NotImplementedError
