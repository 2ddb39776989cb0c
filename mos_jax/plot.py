"""Learning curves of training runs, read from their `metrics.jsonl`, as one PNG.

matplotlib is imported inside `plot_learning_curves` (with the non-interactive Agg
backend), so importing this module costs nothing and needs no display.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Mapping

from mos_jax.errors import MosJaxError
from mos_jax.progress import read_metrics


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend; a clear error without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MosJaxError("plotting needs matplotlib: pip install matplotlib") from None
    return plt


def finish(fig, ax, out_png: str | Path, title: str | None, dpi: int) -> Path:
    """Title, grid and legend on `ax`; `fig` saved as `out_png` (folders made)."""
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    from mos_jax.outputs import write_bytes
    out = Path(out_png)
    buf = io.BytesIO()  # a failed write leaves no half-written figure behind
    fig.savefig(buf, dpi=dpi, format=out.suffix[1:].lower() or None)
    return write_bytes(out, buf.getvalue())


def _epoch_records(workdir: str | Path) -> tuple[dict[tuple[bool, int], dict], list]:
    """`{(is_finetune, epoch): record}` (the last record of an epoch wins: a resumed
    run logs an epoch again) and all records of `workdir`'s `metrics.jsonl`."""
    records = read_metrics(workdir)
    by_key: dict[tuple[bool, int], dict] = {}
    for r in records:
        if not r.get("final") and "epoch" in r and "valid_ppl" in r:
            by_key[(r.get("mode") == "finetune", int(r["epoch"]))] = r
    if not by_key:
        raise MosJaxError(
            f"{workdir} has no per-epoch metrics (metrics.jsonl is missing or holds no "
            "epoch): is it the work directory of a training run that finished an epoch?")
    return by_key, records


def _finetune_start(records: list) -> dict | None:
    """The finetune's starting point: the last `finetune_start` record (its starting
    weights' validation), else a final record that kept epoch 0 (the starting weights)."""
    starts = [r["finetune_start"] for r in records
              if isinstance(r.get("finetune_start"), dict)
              and "valid_ppl" in r["finetune_start"]]
    if starts:
        return starts[-1]
    kept_start = [r for r in records if r.get("mode") == "finetune" and r.get("final")
                  and r.get("best_epoch") == 0 and "valid_ppl" in r]
    return kept_start[-1] if kept_start else None


def epoch_curves(workdir: str | Path, first_epoch: int = 0) -> dict[str, list]:
    """Per-epoch points of the run in `workdir`, from its `metrics.jsonl`.

    Returns lists of equal length: `epoch`, `valid_ppl`, `train_ppl`
    (`exp(train_loss)`, the regularised training loss, so an upper bound on the
    training perplexity when AR/TAR are on) and `averaging`. A resumed run logs an
    epoch again after an interruption; the last record of an epoch wins. Finetune
    records follow the training ones, numbered on after them; a finetune's own work
    directory numbers its epochs on from `first_epoch` (the last epoch of the run it
    started from, when known), and its starting weights' validation, when recorded, is
    its first point, at `first_epoch` (no training figure there).
    Raises MosJaxError when the directory has no per-epoch metrics.
    """
    by_key, records = _epoch_records(workdir)
    train_epochs = max((e for (ft, e) in by_key if not ft), default=0)
    curves: dict[str, list] = {"epoch": [], "valid_ppl": [], "train_ppl": [],
                               "averaging": []}
    start = _finetune_start(records) if train_epochs == 0 else None
    if start is not None:
        curves["epoch"].append(first_epoch)
        curves["valid_ppl"].append(float(start["valid_ppl"]))
        curves["train_ppl"].append(math.nan)
        curves["averaging"].append(False)
    offset = train_epochs or first_epoch
    for (ft, e), r in sorted(by_key.items()):
        curves["epoch"].append(e + offset if ft else e)
        curves["valid_ppl"].append(float(r["valid_ppl"]))
        loss = r.get("train_loss")
        curves["train_ppl"].append(math.exp(loss) if loss is not None and loss < 50
                                   else math.nan)
        curves["averaging"].append(bool(r.get("averaging", False)))
    return curves


def kept_best(workdir: str | Path) -> tuple[float, str]:
    """The validation perplexity of the weights the run in `workdir` kept as its best,
    and a phrase saying which they are, from its own `metrics.jsonl`.

    A training run keeps its lowest validation. A finetune starts from its run's best
    weights and keeps them unless an epoch does better: its best is the lower of its
    starting validation and its epochs' (the final record's, once it has finished).
    """
    by_key, records = _epoch_records(workdir)
    finetune = {e: float(r["valid_ppl"]) for (ft, e), r in by_key.items() if ft}
    if not finetune:
        ppl = min(float(r["valid_ppl"]) for r in by_key.values())
        return ppl, f"best {ppl:.2f}"
    finals = [r for r in records if r.get("mode") == "finetune" and r.get("final")
              and "valid_ppl" in r and "best_epoch" in r]
    if finals:
        best_epoch, ppl = int(finals[-1]["best_epoch"]), float(finals[-1]["valid_ppl"])
    else:
        # What it starts from: its recorded start, or the best of the training
        # epochs logged before it in the same directory.
        before = [float(r["valid_ppl"]) for (ft, e), r in by_key.items() if not ft]
        start = _finetune_start(records)
        if start is not None:
            before.append(float(start["valid_ppl"]))
        best_epoch, ppl = 0, min(before) if before else math.inf
        for e, p in sorted(finetune.items()):  # a later epoch must do strictly better
            if p < ppl:
                best_epoch, ppl = e, p
    if best_epoch == 0:
        return ppl, f"kept its starting weights, {ppl:.2f}"
    return ppl, f"best {ppl:.2f}"


def _init_from(workdir: Path) -> Path | None:
    """The training run a finetune's work directory started from (its config.json's
    `finetune.init_from`, resolved), or None for a training run."""
    by_key, records = _epoch_records(workdir)
    if any(not ft for ft, _ in by_key):
        return None
    source = next((r["finetune_start"]["init_from"] for r in reversed(records)
                   if isinstance(r.get("finetune_start"), dict)
                   and r["finetune_start"].get("init_from")), None)
    path = Path(workdir) / "config.json"
    if source is None and path.is_file():
        try:
            source = json.loads(path.read_text()).get("finetune", {}).get("init_from")
        except ValueError:
            source = None
    return Path(source).resolve() if source else None


def _placed_curves(runs: Mapping[str, str | Path]) -> dict[str, dict[str, list]]:
    """`epoch_curves` of each run; a finetune whose source run is among `runs` is
    numbered on from that run's last epoch (a chain of finetunes, each from the last)."""
    sources = {label: _init_from(Path(w)) for label, w in runs.items()}
    by_path = {Path(w).resolve(): label for label, w in runs.items()}
    curves: dict[str, dict[str, list]] = {}
    pending = list(runs)
    while pending:
        placed = False
        for label in list(pending):
            source = by_path.get(sources[label]) if sources[label] else None
            if source is not None and source != label and source in pending:
                continue  # after its source
            first = max(curves[source]["epoch"]) if source in curves else 0
            curves[label] = epoch_curves(runs[label], first_epoch=first)
            pending.remove(label)
            placed = True
        if not placed:  # a cycle of sources (hand-made files): number each from 0
            for label in pending:
                curves[label] = epoch_curves(runs[label])
            break
    return {label: curves[label] for label in runs}


def plot_learning_curves(runs: Mapping[str, str | Path], out_png: str | Path,
                         title: str | None = None, reference_ppl: float | None = None,
                         reference_label: str = "true perplexity",
                         size_inches: tuple[float, float] = (8.0, 5.0),
                         dpi: int = 100) -> Path:
    """Plot validation (solid) and training (dashed) perplexity per epoch of each run.

    Args:
      runs: label -> work directory of a training run (its `metrics.jsonl` is read).
      out_png: where to write the figure; parent directories are created.
      title: the figure's title.
      reference_ppl: draws a horizontal line at this perplexity (e.g. the true
        perplexity of a synthetic corpus), labelled `reference_label`.
      size_inches, dpi: the image is `size_inches * dpi` pixels (800 x 500 by default).

    The y axis is logarithmic. Epochs evaluated with NT-ASGD's averaged weights are
    marked with dots. A finetune plotted with the run it started from is drawn after it
    (`_placed_curves`). Each run's label gives the validation perplexity of the weights
    it kept (`kept_best`). Returns the path of the PNG. Raises MosJaxError when `runs`
    is empty or a run has no per-epoch metrics.
    """
    if not runs:
        raise MosJaxError("plot_learning_curves needs at least one run")
    curves = _placed_curves(runs)
    kept = {label: kept_best(workdir)[1] for label, workdir in runs.items()}
    plt = pyplot()
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=size_inches, dpi=dpi)
    try:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (label, c) in enumerate(curves.items()):
            color = colors[i % len(colors)]
            ax.plot(c["epoch"], c["valid_ppl"], color=color, lw=2,
                    label=f"{label} valid ({kept[label]})")
            ax.plot(c["epoch"], c["train_ppl"], color=color, lw=1, ls="--",
                    label=f"{label} train")
            avg = [(e, p) for e, p, a in zip(c["epoch"], c["valid_ppl"], c["averaging"])
                   if a]
            if avg:
                ax.plot(*zip(*avg), ls="none", marker=".", color=color)
        if reference_ppl is not None:
            ax.axhline(reference_ppl, color="black", lw=1, ls=":",
                       label=f"{reference_label} {reference_ppl:.2f}")
        ax.set_yscale("log")
        # Plain numbers (not 6 x 10^1) at 1, 1.5, 2, 3, 4, 5, 7 per decade.
        ax.yaxis.set_major_locator(
            ticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch (dots: averaged weights)")
        ax.set_ylabel("perplexity")
        return finish(fig, ax, out_png, title, dpi)
    finally:
        plt.close(fig)
