"""Output layers behind one interface.

A head maps the encoder's output `hidden` [T, B, H] and the tied embedding [V, D] to
log-probabilities. Every head is a linen module called as

    head(hidden, embedding, targets, deterministic=..., return_logprobs=...)

and returns a `HeadOutput`: `target_logprobs` [T, B] (log p of each target; None when
`targets` is None) and, when `return_logprobs` is set, `logprobs` [T, B, V]. The
decoder bias `decoder_bias` [V] (zeros at init) belongs to the head. Heads are looked
up by name in `HEADS`; `register_head` adds one.

All log-space arithmetic is float32; `dtype` only sets the operand type of matmuls.
`vocab_chunk` (0, a chunk size, or "auto"; `mos_jax.streaming.resolve_chunk`) selects
the streaming path for target log-probabilities: per-row log-normalisers accumulated
over vocabulary chunks, so no [rows, V] logits are materialised forward or backward.
Full distributions (`return_logprobs`) always take the plain path.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mos_jax.errors import ConfigError
from mos_jax.layers import dot, locked_dropout, uniform_init
from mos_jax.streaming import chunked_logsumexp, resolve_chunk


class HeadOutput(NamedTuple):
    target_logprobs: jax.Array | None  # [T, B]
    logprobs: jax.Array | None  # [T, B, V]


HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a head selectable as `config.model.head = name`."""
    def register(cls):
        if name in HEADS:
            raise ValueError(f"a head named {name!r} is already registered")
        HEADS[name] = cls
        return cls
    return register


def get_head(name: str) -> type[nn.Module]:
    try:
        return HEADS[name]
    except KeyError:
        raise ConfigError(f"unknown head {name!r}: choose one of "
                          f"{', '.join(sorted(HEADS))}") from None


def logsumexp(x: jax.Array) -> jax.Array:
    """log(sum(exp(x))) over the last axis, shifted by its (constant) maximum.

    The same math as `jax.nn.logsumexp`; written out because XLA on CPU runs this form,
    on 2-D [rows, V] logits, markedly faster forward and backward (BENCHMARKS.md).
    """
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    return (m + jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def decoder_logits(context: jax.Array, embedding: jax.Array, bias: jax.Array,
                   dtype) -> jax.Array:
    """`context @ embedding^T + bias` as one 2-D matmul: [..., D] -> [..., V]."""
    flat = context.reshape(-1, context.shape[-1])
    logits = dot(flat, embedding.T, dtype) + bias
    return logits.reshape(*context.shape[:-1], embedding.shape[0])


def log_normalisers(context: jax.Array, embedding: jax.Array, bias: jax.Array,
                    dtype, vocab_chunk=0) -> tuple[jax.Array, jax.Array | None]:
    """`(lse, logits)` of `context @ embedding^T + bias` for context [..., D].

    `lse` [...] float32; `logits` [..., V] on the plain path, None when streamed.
    """
    rows = int(np.prod(context.shape[:-1]))
    chunk = resolve_chunk(vocab_chunk, rows, embedding.shape[0])
    if chunk:
        flat = context.reshape(rows, context.shape[-1])
        lse = chunked_logsumexp(flat, embedding, bias, chunk, jnp.dtype(dtype))
        return lse.reshape(context.shape[:-1]), None
    logits = decoder_logits(context, embedding, bias, dtype)
    return logsumexp(logits), logits


def _softmax_output(context: jax.Array, embedding: jax.Array, bias: jax.Array,
                    targets: jax.Array | None, return_logprobs: bool,
                    dtype, vocab_chunk=0) -> HeadOutput:
    """log softmax(context @ embedding^T + bias) for context [..., D]."""
    lse, logits = log_normalisers(context, embedding, bias, dtype,
                                  0 if return_logprobs else vocab_chunk)
    target_lp = None
    if targets is not None:
        target_logit = jnp.einsum("...d,...d->...", context.astype(jnp.float32),
                                  jnp.take(embedding, targets, axis=0))
        target_lp = target_logit + jnp.take(bias, targets) - lse
    return HeadOutput(target_lp, logits - lse[..., None] if return_logprobs else None)


@register_head("softmax")
class Softmax(nn.Module):
    """The plain tied softmax: `log softmax(hidden @ E^T + b)`; needs H == D."""

    n_experts: int = 1
    dropoutl: float = 0.0
    dtype: jnp.dtype = jnp.float32
    vocab_chunk: int | str = 0

    @nn.compact
    def __call__(self, hidden, embedding, targets=None, *, deterministic=True,
                 return_logprobs=False) -> HeadOutput:
        if hidden.shape[-1] != embedding.shape[-1]:
            raise ConfigError(
                f"the softmax head ties its decoder to the embedding, so the last "
                f"layer's size (nhidlast={hidden.shape[-1]}) must equal emsize "
                f"({embedding.shape[-1]}): set model.nhidlast = model.emsize")
        bias = self.param("decoder_bias", nn.initializers.zeros, (embedding.shape[0],))
        return _softmax_output(hidden, embedding, bias, targets, return_logprobs,
                               self.dtype, self.vocab_chunk)


class _Mixture(nn.Module):
    """Shared parameters of the mixture heads: prior, latent projection, bias."""

    n_experts: int = 15
    dropoutl: float = 0.0
    dtype: jnp.dtype = jnp.float32
    vocab_chunk: int | str = 0

    def mixture(self, hidden, embedding, deterministic):
        """Log prior [T, B, E], latent [T, B, E, D] (after dropout), decoder bias."""
        n_in, d = hidden.shape[-1], embedding.shape[-1]
        init = uniform_init(n_in ** -0.5)
        prior_kernel = self.param("prior_kernel", init, (n_in, self.n_experts))
        latent_kernel = self.param("latent_kernel", init, (n_in, self.n_experts * d))
        latent_bias = self.param("latent_bias", init, (self.n_experts * d,))
        bias = self.param("decoder_bias", nn.initializers.zeros, (embedding.shape[0],))
        log_prior = jax.nn.log_softmax(dot(hidden, prior_kernel, self.dtype), axis=-1)
        latent = jnp.tanh(dot(hidden, latent_kernel, self.dtype) + latent_bias)
        rng = None if deterministic or self.dropoutl == 0.0 else self.make_rng("dropout")
        latent = locked_dropout(latent, self.dropoutl, rng)
        return log_prior, latent.reshape(*latent.shape[:-1], self.n_experts, d), bias


@register_head("mos")
class MixtureOfSoftmaxes(_Mixture):
    """Mixture of softmaxes, in log space (SPEC.md section 2, step 5).

    `log p(w) = logsumexp_e(log prior_e + log_softmax(latent_e @ E^T + b)_w)`. Target
    log-probabilities need only the per-expert log-normalisers and target logits, so no
    [T, B, E, V] log-softmax is kept beyond what the normalisers need.
    """

    @nn.compact
    def __call__(self, hidden, embedding, targets=None, *, deterministic=True,
                 return_logprobs=False) -> HeadOutput:
        log_prior, latent, bias = self.mixture(hidden, embedding, deterministic)
        # [T, B, E] normalisers; logits [T, B, E, V] unless streamed
        lse, logits = log_normalisers(latent, embedding, bias, self.dtype,
                                      0 if return_logprobs else self.vocab_chunk)
        target_lp = None
        if targets is not None:
            target_emb = jnp.take(embedding, targets, axis=0)  # [T, B, D]
            target_logit = jnp.einsum("tbed,tbd->tbe", latent.astype(jnp.float32),
                                      target_emb) + jnp.take(bias, targets)[..., None]
            target_lp = jax.nn.logsumexp(log_prior + target_logit - lse, axis=-1)
        logprobs = None
        if return_logprobs:
            logprobs = jax.nn.logsumexp(
                (log_prior - lse)[..., None] + logits, axis=-2)
        return HeadOutput(target_lp, logprobs)


@register_head("moc")
class MixtureOfContexts(_Mixture):
    """The paper's MoC baseline: `softmax((sum_e prior_e latent_e) @ E^T + b)`."""

    @nn.compact
    def __call__(self, hidden, embedding, targets=None, *, deterministic=True,
                 return_logprobs=False) -> HeadOutput:
        log_prior, latent, bias = self.mixture(hidden, embedding, deterministic)
        context = jnp.einsum("tbe,tbed->tbd", jnp.exp(log_prior), latent)
        return _softmax_output(context, embedding, bias, targets, return_logprobs,
                               self.dtype, self.vocab_chunk)
