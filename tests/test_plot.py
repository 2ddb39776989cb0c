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


# A training run and its finetune, by hand: the run's best is epoch 2 (800); the
# finetune starts from those weights (800 on its own validation) and no epoch beats them.
def training_and_finetune(tmp_path, ft_epochs=(810.0, 805.0), finished=True):
    run = write_metrics(tmp_path / "run", [
        epoch_record(1, 900.0, 6.9), epoch_record(2, 800.0, 6.8),
        epoch_record(3, 850.0, 6.7),
        {"mode": "train", "final": True, "best_epoch": 2, "valid_ppl": 800.0}])
    best = min((800.0, *ft_epochs))
    best_epoch = 0 if best == 800.0 else 1 + list(ft_epochs).index(best)
    records = [{"mode": "finetune", "step": 0, "finetune_start": {
        "init_from": str(run), "init_epoch": 2, "valid_loss": math.log(800.0),
        "valid_ppl": 800.0}}]
    records += [epoch_record(e, p, 6.6, True, mode="finetune")
                for e, p in enumerate(ft_epochs, 1)]
    if finished:
        records.append({"mode": "finetune", "final": True, "best_epoch": best_epoch,
                        "valid_ppl": best})
    ft = write_metrics(tmp_path / "ft", records)
    (ft / "config.json").write_text(json.dumps({"finetune": {"init_from": str(run)}}))
    return run, ft


def legend_of(monkeypatch):
    """The legend texts of the next plot_learning_curves figure."""
    from mos_jax import plot
    texts, finish = [], plot.finish

    def recording(fig, ax, *args):
        out = finish(fig, ax, *args)
        texts.extend(t.get_text() for t in ax.get_legend().get_texts())
        return out
    monkeypatch.setattr(plot, "finish", recording)
    return texts


def test_a_finetune_is_drawn_after_its_run_and_labelled_with_the_weights_it_kept(
        tmp_path, monkeypatch):
    run, ft = training_and_finetune(tmp_path)
    texts = legend_of(monkeypatch)
    plot_learning_curves({"run": run, "ft": ft}, tmp_path / "c.png")
    # The finetune's epochs 1 and 2 are not at 810/805 "best": it kept its start.
    assert texts == ["run valid (best 800.00)", "run train",
                     "ft valid (kept its starting weights, 800.00)", "ft train"]
    # Numbered on from the run's last epoch (3), its start (800) at that epoch.
    from mos_jax.plot import _placed_curves
    c = _placed_curves({"ft": ft, "run": run})  # any order
    assert c["run"]["epoch"] == [1, 2, 3]
    assert c["ft"]["epoch"] == [3, 4, 5]
    assert c["ft"]["valid_ppl"] == [800.0, 810.0, 805.0]
    assert math.isnan(c["ft"]["train_ppl"][0])
    assert c["ft"]["train_ppl"][1:] == pytest.approx([math.exp(6.6)] * 2)
    # Alone, the finetune is numbered from its start (epoch 0).
    assert epoch_curves(ft)["epoch"] == [0, 1, 2]


def test_the_kept_best_of_a_finetune_comes_from_its_own_records(tmp_path):
    from mos_jax.plot import kept_best
    run, ft = training_and_finetune(tmp_path / "a", ft_epochs=(790.0, 795.0, 780.0))
    assert kept_best(run) == (800.0, "best 800.00")
    assert kept_best(ft) == (780.0, "best 780.00")
    # Unfinished (no final record): the start and the epochs decide.
    _, ft = training_and_finetune(tmp_path / "b", ft_epochs=(805.0,), finished=False)
    assert kept_best(ft) == (800.0, "kept its starting weights, 800.00")
    _, ft = training_and_finetune(tmp_path / "c", ft_epochs=(805.0, 799.5), finished=False)
    assert kept_best(ft) == (799.5, "best 799.50")
    # An epoch equal to the start does not replace it (the loop needs strictly lower).
    _, ft = training_and_finetune(tmp_path / "d", ft_epochs=(800.0,), finished=False)
    assert kept_best(ft)[1] == "kept its starting weights, 800.00"
    # Written before start records: a final record that kept epoch 0 says the same.
    _, ft = training_and_finetune(tmp_path / "e", ft_epochs=(830.0,))
    lines = (ft / "metrics.jsonl").read_text().splitlines()
    (ft / "metrics.jsonl").write_text("\n".join(lines[1:]) + "\n")
    assert kept_best(ft) == (800.0, "kept its starting weights, 800.00")
    assert epoch_curves(ft)["valid_ppl"] == [800.0, 830.0]
