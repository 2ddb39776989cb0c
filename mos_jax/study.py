"""The width study: output heads x widths x encoders, with one budget.

`run_study(configs, heads, widths, workdir)` trains every head of `heads` at every
width of `widths` with every encoder of `configs` (encoder name -> base config), each
run with the same step budget and seed, and measures each run's validation perplexity
and empirical rank (through `mos_jax.compare.compare_heads`, so every run trains in a
process of its own and is measured the same way as in `mos-jax compare-heads`).

The width is the one that bounds a softmax head's rank: a softmax head over a
d-vector gives log-probability matrices of rank at most d + 2 (`mos_jax.heads.Head.
rank_bound`). `width_config` sets it: `model.emsize = d` and the encoder's output
width (`model.nhidlast` for the LSTM, `model.d_model` for the Transformer) to d; the
Transformer's feed-forward width keeps the base config's ratio to d_model, and its
number of attention heads is the base config's, lowered until it divides d with an
even head size (rotary positions). Everything else is the base config's.

Default (`synthetic_configs`): the built-in high-rank synthetic corpus of `mos-jax
demo` (a random Markov chain over V = 100 words whose log-transition matrix has full
rank), widths 8, 16, 32, 64, softmax and MoS (15 components), a 1-layer LSTM trained
like the demo's and a 1-block Transformer trained with AdamW; 3,000 steps per run
(6 validated epochs of 500). Pass
configs of your own for a real corpus (see the README's Findings for PTB).

`run_vocab_study` (`mos-jax study --vocab-sizes`) is the same measurement across BPE
vocabulary sizes of a corpus directory at one width, reported per word
(`vocab_study.json`, `.md`, `.png`).

Written into `workdir`: `study.json` (every measurement), `study.md` (the table) and
`study.png` (validation perplexity and rank against width, one line per head and
encoder). Run (encoder, width) trains in `workdir/ENCODER-wWIDTH/HEAD`; `study.json`
and `study.md` are rewritten after each, and a rerun reuses finished runs and resumes
interrupted ones (`compare_heads`' rules), so an interrupted study loses at most the
steps since the last checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from mos_jax import config as config_lib
from mos_jax import heads as heads_lib
from mos_jax import outputs
from mos_jax.errors import ConfigError

DEFAULT_WIDTHS = (8, 16, 32, 64)
DEFAULT_HEADS = ("softmax", "mos")
DEFAULT_ENCODERS = ("lstm", "transformer")
DEFAULT_STEPS = 3000
DEFAULT_EVALS = 6


def synthetic_configs() -> dict[str, config_lib.ConfigDict]:
    """The default study's base configs, encoder name -> config, on the synthetic corpus.

    Both are `mos_jax.demo.demo_config()` (V = 100, peakedness 2, windows of 8 tokens
    over 128 columns, no dropout, MoS with 15 components) with the width left to the
    study. The LSTM keeps the demo's training (SGD at lr 20, clip 0.05, NT-ASGD). The
    Transformer is one pre-LayerNorm block with 2 attention heads (fewer at width 8
    would be needed only below head size 2), feed-forward width 4 d, trained with AdamW
    at lr 1e-2 (weight decay 0), clip 1, 50 warm-up steps and a cosine decay to a
    tenth over the study's budget; no AR/TAR, no averaging.
    """
    from mos_jax.demo import demo_config
    lstm = demo_config()
    tf = demo_config()
    m = tf.model
    m.encoder = "transformer"
    m.nlayers = 1
    m.n_heads = 2
    m.d_model = 0  # = emsize
    m.d_ff = 0  # = 4 d_model
    m.attn_dropout = 0.0
    m.resid_dropout = 0.0
    o = tf.optim
    o.name = "adamw"
    o.lr = 1e-2
    o.wdecay = 0.0
    o.clip = 1.0
    o.asgd = False
    o.warmup_steps = 50
    o.decay_steps = DEFAULT_STEPS
    o.min_lr_ratio = 0.1
    return {"lstm": lstm, "transformer": tf}


def parse_widths(text: str | Sequence[int]) -> list[int]:
    """Widths from "8,16,32" (or a list): at least 2, distinct, kept in the given order."""
    return config_lib.parse_int_list(text, "width", "--widths 8,16,32,64", 2)


def parse_encoders(text: str | Sequence[str]) -> list[str]:
    """Encoder names from "lstm,transformer" (or a list); unknown names raise."""
    from mos_jax import model as model_lib
    names = [e.strip() for e in (text.split(",") if isinstance(text, str) else text)]
    names = [e for e in names if e]
    if not names:
        raise ConfigError("give at least one encoder, e.g. --encoders lstm,transformer")
    for name in names:
        if name not in model_lib.ENCODERS:
            raise ConfigError(f"unknown encoder {name!r}: the encoders are "
                              f"{', '.join(sorted(model_lib.ENCODERS))}")
        if names.count(name) > 1:
            raise ConfigError(f"encoder {name} given twice: list each encoder once")
    return names


def width_config(config: config_lib.ConfigDict, width: int) -> config_lib.ConfigDict:
    """A copy of `config` whose softmax-bounding width is `width` (see module doc)."""
    c = config.copy_and_resolve_references()
    m = c.model
    encoder = str(m.get("encoder", "lstm"))
    if encoder == "transformer":
        d_model = int(m.d_model) or int(m.emsize)
        ratio = (int(m.d_ff) or 4 * d_model) / d_model
        m.emsize = width
        m.d_model = width
        m.d_ff = max(1, round(ratio * width))
        heads = max(1, int(m.n_heads))
        while heads > 1 and (width % heads or (width // heads) % 2):
            heads -= 1
        if (width // heads) % 2:
            raise ConfigError(f"width {width} is odd: the Transformer's rotary positions "
                              "need an even head size; use even widths")
        m.n_heads = heads
    else:
        m.emsize = width
        m.nhidlast = width
        if int(m.nlayers) == 1:
            m.nhid = width  # the only layer is the last one
    return c


def _encoder_config(config: config_lib.ConfigDict, encoder: str) -> config_lib.ConfigDict:
    c = config.copy_and_resolve_references()
    c.model.encoder = encoder
    return c


def _fit_schedule(config: config_lib.ConfigDict, steps: int | None
                  ) -> config_lib.ConfigDict:
    """A decaying learning-rate schedule (`optim.decay_steps > 0`) ends with the budget."""
    c = config.copy_and_resolve_references()
    if steps is not None and int(c.optim.get("decay_steps", 0)) > 0:
        c.optim.decay_steps = int(steps)
    return c


def plan_runs(configs: Mapping[str, config_lib.ConfigDict], heads: Sequence[str],
              widths: Sequence[int], steps: int | None, evals: int | None
              ) -> list[tuple[str, int, config_lib.ConfigDict]]:
    """(encoder, width, config) for every cell, each head checked buildable (no compute).

    Every configuration error is raised here, before anything trains.
    """
    from mos_jax import compare
    cells = []
    for encoder, base in configs.items():
        base = _fit_schedule(_encoder_config(base, encoder), steps)
        for width in widths:
            c = width_config(base, width)
            budget = compare.budget_config(c, steps=steps, evals=evals)
            for head in heads:
                try:
                    compare.head_config(budget, head)
                except ConfigError as e:
                    raise ConfigError(f"{encoder}, width {width}: {e}") from None
            cells.append((encoder, width, c))
    return cells


def run_study(configs: Mapping[str, config_lib.ConfigDict] | None = None,
              heads: str | Sequence[str] = DEFAULT_HEADS,
              widths: str | Sequence[int] = DEFAULT_WIDTHS,
              workdir: str | Path = "runs/study", *,
              steps: int | None = DEFAULT_STEPS, evals: int | None = DEFAULT_EVALS,
              rank_contexts: int = 2000, log: Callable[[str], None] = print,
              isolate: bool = True, plot: bool = True) -> dict:
    """Train every head x width x encoder with one budget; table, JSON and plot.

    Args:
      configs: encoder name ("lstm", "transformer") -> base config; the encoders run
        in this order. Default: `synthetic_configs()`.
      heads: head names (`mos_jax.heads.HEADS`), a list or "softmax,mos".
      widths: the widths d (a list or "8,16,32,64").
      workdir: cell (encoder, width) trains in `workdir/ENCODER-wWIDTH/HEAD`.
      steps, evals: the budget of every run (`mos_jax.compare.budget_config`): `steps`
        train steps in `evals` validated epochs. None: the configs' own epochs. A
        config with a decaying learning rate (`optim.decay_steps > 0`) gets
        `decay_steps = steps`.
      rank_contexts: cap on N, the validation contexts of each rank matrix
        (N = min(10 V, cap, validation length)).
      log: where progress and the table go.
      isolate: each run in a process of its own (as `compare-heads`).
      plot: write `study.png`.

    Returns the dict written to `study.json`: `rows` (one per encoder, width and head:
    `encoder`, `width`, `head`, `params`, `valid_ppl`, `rank`, `rank_bound`,
    `rank_contexts`, `steps`, `epochs`, `train_wall_s`, `tokens_per_s`), `encoders`,
    `heads`, `widths`, `budget`, `data`, `vocab_size`, `true_ppl` (synthetic corpus
    only), `wall_time_s`, `table` (the markdown lines) and the paths written.
    """
    from mos_jax import compare
    start = time.perf_counter()
    configs = dict(synthetic_configs() if configs is None else configs)
    if not configs:
        raise ConfigError("give at least one encoder config")
    parse_encoders(list(configs))
    head_names = heads_lib.parse_names(heads)
    widths = parse_widths(widths)
    if steps is not None and steps < 1:
        raise ConfigError(f"the step budget must be at least 1, got {steps}")
    cells = plan_runs(configs, head_names, widths, steps, evals)
    workdir = Path(workdir)
    outputs.make_folder("--workdir", workdir)  # a bad path: one line, before training
    first = next(iter(configs.values()))
    summary = {"encoders": list(configs), "heads": head_names, "widths": widths,
               "budget": {"steps": steps, "evals": evals}, "seed": int(first.train.seed),
               "data": {e: str(c.data.dir) for e, c in configs.items()},
               "rows": [], "true_ppl": None, "vocab_size": None}
    for i, (encoder, width, config) in enumerate(cells, 1):
        log(f"study: [{i}/{len(cells)}] {encoder}, width {width}: "
            f"{', '.join(head_names)}")
        result = compare.compare_heads(
            config, head_names, workdir / f"{encoder}-w{width}", steps=steps,
            evals=evals, rank_contexts=rank_contexts, isolate=isolate, plot=False,
            log=lambda line: None)
        for head in head_names:
            h = result["heads"][head]
            h = {**h, **_rank(workdir / f"{encoder}-w{width}" / head, rank_contexts,
                              h)}
            summary["rows"].append({
                "curve": validation_curve(workdir / f"{encoder}-w{width}" / head),
                "encoder": encoder, "width": width, "head": head,
                "params": h["params"], "valid_ppl": h["valid_ppl"], "rank": h["rank"],
                "rank_bound": h.get("rank_bound"), "rank_contexts": h["rank_contexts"],
                "steps": h["steps"], "epochs": h["epochs"],
                "train_wall_s": h.get("train_wall_s"),
                "tokens_per_s": h.get("tokens_per_s"), "reused": h.get("reused")})
            log(f"study:   {head:>10}: valid ppl {h['valid_ppl']:.2f}, rank "
                f"{h['rank']} (N={h['rank_contexts']})")
        summary["vocab_size"] = result["vocab_size"]
        summary["true_ppl"] = result["true_ppl"]
        if summary["true_ppl"] is not None and "true_rank" not in summary:
            summary["true_rank"] = true_rank(config, summary["rows"][-1]["rank_contexts"])
        _write(summary, workdir, start, log=log)
    deliveries = outputs.Deliveries()  # a failed write loses nothing: see check()
    if plot:
        summary["plot"] = outputs.where(deliveries.write(
            "", workdir / "study.png", lambda path: plot_study(summary, path)))
        if any(gap_curves(summary).values()):
            summary["gap_plot"] = outputs.where(deliveries.write(
                "", workdir / "study_gap.png", lambda path: plot_gap(summary, path)))
    _write(summary, workdir, start, deliveries=deliveries)
    for line in summary["table"]:
        log(line)
    deliveries.check()
    return summary


def _rank(run_dir: Path, cap: int, measured: dict) -> dict:
    """`rank` and `rank_contexts` of the run's best weights over the first
    N = min(10 V, cap, validation length) validation contexts: the compare's own
    measurement when its N (at most V) is that, else measured here. With N = 10 V
    contexts every word of a small vocabulary occurs as a context, so a model that fits
    a full-rank chain can show its full rank; at most V contexts cannot."""
    from mos_jax import rank as rank_lib
    from mos_jax import train
    if measured["rank_contexts"] < measured["vocab_size"]:
        return {}  # N was held below V by the cap or the split: the same N here
    _, corpus, model_config, params = train.load_best(run_dir)
    n = min(10 * corpus.vocab_size, cap, len(corpus.valid))
    if n == measured["rank_contexts"]:
        return {}
    matrix = rank_lib.logprob_matrix(model_config.replace(compute_dtype="float32"),
                                     params, corpus.valid, n)
    return {"rank": rank_lib.empirical_rank(matrix).rank, "rank_contexts": n}


def true_rank(config: config_lib.ConfigDict, n_contexts: int) -> int:
    """The synthetic chain's own rank over the first `n_contexts` validation contexts:
    the rank of its log-transition rows at those contexts' current words (float64,
    exact), the most a perfect model can show on the rank matrix."""
    import numpy as np

    from mos_jax import data as data_lib
    from mos_jax import rank as rank_lib
    s = config.data.synthetic
    corpus = data_lib.synthetic_corpus(**s.to_dict())
    chain = data_lib.synthetic_chain(**s.to_dict())
    rows = chain.log_rows(corpus.valid[:n_contexts])
    return int(rank_lib.empirical_rank(rows, eps=float(np.finfo(np.float64).eps)).rank)


def _write(summary: dict, workdir: Path, start: float, *,
           deliveries: outputs.Deliveries | None = None,
           log: Callable[[str], None] = print) -> None:
    """`study.md` and `study.json`: the final ones through `deliveries`; without it
    (after each cell, written again after the next), a failure is only logged."""
    summary["wall_time_s"] = time.perf_counter() - start
    summary["table"] = format_table(summary)
    summary["markdown"] = str(workdir / "study.md")
    summary["json"] = str(workdir / "study.json")
    if deliveries is None:
        try:
            for name, text in (("study.md", "\n".join(summary["table"]) + "\n"),
                               ("study.json", json.dumps(summary, indent=2) + "\n")):
                outputs.write_bytes(workdir / name, text.encode())
        except OSError as e:
            log(f"study: could not write {workdir / name} ({e.strerror or e}); "
                "trying again after the next run")
        return
    summary["markdown"] = outputs.where(deliveries.text(
        "", workdir / "study.md", "\n".join(summary["table"]) + "\n"))
    summary["json"] = outputs.where(deliveries.text(
        "", workdir / "study.json", json.dumps(summary, indent=2) + "\n"))


def validation_curve(run_dir: str | Path) -> list[list[float]]:
    """[step, validation perplexity] after each training epoch of the run in
    `run_dir` (its metrics.jsonl; the final summary line left out)."""
    from mos_jax.progress import read_metrics
    return [[int(m["step"]), float(m["valid_ppl"])] for m in read_metrics(run_dir)
            if m.get("mode") == "train" and not m.get("final") and "valid_ppl" in m]


def _best_so_far(curve: Sequence[Sequence[float]], step: int) -> float | None:
    seen = [ppl for s, ppl in curve if s <= step]
    return min(seen) if seen else None


def gap_curves(summary: dict, head: str = "mos", base: str = "softmax"
               ) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """The gap between two heads against training budget: for each (encoder, width)
    with both heads, [(step, log(ppl_head / ppl_base))] in nats per token at every
    step either run validated, each perplexity the best so far at that step (a run
    that stopped early keeps its best). Negative: `head` is ahead."""
    out = {}
    for r in summary["rows"]:
        if r["head"] != head:
            continue
        other = next((b for b in summary["rows"] if b["head"] == base
                      and (b["encoder"], b["width"]) == (r["encoder"], r["width"])), None)
        if other is None or not r.get("curve") or not other.get("curve"):
            continue
        steps = sorted({s for s, _ in r["curve"]} | {s for s, _ in other["curve"]})
        points = []
        for s in steps:
            a, b = _best_so_far(r["curve"], s), _best_so_far(other["curve"], s)
            if a is not None and b is not None:
                points.append((int(s), math.log(a / b)))
        out[(r["encoder"], r["width"])] = points
    return out


def plot_gap(summary: dict, out_png: str | Path, dpi: int = 100) -> Path:
    """The MoS-minus-softmax gap (nats per token, best validation perplexities so far)
    against training steps, one line per encoder (line style) and width (colour)."""
    from mos_jax.plot import finish, pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=dpi)
    try:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        styles = ["-", "--", "-.", ":"]
        widths = sorted(summary["widths"])
        for (encoder, width), points in gap_curves(summary).items():
            if not points:
                continue
            ax.plot([s for s, _ in points], [g for _, g in points], marker=".",
                    color=colors[widths.index(width) % len(colors)],
                    ls=styles[summary["encoders"].index(encoder) % len(styles)],
                    label=f"{encoder}, width {width}")
        ax.axhline(0.0, color="black", lw=1)
        ax.set_xlabel("training steps")
        ax.set_ylabel("log(ppl MoS / ppl softmax), nats per token")
        data = ", ".join(sorted(set(summary["data"].values())))
        ax.set_title(f"MoS minus softmax against training budget ({data})")
        fig.tight_layout()
        return finish(fig, ax, out_png, None, dpi)
    finally:
        plt.close(fig)


def format_table(summary: dict) -> list[str]:
    """The study as markdown lines: a heading, one row per encoder, head and width."""
    b = summary["budget"]
    budget = (f"{b['steps']:,} steps in {b['evals'] or 'the default'} epochs per run"
              if b["steps"] is not None else "the configs' own epochs")
    data = ", ".join(sorted(set(summary["data"].values())))
    lines = [f"Width study on {data} (V={summary['vocab_size'] or '?'}), seed "
             f"{summary['seed']}, budget: {budget}.", "",
             "| encoder | head | width | params | valid ppl | rank | rank bound | "
             "train s | steps |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = sorted(summary["rows"], key=lambda r: (
        summary["encoders"].index(r["encoder"]), summary["heads"].index(r["head"]),
        r["width"]))
    for r in rows:
        bound = "" if r["rank_bound"] is None else f"{r['rank_bound']:,}"
        wall = "" if r.get("train_wall_s") is None else f"{r['train_wall_s']:.0f}"
        lines.append(f"| {r['encoder']} | {r['head']} | {r['width']} | "
                     f"{r['params']:,} | {r['valid_ppl']:.2f} | {r['rank']} | {bound} | "
                     f"{wall} | {r['steps']:,} |")
    n = sorted({r["rank_contexts"] for r in summary["rows"]})
    lines += ["", "Valid ppl: the best weights on the whole validation split. Rank: "
              "numerical rank of the [N, V] log-probability matrix over the first "
              f"N = {', '.join(map(str, n))} validation contexts; rank bound: what the "
              "head declares (a softmax over a d-vector: d + 2; empty: no bound). "
              "Train s: the run's training and validation wall time, as measured by "
              "the invocation that trained it. Steps: the train steps it took (with "
              "early stopping, as many as its validation kept improving)."]
    if summary.get("true_ppl") is not None:
        lines.append(f"True perplexity of the synthetic chain (exp entropy rate): "
                     f"{summary['true_ppl']:.2f}. Its log-transition matrix has "
                     f"full rank {summary['vocab_size']}; over the same {n[0]} "
                     f"contexts (as many distinct current words) its rank is "
                     f"{summary.get('true_rank')}.")
    return lines


def plot_study(summary: dict, out_png: str | Path, dpi: int = 100) -> Path:
    """Validation perplexity (left) and rank (right) against width, one line per head
    and encoder (colour: head, line style: encoder); the softmax rank bound d + 2 and
    the largest possible rank min(N, V) dotted, the true perplexity where known."""
    from mos_jax.plot import pyplot
    plt = pyplot()
    fig, (ax_p, ax_r) = plt.subplots(1, 2, figsize=(11.0, 4.5), dpi=dpi)
    try:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        styles = ["-", "--", "-.", ":"]
        for ei, encoder in enumerate(summary["encoders"]):
            for hi, head in enumerate(summary["heads"]):
                rows = sorted((r for r in summary["rows"] if r["encoder"] == encoder
                               and r["head"] == head), key=lambda r: r["width"])
                if not rows:
                    continue
                kw = dict(color=colors[hi % len(colors)], ls=styles[ei % len(styles)],
                          marker="o", label=f"{head}, {encoder}")
                w = [r["width"] for r in rows]
                ax_p.plot(w, [r["valid_ppl"] for r in rows], **kw)
                ax_r.plot(w, [r["rank"] for r in rows], **kw)
        widths = sorted(summary["widths"])
        if summary.get("true_ppl") is not None:
            ax_p.axhline(summary["true_ppl"], color="black", lw=1, ls=":",
                         label=f"true perplexity {summary['true_ppl']:.2f}")
        ax_r.plot(widths, [w + 2 for w in widths], color="gray", lw=1, ls=":",
                  label="softmax bound d + 2")
        if summary["rows"]:
            cap = min(min(r["rank_contexts"] for r in summary["rows"]),
                      summary["vocab_size"] or math.inf)
            ax_r.axhline(cap, color="black", lw=1, ls=":", label=f"min(N, V) = {cap}")
        if summary.get("true_rank") is not None:
            ax_r.axhline(summary["true_rank"], color="black", lw=1, ls="-.",
                         label=f"true chain {summary['true_rank']}")
        for ax in (ax_p, ax_r):
            ax.set_xscale("log", base=2)
            ax.set_xticks(widths)
            ax.set_xticklabels([str(w) for w in widths])
            ax.set_xlabel("width d (emsize = encoder output)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
        ax_p.set_yscale("log")
        from matplotlib import ticker
        ax_p.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax_p.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax_p.set_ylabel("validation perplexity (best weights)")
        ax_r.set_ylabel("empirical rank of the log-probability matrix")
        data = ", ".join(sorted(set(summary["data"].values())))
        fig.suptitle(f"width study on {data}, V={summary['vocab_size']}")
        fig.tight_layout()
        out = Path(out_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
        return out
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------
# The vocabulary study: heads x BPE vocabulary sizes at one width, per word.

def parse_vocab_sizes(text: str | Sequence[int]) -> list[int]:
    """Vocabulary sizes from "2000,8000" (or a list): distinct, at least 4, in order."""
    return config_lib.parse_int_list(
        text, "vocabulary size", "--vocab-sizes 2000,8000", 4,
        "a bpe vocabulary holds its 2 special tokens, ▁ and the characters: sizes")


def vocab_config(config: config_lib.ConfigDict, size: int, width: int | None
                 ) -> config_lib.ConfigDict:
    """A copy of `config` on a bpe vocabulary of `size` pieces (at `width`, if given)."""
    c = config.copy_and_resolve_references() if width is None else width_config(config,
                                                                                 width)
    c.data.tokenizer = "bpe"
    c.data.vocab_size = int(size)
    return c


def run_vocab_study(config: config_lib.ConfigDict,
                    heads: str | Sequence[str] = DEFAULT_HEADS,
                    vocab_sizes: str | Sequence[int] = (2000, 8000),
                    workdir: str | Path = "runs/vocab-study", *, width: int | None = None,
                    steps: int | None = DEFAULT_STEPS, evals: int | None = DEFAULT_EVALS,
                    rank_contexts: int = 2000, log: Callable[[str], None] = print,
                    isolate: bool = True, plot: bool = True) -> dict:
    """Train every head on BPE vocabularies of each size of `vocab_sizes` (trained on
    `config`'s corpus directory), at one width, with one budget; per-word validation
    perplexity and rank, as a table, JSON and a plot.

    `width`: the softmax-bounding width (`width_config`); None keeps the config's.
    Every tokenizer is trained (or read from the cache) and every size checked before
    anything trains: a size the corpus cannot reach is refused in one line. Runs train
    in `workdir/bpeN/HEAD` (`compare.compare_heads`: finished runs are reused,
    interrupted ones resumed). Written into `workdir`: `vocab_study.json`,
    `vocab_study.md`, `vocab_study.png`. Rows: `vocab_size`, `head`, `params`,
    `valid_ppl` (per piece), `valid_word_ppl` (per word of the word-level text,
    `<eos>` counted), `pieces_per_word`, `rank`, `rank_contexts`, `steps`, `epochs`,
    `train_wall_s`.
    """
    from mos_jax import compare, evaluate
    from mos_jax import train
    start = time.perf_counter()
    head_names = heads_lib.parse_names(heads)
    sizes = parse_vocab_sizes(vocab_sizes)
    if width is not None:
        parse_widths([width])
    if steps is not None and steps < 1:
        raise ConfigError(f"the step budget must be at least 1, got {steps}")
    cells = []
    for size in sizes:  # every error (config, corpus, size) before any training
        c = vocab_config(config, size, width)
        config_lib.validate(c, unknown_ok=True)
        corpus = train.load_corpus_from(c)
        budget = compare.budget_config(c, steps=steps, evals=evals)
        for head in head_names:
            compare.head_config(budget, head)
        cells.append((size, c, len(corpus.valid), corpus.words_in("valid")))
    workdir = Path(workdir)
    outputs.make_folder("--workdir", workdir)
    summary = {"heads": head_names, "vocab_sizes": sizes, "width": width,
               "encoder": str(config.model.get("encoder", "lstm")),
               "budget": {"steps": steps, "evals": evals}, "seed": int(config.train.seed),
               "data": str(config.data.dir), "rows": []}
    for i, (size, c, tokens, words) in enumerate(cells, 1):
        log(f"vocab study: [{i}/{len(cells)}] bpe {size}: {', '.join(head_names)}")
        result = compare.compare_heads(
            c, head_names, workdir / f"bpe{size}", steps=steps, evals=evals,
            rank_contexts=rank_contexts, isolate=isolate, plot=False,
            log=lambda line: None)
        for head in head_names:
            h = result["heads"][head]
            row = {"vocab_size": size, "head": head, "params": h["params"],
                   "valid_ppl": h["valid_ppl"],
                   "valid_word_ppl": evaluate.word_perplexity(
                       math.log(h["valid_ppl"]), tokens, words),
                   "pieces_per_word": tokens / words, "rank": h["rank"],
                   "rank_contexts": h["rank_contexts"], "steps": h["steps"],
                   "epochs": h["epochs"], "train_wall_s": h.get("train_wall_s")}
            summary["rows"].append(row)
            log(f"vocab study:   {head:>10}: valid ppl {row['valid_ppl']:.2f} per piece, "
                f"{row['valid_word_ppl']:.2f} per word, rank {row['rank']} "
                f"(N={row['rank_contexts']})")
        _write_vocab(summary, workdir, start, log)
    deliveries = outputs.Deliveries()
    if plot:
        summary["plot"] = outputs.where(deliveries.write(
            "", workdir / "vocab_study.png", lambda path: plot_vocab_study(summary, path)))
    _write_vocab(summary, workdir, start, log, deliveries)
    for line in summary["table"]:
        log(line)
    deliveries.check()
    return summary


def _write_vocab(summary: dict, workdir: Path, start: float, log: Callable[[str], None],
                 deliveries: outputs.Deliveries | None = None) -> None:
    summary["wall_time_s"] = time.perf_counter() - start
    summary["table"] = format_vocab_table(summary)
    texts = (("vocab_study.md", "\n".join(summary["table"]) + "\n"),
             ("vocab_study.json", json.dumps(summary, indent=2) + "\n"))
    if deliveries is None:
        try:
            for name, text in texts:
                outputs.write_bytes(workdir / name, text.encode())
        except OSError as e:
            log(f"vocab study: could not write {workdir / name} ({e.strerror or e}); "
                "trying again after the next run")
        return
    for name, text in texts:
        deliveries.text("", workdir / name, text)


def format_vocab_table(summary: dict) -> list[str]:
    """The vocabulary study as markdown lines, one row per head and size."""
    b = summary["budget"]
    budget = (f"{b['steps']:,} steps in {b['evals'] or 'the default'} epochs per run"
              if b["steps"] is not None else "the config's own epochs")
    width = summary["width"] if summary["width"] is not None else "the config's"
    lines = [f"Vocabulary study on {summary['data']} (bpe), {summary['encoder']} encoder, "
             f"width {width}, seed {summary['seed']}, budget: {budget}.", "",
             "| head | vocab | pieces/word | params | valid ppl (piece) | "
             "valid ppl (word) | rank |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = sorted(summary["rows"], key=lambda r: (summary["heads"].index(r["head"]),
                                                  r["vocab_size"]))
    for r in rows:
        lines.append(f"| {r['head']} | {r['vocab_size']:,} | {r['pieces_per_word']:.3f} | "
                     f"{r['params']:,} | {r['valid_ppl']:.2f} | {r['valid_word_ppl']:.2f} "
                     f"| {r['rank']} |")
    lines += ["", "Valid ppl (word): per word of the word-level validation text, <eos> "
              "counted as a word, exp(piece NLL x pieces / words), so the sizes compare. "
              "Rank: numerical rank of the [N, V] log-probability matrix over the first "
              "N = min(V, cap) validation contexts."]
    return lines


def plot_vocab_study(summary: dict, out_png: str | Path, dpi: int = 100) -> Path:
    """Per-word validation perplexity (left) and rank (right) against vocabulary
    size, one line per head."""
    from mos_jax.plot import pyplot
    plt = pyplot()
    fig, (ax_p, ax_r) = plt.subplots(1, 2, figsize=(11.0, 4.5), dpi=dpi)
    try:
        for head in summary["heads"]:
            rows = sorted((r for r in summary["rows"] if r["head"] == head),
                          key=lambda r: r["vocab_size"])
            v = [r["vocab_size"] for r in rows]
            ax_p.plot(v, [r["valid_word_ppl"] for r in rows], marker="o", label=head)
            ax_r.plot(v, [r["rank"] for r in rows], marker="o", label=head)
        from matplotlib import ticker
        sizes = sorted(summary["vocab_sizes"])
        for ax in (ax_p, ax_r):
            ax.set_xscale("log")
            ax.set_xticks(sizes)
            ax.set_xticklabels([f"{v:,}" for v in sizes])
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel("bpe vocabulary size")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
        ax_p.set_ylabel("validation perplexity per word")
        ax_r.set_ylabel("empirical rank of the log-probability matrix")
        fig.suptitle(f"vocabulary study on {summary['data']}")
        fig.tight_layout()
        out = Path(out_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
        return out
    finally:
        plt.close(fig)
