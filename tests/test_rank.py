"""Log-probability matrices and their empirical rank (mos_jax.rank)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import model, rank
from mos_jax.errors import MosJaxError

V, D = 80, 8
NO_DROPOUT = dict(dropout=0.0, dropouth=0.0, dropouti=0.0, dropoute=0.0, dropoutl=0.0,
                  wdrop=0.0)
jit_apply = jax.jit(model.apply, static_argnums=0, static_argnames="return_logprobs")


def make(head, n_experts=1, nlayers=2, scale=1.0, bias_scale=0.0, seed=0):
    """A config and random weights; `scale` multiplies every weight (sharper outputs)."""
    config = model.ModelConfig(vocab_size=V, emsize=D, nhid=16, nhidlast=D if head ==
                               "softmax" else 12, nlayers=nlayers, head=head,
                               n_experts=n_experts, **NO_DROPOUT)
    params = model.init_params(config, jax.random.key(seed))
    params = jax.tree_util.tree_map(lambda x: x * scale, params)
    bias = bias_scale * jax.random.normal(jax.random.key(seed + 1), (V,))
    params["head"]["decoder_bias"] = params["head"]["decoder_bias"] + bias
    return config, params


def stream(n, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=n).astype(np.int32)


# ------------------------------------------------------------------ empirical_rank

@pytest.mark.parametrize("k", [1, 3, 17, 40])
def test_rank_of_products_of_known_rank(k):
    rng = np.random.default_rng(k)
    a = (rng.standard_normal((120, k)) @ rng.standard_normal((k, V))).astype(np.float32)
    assert rank.empirical_rank(a).rank == k
    # Exact float64 products with float64's epsilon, too.
    b = rng.standard_normal((120, k)) @ rng.standard_normal((k, V))
    assert rank.empirical_rank(b, eps=np.finfo(np.float64).eps).rank == k


def test_full_rank_and_zero_matrices():
    a = np.random.default_rng(0).standard_normal((50, 30)).astype(np.float32)
    assert rank.empirical_rank(a).rank == 30
    assert rank.empirical_rank(a.T).rank == 30
    assert rank.empirical_rank(np.zeros((5, 4), np.float32)).rank == 0


def test_threshold_follows_numerical_recipes_with_float32_epsilon():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((60, 25)).astype(np.float32)
    s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    want = 0.5 * np.sqrt(60 + 25 + 1) * s[0] * np.finfo(np.float32).eps
    got = rank.empirical_rank(a)
    assert got.threshold == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(got.singular_values, s, rtol=1e-12)
    # A float64 matrix is taken as widened float32 results: same threshold.
    assert rank.empirical_rank(a.astype(np.float64)).threshold == pytest.approx(want)
    # An explicit tolerance wins.
    assert rank.empirical_rank(a, tol=s[9] * 1.0001).rank == 9


def test_rank_is_blind_to_float32_round_off_but_not_to_real_structure():
    rng = np.random.default_rng(2)
    low = rng.standard_normal((100, 6)) @ rng.standard_normal((6, 50))
    noisy = low.astype(np.float32)  # float32 round-off adds a full-rank ~1e-7 part
    assert rank.empirical_rank(noisy).rank == 6
    assert rank.empirical_rank(low + 1e-3 * rng.standard_normal(low.shape)).rank == 50


def test_bad_matrices_are_errors():
    with pytest.raises(MosJaxError, match="2-D"):
        rank.empirical_rank(np.zeros(3))
    with pytest.raises(MosJaxError, match="non-finite"):
        rank.empirical_rank(np.array([[0.0, -np.inf]]))


# ------------------------------------------------------------------ logprob_matrix

def test_logprob_matrix_rows_are_the_models_log_probabilities():
    config, params = make("mos", n_experts=3, scale=3.0)
    ids = stream(150)
    n = 100
    # Windows of 16 (the last one padded), carry passed across: as one 100-step pass.
    got = rank.logprob_matrix(config, params, ids, n, bptt=16)
    assert got.shape == (n, V) and got.dtype == np.float32
    want = jit_apply(config, params, jnp.asarray(ids[:n, None]),
                     model.init_carry(config, 1), return_logprobs=True).logprobs[:, 0]
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    # With 3 columns, column j holds positions 34j..34j+33, each from a zero carry
    # (the last column's 2 padded steps come after its real ones, so they change
    # nothing).
    got3 = rank.logprob_matrix(config, params, ids, n, batch_size=3, bptt=16)
    columns = np.concatenate([ids[:n], np.zeros(2, np.int32)]).reshape(3, 34).T
    want3 = jit_apply(config, params, jnp.asarray(columns), model.init_carry(config, 3),
                      return_logprobs=True).logprobs  # [34, 3, V]
    want3 = np.asarray(want3).transpose(1, 0, 2).reshape(102, V)[:n]
    np.testing.assert_allclose(got3, want3, atol=2e-5)


def test_logprob_matrix_argument_errors():
    config = model.ModelConfig(vocab_size=V, emsize=D, nhidlast=D, head="softmax")
    params = None  # the arguments are checked before the weights are needed
    with pytest.raises(MosJaxError, match="n_contexts"):
        rank.logprob_matrix(config, params, stream(10), 11)
    with pytest.raises(MosJaxError, match="1-D"):
        rank.logprob_matrix(config, params, stream(10).reshape(2, 5), 4)


# ------------------------------------------------------------------ the bottleneck

def test_softmax_rank_is_at_most_d_plus_2():
    ids = stream(3 * V, seed=3)
    # Decoder bias zero (as initialised): log p = [H, -lse] [E, 1]^T has rank d + 1.
    config, params = make("softmax", scale=4.0)
    matrix = rank.logprob_matrix(config, params, ids, 3 * V, bptt=64)
    assert rank.empirical_rank(matrix).rank == D + 1
    # Independently: the rows are log_softmax(H E^T + b) of the encoder's outputs H.
    out = jit_apply(config, params, jnp.asarray(ids[:, None]), model.init_carry(config, 1))
    h = np.asarray(out.output[:, 0], np.float64)
    emb = np.asarray(params["embedding"], np.float64)
    logits = h @ emb.T
    want = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(matrix, want, atol=2e-5)
    # With a bias, [H, 1, -lse] [E, b, 1]^T: rank d + 2, never more.
    config, params = make("softmax", scale=4.0, bias_scale=1.0)
    matrix = rank.logprob_matrix(config, params, ids, 3 * V, bptt=64)
    assert rank.empirical_rank(matrix).rank == D + 2


def test_mos_rank_goes_far_above_d():
    config, params = make("mos", n_experts=6, scale=6.0)
    ids = stream(3 * V, seed=4)
    matrix = rank.logprob_matrix(config, params, ids, 3 * V, bptt=64)
    result = rank.empirical_rank(matrix)
    assert result.rank >= V - 2  # full rank, up to the smallest singular values
    assert result.rank > 4 * (D + 2)
