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
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    steps, batch, bptt, eval_batch = 2, 3, 4, 2
    rc = cli.main(["bench", "--config", str(CONFIGS / "tiny.py"),
                   "--vocab-sizes", "70,30", "--heads", "softmax",
                   "--repeats", str(steps), "--warmup", "0", "--batch", str(batch),
                   "--bptt", str(bptt), "--eval-batch", str(eval_batch),
                   "--out", str(out), "--plot", str(png),
                   "--config.model.emsize=8", "--config.model.nhid=8"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(out.read_text())
    assert json.loads(captured.out.strip().splitlines()[-1]) == result
    recs = result["records"]
    assert [(r["head"], r["vocab"]) for r in recs] == [("softmax", 30), ("softmax", 70)]
    for r in recs:
        for w, rows in (("train", batch), ("eval", eval_batch)):
            t = r[w]
            assert t["steps"] == steps and t["tokens"] == steps * rows * bptt
            rate = t["tokens_per_s"]
            assert rate["runs"] == steps and rate["min"] <= rate["median"] <= rate["max"]
            # the median of two calls is their mean rate's harmonic partner: between
            assert rate["min"] <= t["tokens"] / t["seconds"] * 1.001
            assert t["tokens"] / t["seconds"] <= rate["max"] * 1.001
        # softmax, tied: nhidlast set to emsize = 8; head FLOPs 2 D V
        assert r["nhidlast"] == 8
        assert r["model_flops_per_token"]["head"] == 2 * 8 * r["vocab"]
    # V words more add an embedding row (8) and a decoder bias (1) per word
    assert recs[1]["params"] - recs[0]["params"] == (70 - 30) * (8 + 1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "softmax" in captured.err and "70" in captured.err  # the table
