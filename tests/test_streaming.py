"""The streaming (vocabulary-chunked) head against the plain one and against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import model, streaming
from mos_jax.errors import ConfigError


def numpy_lse_and_grads(x, emb, bias, g):
    """float64 logsumexp of x @ emb^T + bias and the gradients of sum(g * lse)."""
    x, emb, bias, g = (np.asarray(a, np.float64) for a in (x, emb, bias, g))
    logits = x @ emb.T + bias
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    p = np.exp(logits - lse[:, None]) * g[:, None]  # d/dlogits of sum(g * lse)
    return lse, p @ emb, p.T @ x, p.sum(0)


@pytest.mark.parametrize("chunk", [1, 4, 7, 10, 29])  # divides V=28 or not, or > V
def test_chunked_logsumexp_matches_numpy_forward_and_gradients(chunk):
    rng = np.random.default_rng(chunk)
    n, d, v = 9, 5, 28
    x = rng.normal(size=(n, d)).astype(np.float32) * 2
    emb = rng.normal(size=(v, d)).astype(np.float32)
    bias = rng.normal(size=v).astype(np.float32)
    g = rng.normal(size=n).astype(np.float32)

    def f(x, emb, bias):
        return jnp.sum(streaming.chunked_logsumexp(x, emb, bias, chunk) * g)

    lse = jax.jit(streaming.chunked_logsumexp, static_argnums=3)(x, emb, bias, chunk)
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, emb, bias)
    want_lse, *want_grads = numpy_lse_and_grads(x, emb, bias, g)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-5)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_large_logits_do_not_overflow():
    x = jnp.full((2, 1), 100.0)
    emb = jnp.array([[1.0], [0.5], [-1.0]])
    lse = streaming.chunked_logsumexp(x, emb, jnp.zeros(3), 2)
    want = 100 + np.log(1 + np.exp(-50) + np.exp(-200))
    np.testing.assert_allclose(lse, [want, want], rtol=1e-7)


def test_resolve_chunk():
    assert streaming.resolve_chunk(0, 10, 100) == 0
    assert streaming.resolve_chunk(16, 10, 100) == 16
    assert streaming.resolve_chunk(100, 10, 100) == 0  # one chunk is the plain path
    big_rows = -(-streaming.AUTO_MIN_LOGITS_BYTES // (4 * 10000))
    assert streaming.resolve_chunk("auto", big_rows, 10000) == 4096  # [1678, 10000]
    assert streaming.resolve_chunk("auto", big_rows // 2, 10000) == 0
    # PTB training, [12600, 10000] logits: ~64 MB chunks, a multiple of 128 words
    assert streaming.resolve_chunk("auto", 12600, 10000) == 1280
    assert streaming.resolve_chunk("auto", 10 ** 6, 10000) == 256


def _config(head, chunk):
    return model.ModelConfig(vocab_size=37, emsize=6, nhid=8, nhidlast=6, nlayers=1,
                             n_experts=3, head=head, dropoute=0.0,
                             compute_dtype="float32", vocab_chunk=chunk)


@pytest.mark.parametrize("head", ["mos", "softmax"])  # moc: the softmax head's code
def test_streamed_and_fused_heads_equal_the_plain_head(head):
    # 37 words in chunks of 8: 4 full chunks and a short one; "fused": the training
    # loss and its gradients in one pass over row chunks (mos_jax.fused)
    params = model.init_params(_config(head, 0), jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    seq = jnp.asarray(rng.integers(0, 37, size=(7, 3)))
    carry = model.init_carry(_config(head, 0), 3)
    key = jax.random.PRNGKey(5)  # the same dropout masks on every path

    def loss_and_grads(chunk):
        cfg = _config(head, chunk)

        def f(params):  # the mean NLL of every target (length 5 of 6), plus AR/TAR
            return model.regularized_loss(cfg, params, seq[:-1], seq[1:], carry, 2.0,
                                          1.0, rng=key, length=5)[0]
        return jax.jit(jax.value_and_grad(f))(params)

    l0, g0 = loss_and_grads(0)
    for chunk in (8, "fused"):
        l1, g1 = loss_and_grads(chunk)
        np.testing.assert_allclose(l1, l0, rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_vocab_chunk_and_dtype_config_are_checked():
    assert model.ModelConfig(vocab_size=5, vocab_chunk="128").vocab_chunk == 128
    assert model.ModelConfig(vocab_size=5, vocab_chunk="AUTO").vocab_chunk == "auto"
    with pytest.raises(ConfigError, match="vocab_chunk"):
        model.ModelConfig(vocab_size=5, vocab_chunk="big")
    with pytest.raises(ConfigError, match="compute_dtype"):
        model.ModelConfig(vocab_size=5, compute_dtype="int8")
    cpu = jax.default_backend() == "cpu"
    assert model.ModelConfig(vocab_size=5).dtype == (jnp.float32 if cpu else jnp.bfloat16)
