"""`mos-jax study` (mos_jax.study): widths x heads x encoders on a small synthetic chain."""

import json

import numpy as np
import pytest

from mos_jax import cli, study
from mos_jax import data as data_lib
from mos_jax.errors import ConfigError

WIDTHS = [4, 8]
TF_WIDTH = 6
HEADS = ["softmax", "mos"]
STEPS, EVALS = 6, 1
V = 40


def small_configs():
    """The default study's configs on a smaller chain (V = 40) with short windows."""
    configs = study.synthetic_configs()
    for c in configs.values():
        s = c.data.synthetic
        s.vocab_size, s.train_tokens, s.valid_tokens, s.test_tokens = V, 4000, 1200, 1200
        c.data.batch_size = 16
        c.data.eval_batch_size = c.data.test_batch_size = 10
        c.model.n_experts = 3
    return configs


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    """Every head at every width with the LSTM; the Transformer with softmax at one width
    (the same study: one table, one plot)."""
    workdir = tmp_path_factory.mktemp("study")
    lines = []
    configs = small_configs()
    summary = study.run_study({"lstm": configs["lstm"]}, HEADS, WIDTHS, workdir,
                              steps=STEPS, evals=EVALS, log=lines.append, isolate=False,
                              plot=False)
    tf = study.run_study({"transformer": configs["transformer"]}, ["softmax"], [TF_WIDTH],
                         workdir / "tf", steps=STEPS, evals=EVALS, log=lines.append,
                         isolate=False, plot=False)
    summary["rows"] += tf["rows"]
    summary["encoders"] += tf["encoders"]
    study.plot_study(summary, workdir / "study.png")
    return workdir, summary, lines


def test_every_encoder_head_and_width_has_a_row(studied):
    workdir, summary, lines = studied
    cells = [(r["encoder"], r["head"], r["width"]) for r in summary["rows"]]
    assert cells == [("lstm", h, w) for w in WIDTHS for h in HEADS] + [
        ("transformer", "softmax", TF_WIDTH)]
    table = (workdir / "study.md").read_text().splitlines()
    assert table == study.format_table({**summary, "rows": summary["rows"][:4],
                                        "encoders": ["lstm"]})
    assert all(line in lines for line in table)
    stored = json.loads((workdir / "study.json").read_text())
    assert stored["rows"] == summary["rows"][:4]
    for r in summary["rows"]:
        assert r["steps"] == STEPS and r["epochs"] == EVALS
        if r["encoder"] == "lstm":
            assert f"| {r['encoder']} | {r['head']} | {r['width']} | {r['params']:,} | " \
                   f"{r['valid_ppl']:.2f} | {r['rank']} |" in "\n".join(table)
    png = workdir / "study.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_width_is_the_one_that_bounds_the_softmax_rank(studied):
    _, summary, _ = studied
    for r in summary["rows"]:
        if r["head"] == "softmax":
            # A softmax over a d-vector plus a bias: log-probabilities of rank <= d + 2,
            # so a measured rank above that would mean the width was not applied.
            assert r["rank_bound"] == r["width"] + 2
            assert r["rank"] <= r["width"] + 2
        else:
            assert r["rank_bound"] is None


def test_parameter_counts_follow_the_width(studied):
    _, summary, _ = studied
    by = {(r["encoder"], r["head"], r["width"]): r["params"] for r in summary["rows"]}
    for d in WIDTHS:
        # 1-layer LSTM of size d on a d-embedding, tied softmax decoder with a bias.
        assert by[("lstm", "softmax", d)] == V * d + 2 * 4 * d * d + 2 * 4 * d + V
    # 1 pre-LN block: 2 LayerNorms, QKV + output projection, MLP d -> 4d -> d (biases),
    # a final LayerNorm; tied decoder with a bias.
    d = TF_WIDTH
    block = 2 * 2 * d + 4 * d * d + 4 * d + d * 4 * d + 4 * d + 4 * d * d + d
    assert by[("transformer", "softmax", d)] == V * d + block + 2 * d + V


def test_true_rank_counts_the_distinct_contexts(studied):
    _, summary, _ = studied
    n = {r["rank_contexts"] for r in summary["rows"]}
    assert n == {10 * V}  # N = min(10 V, cap 2000, validation length 1200)
    corpus = data_lib.synthetic_corpus(vocab_size=V, train_tokens=4000,
                                       valid_tokens=1200, test_tokens=1200)
    # Full-rank transitions: the rows at N contexts are independent per distinct word.
    assert summary["true_rank"] == len(np.unique(corpus.valid[:10 * V]))
    assert summary["true_ppl"] == pytest.approx(np.exp(corpus.entropy_rate))


def test_a_rerun_reuses_every_run(studied):
    workdir, summary, _ = studied
    again = study.run_study({"lstm": small_configs()["lstm"]}, HEADS, WIDTHS, workdir,
                            steps=STEPS, evals=EVALS, log=lambda _: None, isolate=False,
                            plot=False)
    assert all(r["reused"] for r in again["rows"])
    key = lambda r: (r["encoder"], r["head"], r["width"])  # noqa: E731
    old = {key(r): r["valid_ppl"] for r in summary["rows"][:4]}
    assert {key(r): r["valid_ppl"] for r in again["rows"]} == old


def test_width_config_sets_every_width_key():
    lstm, tf = (study.synthetic_configs()[e] for e in ("lstm", "transformer"))
    c = study.width_config(lstm, 24)
    assert (c.model.emsize, c.model.nhidlast, c.model.nhid) == (24, 24, 24)
    tf.model.n_heads, tf.model.d_model, tf.model.d_ff = 4, 16, 48  # ratio 3
    expected = {8: (4, 24), 12: (3, 36), 6: (3, 18), 10: (1, 30), 2: (1, 6)}
    for width, (heads, d_ff) in expected.items():
        c = study.width_config(tf, width)
        # Heads: the most (at most 4) that divide d with an even head size.
        assert (c.model.emsize, c.model.d_model) == (width, width)
        assert (c.model.n_heads, c.model.d_ff) == (heads, d_ff)
    with pytest.raises(ConfigError, match="even head size"):
        study.width_config(tf, 7)


@pytest.mark.parametrize("argv, message", [
    (["--widths", "8,x"], "not a whole number"),
    (["--widths", "8,8"], "given twice"),
    (["--widths", "1"], "at least 2"),
    (["--encoders", "gru"], "unknown encoder 'gru'"),
    (["--heads", "softmax,nope"], "nope"),
    (["--steps", "-1"], "--steps must be at least 1"),
    (["--widths", "8,9"], "width 9 is odd"),
    (["--transformer-config", "configs/ptb_transformer.py"], "--config FILE"),
    (["--config", "no/such/config.py"], "no config file at no/such/config.py"),
    (["--config.model.nope=1"], "nope"),
])
def test_bad_arguments_fail_before_any_training(argv, message, tmp_path, capsys):
    workdir = tmp_path / "study"
    assert cli.main(["study", "--workdir", str(workdir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not workdir.exists()


def test_steps_0_leaves_the_configs_own_epochs_and_early_stopping(tmp_path, monkeypatch):
    seen = {}

    def fake_run_study(configs, heads, widths, workdir, **kwargs):
        seen.update(kwargs, configs=configs)
        raise SystemExit(0)

    monkeypatch.setattr(study, "run_study", fake_run_study)
    with pytest.raises(SystemExit):
        cli.main(["study", "--workdir", str(tmp_path), "--steps", "0",
                  "--config.train.min_improvement=0.01"])
    assert seen["steps"] is None and seen["evals"] is None
    assert all(float(c.train.min_improvement) == 0.01 for c in seen["configs"].values())
    # and with no step budget, a cell keeps its config's epochs and schedule
    c = seen["configs"]["lstm"]
    (_, _, planned), = study.plan_runs({"lstm": c}, ["softmax"], [8], None, None)
    assert planned.train.max_epochs == c.train.max_epochs
    assert planned.optim.decay_steps == c.optim.decay_steps


def test_rows_hold_their_validation_curves_and_the_gap_plot_is_written(studied, tmp_path):
    workdir, summary, _ = studied
    for r in summary["rows"]:
        assert len(r["curve"]) == r["epochs"] and r["curve"][-1][0] == r["steps"]
        # the best of the curve is the row's (best-weights) validation perplexity
        assert min(p for _, p in r["curve"]) == pytest.approx(r["valid_ppl"], rel=1e-6)
    gaps = study.gap_curves(summary)
    assert set(gaps) == {("lstm", w) for w in WIDTHS}  # the Transformer has no MoS row
    png = study.plot_gap(summary, tmp_path / "gap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gap_curves_take_the_best_so_far_of_each_run_by_hand():
    rows = [
        {"encoder": "lstm", "width": 8, "head": "softmax",
         "curve": [[100, 300.0], [200, 250.0], [300, 260.0]]},  # stopped after 300
        {"encoder": "lstm", "width": 8, "head": "mos",
         "curve": [[100, 330.0], [200, 260.0], [300, 240.0], [400, 230.0]]},
        {"encoder": "lstm", "width": 16, "head": "softmax", "curve": [[100, 200.0]]},
    ]
    gaps = study.gap_curves({"rows": rows})
    assert list(gaps) == [("lstm", 8)]  # width 16 has no MoS run
    expected = [(100, np.log(330 / 300)), (200, np.log(260 / 250)),
                (300, np.log(240 / 250)),  # softmax's best so far: 250, not 260
                (400, np.log(230 / 250))]  # after its stop the softmax keeps its best
    got = gaps[("lstm", 8)]
    assert [s for s, _ in got] == [s for s, _ in expected]
    np.testing.assert_allclose([g for _, g in got], [g for _, g in expected], rtol=1e-12)


def test_the_command_names_every_file_it_wrote_the_gap_plot_too(tmp_path, monkeypatch,
                                                                capsys):
    written = {"markdown": "S/study.md", "json": "S/study.json", "plot": "S/study.png"}

    def fake_run_study(configs, heads, widths, workdir, **kwargs):
        return written
    monkeypatch.setattr(study, "run_study", fake_run_study)
    assert cli.main(["study", "--workdir", str(tmp_path), "--encoders", "lstm"]) == 0
    assert capsys.readouterr().out.strip() == \
        "wrote S/study.md, S/study.json and S/study.png"
    written["gap_plot"] = "S/study_gap.png"
    assert cli.main(["study", "--workdir", str(tmp_path), "--encoders", "lstm"]) == 0
    assert capsys.readouterr().out.strip() == \
        "wrote S/study.md, S/study.json, S/study.png and S/study_gap.png"
