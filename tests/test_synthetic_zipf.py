"""The sparse Zipfian synthetic chain (`data.synthetic.structure = zipf`), checked
against dense float64 NumPy computations written here."""

import numpy as np
import pytest

from mos_jax import config as config_lib
from mos_jax import data
from mos_jax import train
from mos_jax.errors import ConfigError, DataError


def dense_transition(chain):
    """P[i, j] = (1 - eps) sum_k [succ[i, k] = j] w[i, k] + eps u[j], with a loop."""
    v, m = chain.successors.shape
    p = np.tile(chain.smoothing * chain.unigram, (v, 1))
    for i in range(v):
        for k in range(m):
            p[i, chain.successors[i, k]] += (1 - chain.smoothing) * chain.weights[i, k]
    return p


@pytest.mark.parametrize("eps", [0.1, 1.0, 0.0])
def test_stationary_and_entropy_rate_match_dense_float64(eps):
    chain = data.make_zipf_chain(50, zipf_exponent=1.1, successors=4, smoothing=eps,
                                 peakedness=1.5, seed=3)
    p = dense_transition(chain)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.exp(chain.log_rows(np.arange(50))), p, atol=1e-15)
    # pi from the stationary equations pi (P - I) = 0, sum pi = 1, by least squares
    # (eps = 0: the chain may have several closed classes; then check pi P = pi only).
    pi = chain.stationary
    np.testing.assert_allclose(pi @ p, pi, atol=1e-12)
    if eps > 0:
        a = np.vstack([(p - np.eye(50)).T, np.ones(50)])
        ref = np.linalg.lstsq(a, np.r_[np.zeros(50), 1.0], rcond=None)[0]
        np.testing.assert_allclose(pi, ref, atol=1e-12)
    assert np.all(np.diff(pi) <= 0)  # ids in decreasing stationary frequency
    cur, nxt = np.repeat(np.arange(50), 50), np.tile(np.arange(50), 50)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(chain.log_prob(cur, nxt), np.log(p[cur, nxt]),
                                   atol=1e-13)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    assert chain.entropy_rate == pytest.approx(float(pi @ h), rel=1e-12, abs=1e-14)
    if eps == 1.0:  # every row is u
        u = chain.unigram
        assert chain.entropy_rate == pytest.approx(-(u * np.log(u)).sum(), rel=1e-12)


def test_unigram_is_zipf():
    chain = data.make_zipf_chain(30, zipf_exponent=1.3, successors=3, smoothing=0.2)
    # ids are renumbered by pi; as a set the unigram is (j + 1)^-1.3, normalised
    ref = np.arange(1, 31, dtype=np.float64) ** -1.3
    np.testing.assert_allclose(np.sort(chain.unigram)[::-1], ref / ref.sum(), rtol=1e-12)


def test_sampled_bigrams_match_the_transition_matrix():
    chain = data.make_zipf_chain(12, zipf_exponent=1.0, successors=3, smoothing=0.15,
                                 peakedness=1.0, seed=1)
    p = dense_transition(chain)
    x = chain.sample(300_000, np.random.default_rng(0))
    counts = np.zeros((12, 12))
    np.add.at(counts, (x[:-1], x[1:]), 1)
    rows = counts.sum(axis=1)
    freq = counts / rows[:, None]
    sigma = np.sqrt(p * (1 - p) / rows[:, None])
    assert np.all(np.abs(freq - p) <= 5 * sigma + 1e-3)
    sigma_pi = np.sqrt(chain.stationary / len(x)) * 10  # correlated draws: generous
    assert np.all(np.abs(rows / rows.sum() - chain.stationary) <= 5 * sigma_pi + 1e-3)


def test_corpus_is_deterministic_and_carries_its_entropy_rate():
    kw = dict(vocab_size=300, train_tokens=2000, valid_tokens=500, test_tokens=500,
              structure="zipf", successors=8, smoothing=0.1)
    a, b = data.synthetic_corpus(**kw), data.synthetic_corpus(**kw)
    c = data.synthetic_corpus(**kw, seed=1)
    for s in data.SPLITS:
        np.testing.assert_array_equal(a.split(s), b.split(s))
    assert not np.array_equal(a.train, c.train)
    assert a.entropy_rate == b.entropy_rate != c.entropy_rate
    chain = data.make_zipf_chain(300, successors=8, smoothing=0.1)
    assert a.entropy_rate == chain.entropy_rate
    assert a.vocab[:2] == ("w0", "w1") and a.train.dtype == np.int32
    # the config path: data.dir = synthetic with structure = zipf
    cfg = config_lib.default_config()
    cfg.data.dir = "synthetic"
    for key, value in kw.items():
        cfg.data.synthetic[key] = value
    config_lib.validate(cfg)
    np.testing.assert_array_equal(train.load_corpus_from(cfg).valid, a.valid)


def test_rank_frequency_slope_at_20k_words():
    chain = data.make_zipf_chain(20_000, zipf_exponent=1.0, successors=32, smoothing=0.1)
    ranks = np.arange(10, 1000)
    slope = np.polyfit(np.log(ranks + 1), np.log(chain.stationary[ranks]), 1)[0]
    assert -1.25 < slope < -0.85
    x = chain.sample(100_000, np.random.default_rng(0))
    counts = np.sort(np.bincount(x, minlength=20_000))[::-1]
    slope_counts = np.polyfit(np.log(ranks + 1), np.log(counts[ranks]), 1)[0]
    assert abs(slope_counts - slope) < 0.15


@pytest.mark.parametrize("kw, words", [
    (dict(zipf_exponent=0.0), "zipf_exponent must be a number > 0"),
    (dict(successors=0), "successors must be in [1, vocab_size = 40]"),
    (dict(successors=41), "successors must be in [1, vocab_size = 40]"),
    (dict(smoothing=1.5), "smoothing must be in [0, 1]"),
    (dict(smoothing=-0.1), "smoothing must be in [0, 1]"),
])
def test_bad_zipf_parameters_are_one_line_errors(kw, words):
    with pytest.raises(DataError) as e:
        data.synthetic_corpus(vocab_size=40, structure="zipf", **kw)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_dense_structure_refuses_a_large_vocabulary_and_names_zipf():
    with pytest.raises(DataError, match="structure=zipf"):
        data.synthetic_corpus(vocab_size=data.DENSE_MAX_VOCAB + 1)
    with pytest.raises(DataError, match="choose one of dense, zipf"):
        data.synthetic_chain(10, structure="sparse")


@pytest.mark.parametrize("key, value", [("structure", "sparse"), ("smoothing", 2.0),
                                        ("zipf_exponent", 0.0), ("successors", 0)])
def test_config_checks_the_zipf_keys(key, value):
    cfg = config_lib.default_config()
    cfg.data.synthetic[key] = value
    with pytest.raises(ConfigError, match=f"data.synthetic.{key}"):
        config_lib.validate(cfg)


def test_a_run_from_before_the_zipf_keys_resumes(tmp_path):
    """config.json of a synthetic run written before data.synthetic had the zipf keys
    compares as if they held their defaults (which is what that run used)."""
    import json
    cfg = config_lib.default_config()
    cfg.data.dir = "synthetic"
    saved = json.loads(config_lib.to_json(cfg))
    for key in ("structure", "zipf_exponent", "successors", "smoothing",
                "successor_peakedness"):
        del saved["data"]["synthetic"][key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    assert train._config_changes(cfg, tmp_path, print) == {}
    cfg.data.synthetic.structure = "zipf"
    with pytest.raises(ConfigError, match="data.synthetic"):
        train._config_changes(cfg, tmp_path, print)


def test_a_finetune_of_a_run_from_before_the_zipf_keys_resumes(tmp_path):
    """A finetune takes its data section from its run's config.json: one written
    before the zipf keys reads them as their defaults, so the finetune's own
    config.json has them and its resume compares equal."""
    import json
    cfg = config_lib.default_config()
    cfg.data.dir = "synthetic"
    saved = json.loads(config_lib.to_json(cfg))
    for key in ("structure", "zipf_exponent", "successors", "smoothing",
                "successor_peakedness"):
        del saved["data"]["synthetic"][key]
    source, work = tmp_path / "source", tmp_path / "finetune"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(saved))
    cfg.finetune.init_from = str(source)
    notes = []
    started = train._finetune_data(cfg, work, (), notes.append)
    assert notes == []  # nothing of the run's data differs from this config's
    assert started.data.synthetic.to_dict() == cfg.data.synthetic.to_dict()
    work.mkdir()
    (work / "config.json").write_text(json.dumps(train._saved_config(started)))
    (work / "checkpoints" / "1").mkdir(parents=True)
    resumed = train._finetune_data(cfg, work, (), notes.append)
    assert train._config_changes(resumed, work, notes.append) == {}
    # a finetune started before the zipf keys, resumed now
    saved["finetune"]["init_from"] = str(source)
    (work / "config.json").write_text(json.dumps(saved))
    resumed = train._finetune_data(cfg, work, (), notes.append)
    assert train._config_changes(resumed, work, notes.append) == {}


def test_true_rank_of_a_zipf_chain_uses_its_rows():
    from mos_jax import rank as rank_lib
    from mos_jax import study
    cfg = config_lib.default_config()
    cfg.data.dir = "synthetic"
    s = cfg.data.synthetic
    s.vocab_size, s.structure, s.successors = 60, "zipf", 3
    s.train_tokens = s.valid_tokens = s.test_tokens = 400
    corpus = data.synthetic_corpus(**s.to_dict())
    p = dense_transition(data.make_zipf_chain(60, successors=3))
    rows = np.log(p[corpus.valid[:40]])
    expected = rank_lib.empirical_rank(rows, eps=float(np.finfo(np.float64).eps)).rank
    assert study.true_rank(cfg, 40) == expected
    assert expected <= len(np.unique(corpus.valid[:40]))
