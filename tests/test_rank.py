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


# ------------------------------------------------------------------ the experiment

def test_default_contexts_rule():
    # As many as the vocabulary allows, when they fit.
    assert rank.default_contexts(50, 1_000) == (50, None)
    assert rank.default_contexts(10_000, 82_430, 4.0) == (10_000, None)  # PTB: 1.9 GB
    # Fewer tokens than words: all the tokens.
    assert rank.default_contexts(100, 30) == (30, None)
    # WikiText-2's 33,278 words: capped so 20 bytes per entry fit in 4 GiB.
    n, note = rank.default_contexts(33_278, 217_646, 4.0)
    assert n == 4 * 2**30 // (20 * 33_278) == 6453
    assert "capped at 6,453 (of 33,278)" in note and "--max-memory-gb" in note
    assert rank.matrix_gb(n, 33_278) <= 4.0 < rank.matrix_gb(n + 1, 33_278)
    with pytest.raises(MosJaxError, match="max-memory-gb"):
        rank.default_contexts(10_000, 82_430, 1e-6)
    with pytest.raises(MosJaxError, match="positive"):
        rank.default_contexts(10_000, 82_430, 0.0)


def test_analyse_reports_the_rank_of_the_logprob_matrix():
    config, params = make("softmax", scale=4.0, bias_scale=1.0)
    ids = stream(3 * V, seed=3)
    notes = []
    got = rank.analyse(config, params, ids, max_memory_gb=1.0, bptt=64, log=notes.append)
    assert got["rank"] == D + 2 and got["contexts"] == V and got["max_rank"] == V
    assert got["capped"] is None and got["hidden_size"] == D and got["head"] == "softmax"
    matrix = rank.logprob_matrix(config, params, ids, V, bptt=64).astype(np.float64)
    s = np.linalg.svd(matrix, compute_uv=False)
    np.testing.assert_allclose(got["singular_values"], s, rtol=1e-6, atol=1e-9)
    assert got["s_max"] == pytest.approx(s[0]) and got["s_min"] == got["singular_values"][-1]
    assert got["threshold"] == pytest.approx(
        0.5 * np.sqrt(2 * V + 1) * s[0] * np.finfo(np.float32).eps, rel=1e-6)
    # The default, capped: 30 contexts fit (20 bytes an entry), with a note.
    cap = 30.5 * 20 * V / 2**30
    got = rank.analyse(config, params, ids, max_memory_gb=cap, bptt=64, log=notes.append)
    assert got["contexts"] == 30 and got["max_rank"] == 30 and "capped at 30" in notes[-3]
    with pytest.raises(MosJaxError, match="--contexts"):
        rank.analyse(config, params, ids, 31, max_memory_gb=cap)


def test_plot_spectrum_writes_a_png(tmp_path):
    s = np.array([10.0, 1.0, 1e-3, 1e-9, 0.0])
    out = rank.plot_spectrum(s, 1e-6, tmp_path / "sub" / "s.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_command(tiny_run, tmp_path, capsys):
    import json

    from mos_jax import cli, train
    capsys.readouterr()
    out, png = tmp_path / "rank.json", tmp_path / "spectrum.png"
    assert cli.main(["rank", "--workdir", str(tiny_run), "--out", str(out),
                     "--plot", str(png)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads(out.read_text())
    assert printed.pop("out") == str(out) and printed == written
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written["plot"] == str(png)
    # The default contexts: min(V, valid tokens) = the 50 words of the tiny corpus.
    assert written["contexts"] == written["vocab_size"] == 50
    assert written["split"] == "valid" and written["capped"] is None
    # Independently: one forward pass over the first 50 valid words, and NumPy's rank
    # with the Numerical Recipes tolerance for float32 results.
    _, corpus, config, params = train.load_best(tiny_run)
    n = 50
    logp = jit_apply(config.replace(compute_dtype="float32"), params,
                     jnp.asarray(corpus.valid[:n, None]), model.init_carry(config, 1),
                     return_logprobs=True).logprobs[:, 0]
    matrix = np.asarray(logp, np.float64)
    s_max = np.linalg.norm(matrix, 2)
    tol = 0.5 * np.sqrt(n + corpus.vocab_size + 1) * s_max * np.finfo(np.float32).eps
    assert written["rank"] == np.linalg.matrix_rank(matrix, tol=tol)
    assert written["s_max"] == pytest.approx(s_max, rel=1e-5)
    assert written["threshold"] == pytest.approx(tol, rel=1e-5)
    # Default plot: in the work directory. Fewer contexts, on the test split.
    assert cli.main(["rank", "--workdir", str(tiny_run), "--contexts", "20",
                     "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["contexts"] == 20 and result["max_rank"] == 20
    assert (tiny_run / "rank_spectrum.png").is_file()
    # Over the memory cap: a one-line error.
    assert cli.main(["rank", "--workdir", str(tiny_run), "--contexts", "50",
                     "--max-memory-gb", "1e-6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--max-memory-gb" in err
