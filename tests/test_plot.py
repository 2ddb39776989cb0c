"""Learning-curve plots from metrics.jsonl (mos_jax.plot)."""

import json
import math
import struct

import pytest

from mos_jax.errors import MosJaxError
from mos_jax.plot import epoch_curves, plot_learning_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(workdir, records):
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return workdir


def epoch_record(epoch, valid_ppl, train_loss, averaging=False, mode="train"):
    return {"mode": mode, "epoch": epoch, "step": 10 * epoch, "train_loss": train_loss,
            "valid_loss": math.log(valid_ppl), "valid_ppl": valid_ppl, "lr": 20.0,
            "averaging": averaging, "tokens_per_s": 1e5, "wall_time": 1.0}


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_of_the_requested_size(tmp_path):
    a = write_metrics(tmp_path / "a", [epoch_record(e, 60.0 / e, 4.0 - 0.1 * e)
                                       for e in range(1, 6)]
                      + [{"mode": "train", "final": True, "valid_ppl": 12.0}])
    b = write_metrics(tmp_path / "b", [epoch_record(e, 50.0 / e, 3.9 - 0.1 * e, e > 3)
                                       for e in range(1, 8)])
    out = plot_learning_curves({"softmax": a, "MoS": str(b)}, tmp_path / "sub" / "c.png",
                               title="t", reference_ppl=8.0)
    assert out == tmp_path / "sub" / "c.png"
    assert png_size(out) == (800, 500)
    small = plot_learning_curves({"a": a}, tmp_path / "d.png", size_inches=(4, 3), dpi=50)
    assert png_size(small) == (200, 150)


def test_epoch_curves_keeps_the_last_record_of_an_epoch_and_appends_finetuning(tmp_path):
    w = write_metrics(tmp_path / "w", [
        epoch_record(1, 90.0, 4.6), epoch_record(2, 80.0, 4.5),
        epoch_record(2, 70.0, 4.4),  # the epoch logged again after a resume
        {"mode": "train", "final": True, "valid_ppl": 70.0},
        epoch_record(1, 65.0, 4.3, True, mode="finetune")])
    c = epoch_curves(w)
    assert c["epoch"] == [1, 2, 3]
    assert c["valid_ppl"] == [90.0, 70.0, 65.0]
    assert c["train_ppl"] == pytest.approx([math.exp(4.6), math.exp(4.4), math.exp(4.3)])
    assert c["averaging"] == [False, False, True]


def test_a_workdir_without_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MosJaxError, match="no per-epoch metrics"):
        plot_learning_curves({"x": tmp_path / "empty"}, tmp_path / "x.png")
    only_final = write_metrics(tmp_path / "final", [{"mode": "train", "final": True}])
    with pytest.raises(MosJaxError, match="no per-epoch metrics"):
        plot_learning_curves({"x": only_final}, tmp_path / "x.png")
    with pytest.raises(MosJaxError, match="at least one run"):
        plot_learning_curves({}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
