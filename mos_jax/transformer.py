"""A causal decoder-only Transformer encoder, the second encoder beside the AWD-LSTM.

Time-major like the rest of the model: inputs [T, B] -> output [T, B, d_model].

    x_0   = dropout_r(embedding_dropout(E, ids) @ in_proj)    (in_proj only when
                                                              d_model != emsize)
    per block l (pre-LayerNorm):
      x  += dropout_r(attention(LN(x)))                       causal, n_heads heads
      x  += dropout_r(W_2 gelu(W_1 LN(x) + b_1) + b_2)
    out   = LN_f(x_L)

`dropout_r` is element-wise dropout at `resid_dropout`; the attention probabilities
get element-wise dropout at `attn_dropout`. `LN(x) = (x - mean) / sqrt(var + 1e-5) *
scale + bias` over the feature axis. `gelu` is the tanh approximation (`jax.nn.gelu`).

Positions are rotary (RoPE, "half split" form): in every head, query and key vectors
[d_h] are rotated by angles `pos * 10000^(-2i/d_h)`, i < d_h/2, with
`(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)` on the two halves of the vector. Only
relative offsets matter, there are no position parameters and any window length
works (the sliding-window evaluation relies on that). Positions count from 0 at the
start of each window: the encoder has no carry, a window is its whole context. To
generate, a key/value cache given as the carry (`Transformer.generation_state`) holds
the keys and values of the positions read so far, so each new word costs one position.

Parameters (Flax names under the model's scope, D = d_model, F = d_ff):
    in_proj                 [emsize, D]  only when D != emsize
    block_{l}/ln_1_scale, ln_1_bias, ln_2_scale, ln_2_bias   [D]
    block_{l}/qkv_kernel [D, 3D], qkv_bias [3D], out_kernel [D, D], out_bias [D]
    block_{l}/ff_in_kernel [D, F], ff_in_bias [F], ff_out_kernel [F, D], ff_out_bias [D]
    ln_f_scale, ln_f_bias   [D]
Kernels start from N(0, 0.02^2) (the output projections of attention and of the
feed-forward part scaled by 1/sqrt(2 L)), biases at 0, LayerNorm scales at 1.
Matmul operands are in `dtype` with float32 accumulation; LayerNorm, softmax and the
residual stream are float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mos_jax.layers import Encoder, dot, embedding_dropout

LN_EPS = 1e-5
ROPE_BASE = 10000.0


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Element-wise dropout, kept values scaled by 1 / (1 - rate); off without `rng`."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * scale + bias


def rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotate x [T, B, n_heads, d_h] by its positions [T] (see the module docstring)."""
    half = x.shape[-1] // 2
    freq = ROPE_BASE ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
    angle = positions.astype(jnp.float32)[:, None] * freq  # [T, half]
    cos, sin = jnp.cos(angle)[:, None, None], jnp.sin(angle)[:, None, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Block(nn.Module):
    """One pre-LayerNorm block: causal self-attention, then the feed-forward part."""

    d_model: int
    n_heads: int
    d_ff: int
    n_layers: int
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rng: Callable[[], jax.Array | None],
                 cache: tuple[jax.Array, jax.Array] | None = None, offset=0):
        """`x` [T, B, D] at positions `offset + t` -> the new x, and with a key/value
        `cache` ([L, B, n_heads, d_h] each) that cache with this window's keys and
        values written at rows `offset ...` (attention then reads the cache: every
        earlier position written before, none after)."""
        d, f, nh = self.d_model, self.d_ff, self.n_heads
        dh = d // nh
        t, b = x.shape[:2]
        init = nn.initializers.normal(0.02)
        out_init = nn.initializers.normal(0.02 / math.sqrt(2 * self.n_layers))
        zeros, ones = nn.initializers.zeros, nn.initializers.ones
        p = {name: self.param(name, fn, shape) for name, fn, shape in (
            ("ln_1_scale", ones, (d,)), ("ln_1_bias", zeros, (d,)),
            ("qkv_kernel", init, (d, 3 * d)), ("qkv_bias", zeros, (3 * d,)),
            ("out_kernel", out_init, (d, d)), ("out_bias", zeros, (d,)),
            ("ln_2_scale", ones, (d,)), ("ln_2_bias", zeros, (d,)),
            ("ff_in_kernel", init, (d, f)), ("ff_in_bias", zeros, (f,)),
            ("ff_out_kernel", out_init, (f, d)), ("ff_out_bias", zeros, (d,)))}

        h = layer_norm(x, p["ln_1_scale"], p["ln_1_bias"])
        qkv = (dot(h, p["qkv_kernel"], self.dtype) + p["qkv_bias"]).reshape(t, b, 3, nh, dh)
        positions = offset + jnp.arange(t)
        q = rotary(qkv[:, :, 0], positions)
        k = rotary(qkv[:, :, 1], positions)
        v = qkv[:, :, 2]
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k, offset, 0)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v, offset, 0)
            cache = (k, v)
        scores = jnp.einsum("tbhd,sbhd->bhts", q.astype(self.dtype), k.astype(self.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(dh)
        causal = jnp.arange(k.shape[0])[None, :] <= positions[:, None]  # [T, S]
        scores = jnp.where(causal, scores, -jnp.inf)
        probs = dropout(jax.nn.softmax(scores, axis=-1), self.attn_dropout, rng())
        att = jnp.einsum("bhts,sbhd->tbhd", probs.astype(self.dtype), v.astype(self.dtype),
                         preferred_element_type=jnp.float32).reshape(t, b, d)
        att = dot(att, p["out_kernel"], self.dtype) + p["out_bias"]
        x = x + dropout(att, self.resid_dropout, rng())

        h = layer_norm(x, p["ln_2_scale"], p["ln_2_bias"])
        h = jax.nn.gelu(dot(h, p["ff_in_kernel"], self.dtype) + p["ff_in_bias"])
        h = dot(h, p["ff_out_kernel"], self.dtype) + p["ff_out_bias"]
        return x + dropout(h, self.resid_dropout, rng()), cache


class Transformer(Encoder):
    """The Transformer as the model's encoder (the interface: `mos_jax.layers.Encoder`).

    Config keys (`mos_jax.model.ModelConfig`): nlayers (blocks), n_heads, d_model (0:
    emsize), d_ff (0: 4 d_model), attn_dropout, resid_dropout, dropoute (embedding
    rows, as the LSTM's). The LSTM's other dropouts (dropout, dropouth, dropouti,
    wdrop) and nhid/nhidlast are not used. No carry in training and evaluation (the
    empty tuple); to generate, the carry is a key/value cache (`generation_state`).
    """

    stateful = False
    width_key = "d_model"

    @staticmethod
    def d_model(cfg) -> int:
        return cfg.d_model or cfg.emsize

    @staticmethod
    def d_ff(cfg) -> int:
        return cfg.d_ff or 4 * Transformer.d_model(cfg)

    @staticmethod
    def output_size(cfg) -> int:
        return Transformer.d_model(cfg)

    @staticmethod
    def check(cfg) -> list[str]:
        """Problems with the config, each naming the key and the fix."""
        d, problems = Transformer.d_model(cfg), []
        if cfg.n_heads < 1 or d % cfg.n_heads:
            problems.append(f"model.n_heads={cfg.n_heads} must divide model.d_model={d}")
        elif (d // cfg.n_heads) % 2:
            problems.append(f"rotary positions need an even head size: d_model/n_heads = "
                            f"{d}/{cfg.n_heads} = {d // cfg.n_heads}; change n_heads or "
                            "d_model")
        if cfg.d_model < 0 or cfg.d_ff < 0:
            problems.append("model.d_model and model.d_ff must be positive (0: default)")
        for key in ("attn_dropout", "resid_dropout"):
            if not 0.0 <= getattr(cfg, key) < 1.0:
                problems.append(f"model.{key} is a dropout rate in [0, 1), got "
                                f"{getattr(cfg, key)}")
        return problems

    @staticmethod
    def init_carry(cfg, batch_size: int) -> tuple:
        return ()

    @staticmethod
    def generation_state(cfg, batch_size: int, max_len: int) -> dict:
        """An empty key/value cache for `max_len` positions: `{"pos": 0, "layers":
        ((k, v) per block, each [max_len, B, n_heads, d_h] float32)}`. Given as the
        carry, the model attends to the cached positions and returns the cache with
        the window's keys and values added, `pos` advanced by the window's length, so
        each generated word costs one position (`mos_jax.generate`)."""
        d = Transformer.d_model(cfg)
        shape = (max_len, batch_size, cfg.n_heads, d // cfg.n_heads)
        return {"pos": jnp.zeros((), jnp.int32),
                "layers": tuple((jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
                                for _ in range(cfg.nlayers))}

    @staticmethod
    def flops_per_token(cfg, context: int) -> int:
        """Forward matmul FLOPs per token at `context` positions: projections
        2 (4 D^2 + 2 D F) per block (+ 2 emsize D for in_proj), and attention scores
        and mixing 2 * 2 * D * (context + 1) / 2 per block (the causal average)."""
        d, f = Transformer.d_model(cfg), Transformer.d_ff(cfg)
        per_block = 2 * (4 * d * d + 2 * d * f) + 2 * d * (context + 1)
        return cfg.nlayers * per_block + (2 * cfg.emsize * d if d != cfg.emsize else 0)

    @staticmethod
    def encode(module: nn.Module, cfg, embedding, inputs, carry, *, rng, deterministic,
               valid):
        """Called inside the model's compact scope: `(output, raw_output, carry)`."""
        del valid, deterministic  # padding at the end cannot reach earlier positions
        d = Transformer.d_model(cfg)
        cache = carry or None  # () in training and evaluation; a dict when generating
        offset = cache["pos"] if cache else 0
        layers = []
        x = embedding_dropout(embedding, inputs, cfg.dropoute, rng())
        if d != cfg.emsize:
            x = dot(x, module.param("in_proj", nn.initializers.normal(0.02),
                                    (cfg.emsize, d)), cfg.dtype)
        x = dropout(x.astype(jnp.float32), cfg.resid_dropout, rng())
        for l in range(cfg.nlayers):
            x, kv = Block(d, cfg.n_heads, Transformer.d_ff(cfg), cfg.nlayers,
                          cfg.attn_dropout, cfg.resid_dropout, cfg.dtype, name=f"block_{l}")(
                x, rng, cache["layers"][l] if cache else None, offset)
            layers.append(kv)
        x = layer_norm(x, module.param("ln_f_scale", nn.initializers.ones, (d,)),
                       module.param("ln_f_bias", nn.initializers.zeros, (d,)))
        new = {"pos": offset + inputs.shape[0], "layers": tuple(layers)} if cache else ()
        return x, x, new
