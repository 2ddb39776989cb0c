"""`mos-jax compare-heads` (mos_jax.compare) on the tiny synthetic config."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import numpy_reference as ref
from mos_jax import cli, compare, evaluate, heads, train
from mos_jax import config as config_lib
from mos_jax.errors import ConfigError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
HEADS = ["softmax", "mos"]
STEPS, EVALS = 4, 2


def tiny_config():
    # Windows of 8 steps and no longer ones: one bucket, one compiled train step a head.
    return config_lib.load_config(TINY, [("data.bptt", "8"),
                                         ("data.max_seq_len_delta", "0")])


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("compare")
    lines = []
    summary = compare.compare_heads(tiny_config(), ",".join(HEADS), workdir,
                                    log=lines.append, steps=STEPS, evals=EVALS)
    return workdir, summary, lines


def test_the_table_has_a_row_per_head(compared):
    workdir, summary, lines = compared
    assert summary["order"] == HEADS
    table = (workdir / "compare.md").read_text().splitlines()
    assert table == summary["table"]
    assert all(line in lines for line in table)  # printed too
    header = next(line for line in table if line.startswith("| head |"))
    for col in ("params", "tokens/s", "peak RSS", "valid ppl", "rank (N=50)"):
        assert col in header
    for head in HEADS:
        h = summary["heads"][head]
        row = next(line for line in table if line.startswith(f"| {head} |"))
        assert f"| {h['params']:,} |" in row and f"| {h['valid_ppl']:.2f} |" in row
        assert h["steps"] == STEPS and h["epochs"] == EVALS
        assert h["tokens_per_s"] > 0 and h["train_tokens"] > 0
        assert h["peak_rss_bytes"] > 2 ** 20  # measured in the head's own process
        assert h["trained_now"] and not h["reused"]


def test_parameter_counts_are_the_param_trees(compared):
    workdir, summary, _ = compared
    stored = json.loads((workdir / "compare.json").read_text())
    v, d, e = 50, 16, 4  # tiny: V, emsize = nhid = nhidlast, experts; one LSTM layer
    lstm = 2 * d * 4 * d + 2 * 4 * d
    formula = {"softmax": v * d + lstm + v,
               "mos": v * d + lstm + d * e + d * e * d + e * d + v}
    for head in HEADS:
        _, _, _, params = train.load_best(workdir / head)
        tree = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
        assert summary["heads"][head]["params"] == tree == formula[head]
        assert stored["heads"][head]["params"] == formula[head]  # the file says so too


def test_valid_ppl_is_the_best_weights_perplexity(compared):
    workdir, summary, _ = compared
    stored = json.loads((workdir / "compare.json").read_text())
    for head in HEADS:
        config, corpus, model_config, params = train.load_best(workdir / head)
        assert model_config.head == head
        ppl = evaluate.perplexity(model_config, params, corpus.valid,
                                  config.data.eval_batch_size, config.data.bptt)
        assert summary["heads"][head]["valid_ppl"] == pytest.approx(ppl, rel=1e-6)
        assert stored["heads"][head]["valid_ppl"] == pytest.approx(ppl, rel=1e-6)


def test_softmax_rank_is_within_its_bound(compared):
    _, summary, _ = compared
    soft = summary["heads"]["softmax"]
    assert soft["rank_contexts"] == 50  # min(V, cap)
    assert 1 <= soft["rank"] <= soft["emsize"] + 2


def test_outputs_are_written(compared):
    workdir, summary, _ = compared
    assert (workdir / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # compare.json's figures are checked against independent values in the tests
    # above; here the chain's perplexity, solved for by NumPy.
    stored = json.loads((workdir / "compare.json").read_text())
    assert stored["true_ppl"] == pytest.approx(ref.true_ppl(50, 2.0, 0), rel=1e-9)
    assert stored["order"] == HEADS and sorted(stored["heads"]) == sorted(HEADS)


def test_a_rerun_reuses_the_heads(compared):
    workdir, summary, _ = compared
    lines = []
    again = compare.compare_heads(tiny_config(), HEADS, workdir, log=lines.append,
                                  steps=STEPS, evals=EVALS, plot=False)
    assert sum("reusing" in line for line in lines) == len(HEADS)
    for head in HEADS:
        assert again["heads"][head]["reused"]
        for key in ("params", "valid_ppl", "rank", "peak_rss_bytes", "tokens_per_s"):
            assert again["heads"][head][key] == summary["heads"][head][key]


def test_another_budget_in_the_same_workdir_is_refused(compared):
    workdir, _, _ = compared
    with pytest.raises(ConfigError, match="other settings.*train.max_epochs"):
        compare.compare_heads(tiny_config(), HEADS, workdir, log=lambda m: None,
                              steps=STEPS, evals=1)


def test_unknown_head_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown head 'nope'.*mos"):
        compare.compare_heads(tiny_config(), "softmax,nope", tmp_path, steps=2)
    assert not (tmp_path / "softmax").exists()  # nothing trained
    rc = cli.main(["compare-heads", "--config", str(TINY), "--heads", "mos,nope",
                   "--workdir", str(tmp_path), "--steps", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: unknown head 'nope'")
    with pytest.raises(ConfigError, match="twice"):
        heads.parse_names("mos,mos")


def test_a_tied_head_gets_nhidlast_equal_to_emsize():
    c = tiny_config().copy_and_resolve_references()
    c.model.nhidlast = 24
    soft, notes = compare.head_config(c, "softmax")
    assert soft.model.nhidlast == soft.model.emsize == 16
    assert notes and "nhidlast set to emsize = 16 (config: 24)" in notes[0]
    mos, notes = compare.head_config(c, "mos")
    assert mos.model.nhidlast == 24 and mos.model.head == "mos" and not notes


def test_fixed_cutoffs_pass_the_head_check_and_meet_the_corpus_later():
    c = tiny_config().copy_and_resolve_references()  # synthetic, V = 50
    c.model.heads.adaptive.cutoffs = "20,40"
    adaptive, notes = compare.head_config(c, "adaptive")  # no corpus yet: shapes only
    assert adaptive.model.head == "adaptive" and not notes
    c.model.heads.adaptive.cutoffs = "20,60"
    checked, _ = compare.head_config(c, "adaptive")
    with pytest.raises(ConfigError, match=r"\[1, 49\]"):  # the corpus's V = 50
        train.model_config_from(checked, 50)


def test_budgets():
    c = compare.budget_config(tiny_config(), steps=10, evals=3)
    assert (c.train.steps_per_epoch, c.train.max_epochs, c.train.stop_at_step) == (4, 3, 0)
    c = compare.budget_config(tiny_config(), steps=2)  # tiny: 3 epochs, but 2 steps
    assert (c.train.steps_per_epoch, c.train.max_epochs) == (1, 2)
    c = compare.budget_config(tiny_config(), time_budget_s=30)
    assert c.train.time_budget_s == 30.0 and c.train.max_epochs == 3
    with pytest.raises(ConfigError, match="not both"):
        compare.budget_config(tiny_config(), steps=2, time_budget_s=1)


def test_the_frequency_table(compared):
    workdir, summary, _ = compared
    table = summary["table"]
    header = next(i for i, line in enumerate(table)
                  if line.startswith("| head | top 100 |"))
    for head in HEADS:
        f = summary["heads"][head]["by_frequency"]
        _, corpus, model_config, params = train.load_best(workdir / head)
        logp = evaluate.token_logprobs(model_config, params, corpus.valid, 8, 8)
        # Synthetic V=50: every type is among the 100 most frequent; no <unk>.
        assert [(b["name"], b["tokens"]) for b in f["buckets"]] == [
            ("top 100", logp.size), (">= 1000", 0), ("100-999", 0), ("10-99", 0),
            ("< 10", 0)]
        assert f["buckets"][0]["ppl"] == pytest.approx(
            float(np.exp(-logp.mean(dtype=np.float64))), rel=1e-6)
        assert f["ppl"] == pytest.approx(summary["heads"][head]["valid_ppl"], rel=1e-5)
        row = next(line for line in table[header:] if line.startswith(f"| {head} |"))
        assert row.startswith(f"| {head} | {f['buckets'][0]['ppl']:.2f} (100%) | - |")


def test_a_run_saved_before_a_key_existed_is_the_same_run_at_that_keys_default():
    new = json.loads(config_lib.to_json(config_lib.default_config()))
    old = json.loads(json.dumps(new))
    del old["model"]["heads"]["mixtape"]["gate_dim"]  # saved before the key existed
    del old["train"]["min_improvement"]
    assert compare._differences(old, new) == []
    new["train"]["min_improvement"] = 0.01  # not the default: a different run
    assert compare._differences(old, new) == ["train.min_improvement 0.0 != 0.01"]
