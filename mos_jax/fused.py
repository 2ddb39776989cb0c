"""The training loss of a mixture head, with its gradients, in one pass over row chunks.

`mixture_nll(latent, log_prior, embedding, bias, targets, weights, row_chunk)` is

    sum_n weights_n * -log p(targets_n),
    log p(w) = logsumexp_e(log_prior_e + log_softmax(latent_e @ embedding^T + bias)_w),

for N rows of E components (E = 1: a plain softmax), together with every target's
log-probability. Training needs exactly this: the loss is a weighted sum of target
log-probabilities with weights known before the forward pass (the valid-token mask
over the token count). So the forward pass of its `jax.custom_vjp` computes the
gradients too, chunk of rows by chunk of rows: each chunk's [rows, E, V] logits are made
once, turned into probabilities, used for the two gradient products, and dropped. That
is three matmuls per logit, as the plain path, but on cache-sized tensors and with no
[N, E, V] tensor ever alive: the streaming path (`mos_jax.streaming`) needs a fourth
matmul, to recompute logits in its backward pass.

`words` (static; None: every row): only the first `words` rows of the embedding are
words (a padded vocabulary, `model.vocab_multiple`); the logits of the others are set
to -inf once computed, so they carry no probability and get no gradient.

The backward pass scales the saved gradients by the loss's cotangent, which is exact
because the loss is a scalar. The target log-probabilities are returned beside the loss
with their gradient stopped (they are for metrics); differentiate the loss, not them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _pad_rows(x, rows):
    pad = rows - x.shape[0]
    if pad == 0:
        return x
    return jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])


def _chunk_pass(latent, log_prior, embedding, bias, targets, weights, row_chunk, dtype,
                with_grads, words=None):
    n, e, d = latent.shape
    c = -(-n // row_chunk)
    rows = c * row_chunk
    # Padding rows have weight 0 (and target 0): they add nothing to loss or gradients.
    lat = _pad_rows(latent, rows).reshape(c, row_chunk, e, d)
    lpr = _pad_rows(log_prior, rows).reshape(c, row_chunk, e)
    tgt = _pad_rows(targets, rows).reshape(c, row_chunk)
    wts = _pad_rows(weights, rows).reshape(c, row_chunk)
    emb_d = embedding.astype(dtype)
    v = embedding.shape[0]
    valid = None if words is None or words >= v else jnp.arange(v) < words

    def body(acc, xs):
        x, lp_e, t, w = xs
        flat = x.reshape(row_chunk * e, d).astype(dtype)
        z = jnp.matmul(flat, emb_d.T, preferred_element_type=jnp.float32) + bias
        if valid is not None:  # the rows past the last word: no probability
            z = jnp.where(valid, z, -jnp.inf)
        m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
        p = jnp.exp(z - m)
        s = jnp.sum(p, axis=-1, keepdims=True)
        lse = (m + jnp.log(s)).reshape(row_chunk, e)
        z_t = jnp.take_along_axis(z.reshape(row_chunk, e, v), t[:, None, None],
                                  axis=-1)[..., 0]
        a = lp_e + z_t - lse  # [R, E]: log prior_e + log softmax_e(target)
        lp = jax.nn.logsumexp(a, axis=-1)  # [R]
        if not with_grads:
            return acc, (lp, None, None)
        dem, dbi = acc
        coef = -w[:, None] * jnp.exp(a - lp[:, None])  # d loss / d a, [R, E]
        # d loss / d z = coef * (onehot(target) - softmax(z)); the one-hot part is a
        # scatter done once for all rows (below), the softmax part is `g` here.
        g = (p / s) * coef.reshape(-1, 1)  # [R*E, V]
        gd = g.astype(dtype)
        dx = -jnp.matmul(gd, emb_d, preferred_element_type=jnp.float32)
        dem = dem - jnp.matmul(gd.T, flat, preferred_element_type=jnp.float32)
        dbi = dbi - jnp.sum(g, axis=0)
        return (dem, dbi), (lp, dx.reshape(row_chunk, e, d), coef)

    acc = (jnp.zeros(embedding.shape, jnp.float32), jnp.zeros(bias.shape, jnp.float32))
    (dem, dbi), (lp, dx, coef) = jax.lax.scan(body, acc, (lat, lpr, tgt, wts))
    lp = lp.reshape(rows)[:n]
    loss = -jnp.sum(weights * lp)
    if not with_grads:
        return loss, lp, None
    coef = coef.reshape(rows, e)[:n]
    # The one-hot parts: d z_e[target] = coef_e for each row.
    emb_t = jnp.take(embedding, targets, axis=0)  # [N, D]
    dlatent = dx.reshape(rows, e, d)[:n] + coef[..., None] * emb_t[:, None, :]
    dem = dem + jax.ops.segment_sum(jnp.einsum("ne,ned->nd", coef, latent), targets,
                                    num_segments=v)
    dbi = dbi + jax.ops.segment_sum(jnp.sum(coef, axis=-1), targets, num_segments=v)
    grads = (dlatent.astype(latent.dtype), coef.astype(log_prior.dtype),
             dem.astype(embedding.dtype), dbi.astype(bias.dtype), -lp)
    return loss, lp, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def mixture_nll(latent, log_prior, embedding, bias, targets, weights, row_chunk: int,
                dtype=jnp.float32, words: int | None = None):
    """`(loss, target_logprobs)`: loss = -sum(weights * target_logprobs), a scalar.

    latent [N, E, D], log_prior [N, E] (log-softmaxed), embedding [V, D], bias [V],
    targets [N] int, weights [N] float32; `row_chunk` rows (of E components each) per
    chunk; `dtype` the matmul operand type; `words` the rows of `embedding` that are
    words (None: all). Differentiable in every float argument through the loss only.
    """
    loss, lp, _ = _chunk_pass(latent, log_prior, embedding, bias, targets, weights,
                              row_chunk, dtype, with_grads=False, words=words)
    return loss, jax.lax.stop_gradient(lp)


def _fwd(latent, log_prior, embedding, bias, targets, weights, row_chunk, dtype, words):
    loss, lp, grads = _chunk_pass(latent, log_prior, embedding, bias, targets, weights,
                                  row_chunk, dtype, with_grads=True, words=words)
    return (loss, jax.lax.stop_gradient(lp)), grads


def _bwd(row_chunk, dtype, words, residuals, cotangents):
    dlatent, dprior, demb, dbias, dweights = residuals
    g, _ = cotangents  # the target log-probabilities carry no gradient (see above)
    scale = lambda x: (g * x).astype(x.dtype)  # noqa: E731
    return (scale(dlatent), scale(dprior), scale(demb), scale(dbias), None,
            scale(dweights))


mixture_nll.defvjp(_fwd, _bwd)
