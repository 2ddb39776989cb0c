"""Dynamic evaluation against a plain step-by-step implementation, and its properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from mos_jax import batching, dynamic_eval, evaluate, model

CONFIG = model.ModelConfig(vocab_size=23, emsize=6, nhid=8, nhidlast=6, nlayers=2,
                           n_experts=3)


@pytest.fixture(scope="module")
def setup():
    params = model.init_params(CONFIG, jax.random.key(0))
    # Larger weights than the init, so that updates change the scores visibly.
    params = jax.tree_util.tree_map(lambda p: p * 4.0, params)
    rng = np.random.default_rng(0)
    train_ids = rng.integers(0, 23, size=3 * 40 + 2)  # 3 columns x 40 rows
    eval_ids = rng.integers(0, 23, size=63)  # 62 targets: 12 windows of 5 and one of 2
    return params, train_ids, eval_ids


@jax.jit
def window_grad(p, carry, x, y):
    """Gradient of one window's mean NLL, with its log-probs and new carry."""
    def loss(p):
        out = model.apply(CONFIG, p, x, carry, y)
        return -jnp.mean(out.target_logprobs), (out.target_logprobs, out.carry)
    return jax.grad(loss, has_aux=True)(p)


def plain_statistics(params, ids, batch_size, bptt, lamb):
    """docs/reference.md section 4, step 1, one window at a time in Python."""
    rows = batching.batchify(ids, batch_size)
    carry = model.init_carry(CONFIG, batch_size)
    ms = jax.tree_util.tree_map(np.zeros_like, params)
    for i, length in ref.eval_windows(len(rows), bptt):
        x, y = rows[i:i + length], rows[i + 1:i + 1 + length]
        g, (_, carry) = window_grad(params, carry, x, y)
        ms = jax.tree_util.tree_map(lambda m, gg: m + np.asarray(gg, np.float64) ** 2, ms, g)
    ms = jax.tree_util.tree_map(np.sqrt, ms)
    gsum = sum(m.mean() for m in jax.tree_util.tree_leaves(ms))
    decrate = jax.tree_util.tree_map(lambda m: np.minimum(m / gsum, 1 / lamb), ms)
    return ms, decrate


def plain_dynamic_eval(params, ms, decrate, ids, lr, lamb, eps, bptt):
    rows = batching.batchify(ids, 1)
    carry = model.init_carry(CONFIG, 1)
    theta0 = jax.tree_util.tree_map(np.asarray, params)
    theta = theta0
    scores = []
    for i, length in ref.eval_windows(len(rows), bptt):
        x, y = rows[i:i + length], rows[i + 1:i + 1 + length]
        g, (logp, carry) = window_grad(theta, carry, x, y)
        scores.append(np.asarray(logp))
        theta = jax.tree_util.tree_map(  # in NumPy (float32), not op by op in JAX
            lambda t, t0, d, m, gg: t + lamb * np.asarray(d) * (t0 - t)
            - lr * np.asarray(gg) / (np.asarray(m) + eps),
            theta, theta0, decrate, ms, g)
    return np.concatenate(scores), theta


def test_matches_the_plain_implementation(setup):
    params, train_ids, eval_ids = setup
    stats = dynamic_eval.gradient_statistics(CONFIG, params, train_ids, lamb=0.02,
                                             batch_size=3, bptt=5)
    ms, decrate = plain_statistics(params, train_ids, 3, 5, 0.02)
    assert stats.windows == 8  # 39 targets a column: 7 windows of 5 and one of 4
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                           stats.ms, ms)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                           stats.decrate, decrate)
    kw = dict(lr=0.02, lamb=0.02, epsilon=0.001, bptt=5)
    result = dynamic_eval.dynamic_evaluate(CONFIG, params, stats.ms, stats.decrate,
                                           eval_ids, **kw)
    # The same (float32) statistics into both, so this compares the evaluation pass.
    want_scores, want_theta = plain_dynamic_eval(params, stats.ms, stats.decrate, eval_ids,
                                                 0.02, 0.02, 0.001, 5)
    assert result.token_logprobs.shape == (62, 1)
    np.testing.assert_allclose(result.token_logprobs, want_scores, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                           result.params, want_theta)
    assert result.perplexity == pytest.approx(np.exp(-want_scores.mean()), rel=1e-5)
    # The updates matter: dynamic scores differ from static ones.
    static = evaluate.token_logprobs(CONFIG, params, eval_ids, 1, 5)
    assert np.abs(result.token_logprobs - static).max() > 1e-3


def test_zero_lr_is_static_evaluation(setup):
    params, train_ids, eval_ids = setup
    stats = dynamic_eval.gradient_statistics(CONFIG, params, train_ids, batch_size=3)
    result = dynamic_eval.dynamic_evaluate(CONFIG, params, stats.ms, stats.decrate,
                                           eval_ids, lr=0.0)
    static = evaluate.token_logprobs(CONFIG, params, eval_ids, 1, 5)
    np.testing.assert_allclose(result.token_logprobs, static, atol=1e-6)


def test_full_decay_pulls_back_to_theta0_each_update(setup):
    params, train_ids, eval_ids = setup
    stats = dynamic_eval.gradient_statistics(CONFIG, params, train_ids, batch_size=3)
    lamb = 0.5
    ones = jax.tree_util.tree_map(lambda d: jnp.full_like(d, 1 / lamb), stats.decrate)
    # lambda * decrate = 1: theta_{k+1} = theta0 - lr g_k / (MS + eps); with lr = 0 every
    # update lands exactly on theta0.
    back = dynamic_eval.dynamic_evaluate(CONFIG, params, stats.ms, ones, eval_ids,
                                         lr=0.0, lamb=lamb)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b),
                           back.params, params)
    # With lr > 0, the last update starts from theta0 whatever came before: equal to one
    # plain step from theta0 with the last window's gradient at the carried state.
    moved = dynamic_eval.dynamic_evaluate(CONFIG, params, stats.ms, ones, eval_ids,
                                          lr=0.01, lamb=lamb)
    # The plain loop up to the last window: its weights and carry, then its gradient.
    rows = batching.batchify(eval_ids, 1)
    windows = list(ref.eval_windows(len(rows), 5))
    theta, carry = params, model.init_carry(CONFIG, 1)
    for n, (i, length) in enumerate(windows):
        x, y = rows[i:i + length], rows[i + 1:i + 1 + length]
        g, (_, next_carry) = window_grad(theta, carry, x, y)
        if n == len(windows) - 1:
            break
        carry = next_carry
        theta = jax.tree_util.tree_map(
            lambda t, t0, d, m, gg: np.asarray(t) + lamb * np.asarray(d) * (
                np.asarray(t0) - np.asarray(t)) - 0.01 * np.asarray(gg) / (np.asarray(m) + 1e-3),
            theta, params, ones, stats.ms, g)
    want = jax.tree_util.tree_map(
        lambda p0, m, gg: np.asarray(p0) - 0.01 * np.asarray(gg) / (np.asarray(m) + 1e-3),
        params, stats.ms, g)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           moved.params, want)


def test_decrate_is_clipped_and_rms_variant(setup):
    params, train_ids, _ = setup
    summed = dynamic_eval.gradient_statistics(CONFIG, params, train_ids, batch_size=3,
                                              lamb=0.02)
    clipped = dynamic_eval.gradient_statistics(CONFIG, params, train_ids, batch_size=3,
                                               lamb=2.0)
    top = max(float(d.max()) for d in jax.tree_util.tree_leaves(summed.decrate))
    assert top > 0.5  # so a clip at 1/2 bites
    assert max(float(d.max()) for d in jax.tree_util.tree_leaves(clipped.decrate)) == 0.5
    rms = dynamic_eval.gradient_statistics(CONFIG, params, train_ids, batch_size=3, rms=True)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b / np.sqrt(summed.windows), rtol=1e-5),
        rms.ms, summed.ms)
    capped = dynamic_eval.gradient_statistics(CONFIG, params, train_ids, batch_size=3,
                                              max_batches=3)
    assert capped.windows == 3


def test_cached_statistics_refuse_a_non_positive_lambda(setup, tmp_path):
    params = setup[0]
    rng = np.random.default_rng(5)
    ms = jax.tree_util.tree_map(lambda p: rng.uniform(0.5, 2.0, p.shape).astype(np.float32),
                                params)
    path = tmp_path / "stats.npz"
    dynamic_eval.save_statistics(path, dynamic_eval.GradientStatistics(ms, ms, 7))
    for lamb in (0.0, -1.0):  # as gradient_statistics does before its pass
        with pytest.raises(dynamic_eval.ConfigError, match="lamb must be positive"):
            dynamic_eval.load_statistics(path, params, lamb)
    loaded = dynamic_eval.load_statistics(path, params, 2.0)
    gsum = sum(float(np.mean(m, dtype=np.float64)) for m in jax.tree_util.tree_leaves(ms))
    assert loaded.windows == 7
    jax.tree_util.tree_map(lambda d, m: np.testing.assert_allclose(
        d, np.minimum(m / gsum, 0.5), rtol=1e-6), loaded.decrate, ms)


def test_command_caches_statistics(tiny_run, capsys):
    import json

    from mos_jax import cli, train
    w = str(tiny_run)  # the only test that runs dynamic-eval on it: no cache yet
    capsys.readouterr()
    args = ["dynamic-eval", "--workdir", w, "--preset", "ptb", "--lr", "0.01",
            "--stats-batch-size", "10"]
    assert cli.main(args) == 0
    first = capsys.readouterr()
    assert "gradient statistics from" not in first.err
    assert cli.main(args + ["--lamb", "0.5"]) == 0  # another lambda: same statistics
    second = capsys.readouterr()
    assert "gradient statistics from" in second.err
    a = json.loads(first.out.strip().splitlines()[-1])
    b = json.loads(second.out.strip().splitlines()[-1])
    assert (a["lamb"], a["epsilon"], b["lamb"]) == (0.075, 0.001, 0.5)
    _, corpus, config, params = train.load_best(w)
    stats = dynamic_eval.gradient_statistics(config, params, corpus.train, lamb=0.075,
                                             batch_size=10)
    direct = dynamic_eval.dynamic_evaluate(config, params, stats.ms, stats.decrate,
                                           corpus.test, lr=0.01, lamb=0.075, epsilon=0.001)
    assert a["ppl"] == pytest.approx(direct.perplexity, rel=1e-6)
    assert a["tokens"] == len(corpus.test) - 1


def test_statistics_file_names_the_weights_the_training_corpus_and_the_settings(tmp_path):
    import argparse

    from mos_jax import cli
    args = argparse.Namespace(stats_batch_size=100, bptt=5, max_batches=None, rms=False)
    params = {"w": np.arange(6, dtype=np.float32)}
    ids = np.arange(50, dtype=np.int32)
    base = cli._statistics_file(tmp_path, params, ids, args)
    assert base.parent == tmp_path / "dynamic_eval" and base.suffix == ".npz"
    assert cli._statistics_file(tmp_path, {"w": params["w"].copy()}, ids.copy(), args) == base
    other_corpus = ids.copy()
    other_corpus[7] = 8  # one token differs
    other_weights = {"w": params["w"] + np.float32(1e-6)}
    names = {cli._statistics_file(tmp_path, params, other_corpus, args),
             cli._statistics_file(tmp_path, other_weights, ids, args),
             cli._statistics_file(tmp_path, params, ids,
                                  argparse.Namespace(**{**vars(args), "rms": True})),
             cli._statistics_file(tmp_path, params, ids,
                                  argparse.Namespace(**{**vars(args), "max_batches": 3}))}
    assert base not in names and len(names) == 4


def test_the_command_takes_the_presets_of_dynamic_eval(tmp_path, capsys):
    from mos_jax import cli
    assert set(dynamic_eval.PRESETS) == {"default", "ptb", "wt2"}
    assert cli.main(["dynamic-eval", "--workdir", str(tmp_path), "--preset", "wt3"]) == 2
    assert capsys.readouterr().err == "error: --preset wt3: choose one of default, ptb, wt2\n"
