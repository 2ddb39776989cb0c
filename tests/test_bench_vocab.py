"""`mos-jax bench --vocab-sizes`: cost of heads across vocabulary sizes."""

import json
from pathlib import Path

import numpy as np
import pytest

from mos_jax import bench, cli
from mos_jax.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_vocab_sizes_are_parsed_or_refused_in_one_line():
    assert bench.parse_vocab_sizes("10000, 33_000,267000") == (10000, 33000, 267000)
    for bad in ("10k,20000", "", "1,5", "5,5", "300,,400"):
        with pytest.raises(ConfigError) as e:
            bench.parse_vocab_sizes(bad)
        assert "--vocab-sizes" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="choose one of"):
        bench.parse_heads("softmax,nosuchhead")
    assert set(bench.parse_heads(None)) >= {"softmax", "mos"}


@pytest.mark.parametrize("args, words", [
    (["--vocab-sizes", "20,x"], "--vocab-sizes '20,x'"),
    (["--heads", "softmax"], "--heads goes with --vocab-sizes"),
    (["--plot", "p.png"], "--plot goes with --vocab-sizes"),
    (["--vocab-sizes", "20,30", "--vocab", "20"], "--vocab and --vocab-sizes"),
    (["--vocab-sizes", "20,30", "--plot", "p.txt"], "--plot"),
])
def test_bench_sweep_errors_come_before_any_work(args, words, capsys):
    rc = cli.main(["bench", "--config", str(CONFIGS / "tiny.py"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and words in err
    assert len(err.splitlines()) == 1


def test_windows_are_consecutive_columns_of_the_stream():
    stream = np.arange(100)
    (x0, y0), (x1, y1) = bench._windows(stream, batch=3, bptt=4, count=2)
    # column b holds stream[b L : (b + 1) L] with L = 4 * 2 + 1 tokens
    for b in range(3):
        col = stream[b * 9:(b + 1) * 9]
        np.testing.assert_array_equal(x0[:, b], col[0:4])
        np.testing.assert_array_equal(y0[:, b], col[1:5])
        np.testing.assert_array_equal(x1[:, b], col[4:8])
        np.testing.assert_array_equal(y1[:, b], col[5:9])


def test_bench_sweep_writes_one_consistent_record_per_head_and_size(tmp_path, capsys):
    """Two sizes, evaluation only (cheap to compile), through the command."""
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    steps, bptt, eval_batch = 2, 4, 2
    rc = cli.main(["bench", "--config", str(CONFIGS / "tiny.py"),
                   "--vocab-sizes", "70,30", "--heads", "softmax", "--only", "eval",
                   "--repeats", str(steps), "--warmup", "0", "--bptt", str(bptt),
                   "--eval-batch", str(eval_batch), "--out", str(out), "--plot", str(png),
                   "--config.model.emsize=8", "--config.model.nhid=8"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(out.read_text())
    assert json.loads(captured.out.strip().splitlines()[-1]) == result
    recs = result["records"]
    assert [(r["head"], r["vocab"]) for r in recs] == [("softmax", 30), ("softmax", 70)]
    for r in recs:
        assert "train" not in r
        _check_counts(r["eval"], steps, eval_batch, bptt)
        # softmax, tied: nhidlast set to emsize = 8; head FLOPs 2 D V
        assert r["nhidlast"] == 8
        assert r["model_flops_per_token"]["head"] == 2 * 8 * r["vocab"]
    # V words more add an embedding row (8) and a decoder bias (1) per word
    assert recs[1]["params"] - recs[0]["params"] == (70 - 30) * (8 + 1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "softmax" in captured.err and "70" in captured.err  # the table


def _check_counts(t, steps, rows, bptt):
    assert t["steps"] == steps and t["tokens"] == steps * rows * bptt
    assert t["batch"] == rows and t["bptt"] == bptt
    rate = t["tokens_per_s"]
    assert rate["runs"] == steps and rate["min"] <= rate["median"] <= rate["max"]
    # tokens over the summed call times: a mean rate, between the slowest and fastest
    assert rate["min"] <= t["tokens"] / t["seconds"] * 1.01
    assert t["tokens"] / t["seconds"] <= rate["max"] * 1.01


def test_bench_sweep_times_the_train_step_of_each_head():
    from mos_jax import config as config_lib
    c = config_lib.load_config(CONFIGS / "tiny.py", [("model.emsize", "8"),
                                                     ("model.nhid", "8")])
    steps, batch, bptt = 3, 3, 4
    settings = bench.BenchSettings(batch=batch, bptt=bptt, warmup=0, repeats=steps,
                                   workloads=("train",))
    result = bench.run_vocab_sweep(c, [40], ["softmax"], settings, log=lambda _: None)
    (rec,) = result["records"]
    assert rec["vocab"] == 40 and "eval" not in rec
    _check_counts(rec["train"], steps, batch, bptt)
    assert rec["train"]["xla_memory_mb"] > 0
    with pytest.raises(ConfigError, match="--only train,eval"):
        bench.run_vocab_sweep(c, [40], ["softmax"],
                              bench.BenchSettings(workloads=("dynamic_eval",)))
