"""Learning curves of training runs, read from their `metrics.jsonl`, as one PNG.

matplotlib is imported inside `plot_learning_curves` (with the non-interactive Agg
backend), so importing this module costs nothing and needs no display.
"""

from __future__ import annotations

import io
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


def epoch_curves(workdir: str | Path) -> dict[str, list]:
    """Per-epoch points of the run in `workdir`, from its `metrics.jsonl`.

    Returns lists of equal length: `epoch`, `valid_ppl`, `train_ppl`
    (`exp(train_loss)`, the regularised training loss, so an upper bound on the
    training perplexity when AR/TAR are on) and `averaging`. A resumed run logs an
    epoch again after an interruption; the last record of an epoch wins. Finetune
    records follow the training ones, numbered on after them.
    Raises MosJaxError when the directory has no per-epoch metrics.
    """
    records = [r for r in read_metrics(workdir)
               if not r.get("final") and "epoch" in r and "valid_ppl" in r]
    if not records:
        raise MosJaxError(
            f"{workdir} has no per-epoch metrics (metrics.jsonl is missing or holds no "
            "epoch): is it the work directory of a training run that finished an epoch?")
    by_key: dict[tuple[int, int], dict] = {}
    for r in records:
        by_key[(r.get("mode") == "finetune", int(r["epoch"]))] = r
    train_epochs = max((e for (ft, e) in by_key if not ft), default=0)
    curves: dict[str, list] = {"epoch": [], "valid_ppl": [], "train_ppl": [],
                               "averaging": []}
    for (ft, e), r in sorted(by_key.items()):
        curves["epoch"].append(e + train_epochs if ft else e)
        curves["valid_ppl"].append(float(r["valid_ppl"]))
        loss = r.get("train_loss")
        curves["train_ppl"].append(math.exp(loss) if loss is not None and loss < 50
                                   else math.nan)
        curves["averaging"].append(bool(r.get("averaging", False)))
    return curves


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
    marked with dots. Returns the path of the PNG. Raises MosJaxError when `runs` is
    empty or a run has no per-epoch metrics.
    """
    if not runs:
        raise MosJaxError("plot_learning_curves needs at least one run")
    curves = {label: epoch_curves(workdir) for label, workdir in runs.items()}
    plt = pyplot()
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=size_inches, dpi=dpi)
    try:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (label, c) in enumerate(curves.items()):
            color = colors[i % len(colors)]
            ax.plot(c["epoch"], c["valid_ppl"], color=color, lw=2,
                    label=f"{label} valid (best {min(c['valid_ppl']):.2f})")
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
        ax.set_xlabel("epoch (dots: averaged weights)")
        ax.set_ylabel("perplexity")
        return finish(fig, ax, out_png, title, dpi)
    finally:
        plt.close(fig)
