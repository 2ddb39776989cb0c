"""Train several output heads with one config, seed and budget, and compare them.

`compare_heads(config, heads, workdir)` trains every head in `workdir/NAME` with
`config.model.head = NAME` and otherwise the same config (seed, data, budget), each in
its own Python process (`python -m mos_jax.compare --worker ...`) so that its peak
memory is its own. Then, per head, from that process:

- `params`: the number of parameters;
- `tokens_per_s`: training tokens over training time (`train_tokens` and `train_s`
  of `metrics.jsonl`), validation excluded, over the epochs after the first (which
  compiles the train step) when there are any (`throughput`);
- `peak_rss_bytes`: the worker's peak resident memory (`ru_maxrss`) when training
  ends (JAX, the compiler and the corpus included), and `peak_device_bytes`, the
  device's `peak_bytes_in_use` where the device reports one (GPU/TPU);
- `valid_ppl`: `mos_jax.evaluate.perplexity` of the best weights on the whole
  validation split (`data.eval_batch_size`, `data.bptt`);
- `by_frequency`: the best weights' validation perplexity per training-set frequency
  bucket (`mos_jax.frequency.by_frequency`, default buckets; a second table);
- `rank`: the empirical rank (`mos_jax.rank`) of the best weights' `[N, V]`
  log-probability matrix over the first `N = min(V, rank_contexts)` validation
  contexts, computed in float32.

Heads that tie the decoder to the last layer's output (those that declare
`mos_jax.heads.Head.tied`: softmax, sigsoftmax) need `model.nhidlast ==
model.emsize`: they get that, with a note in the table; a head that cannot be built
with the config is a one-line error before anything trains.

The budget is the same for every head: `steps=N` trains N steps in `evals` epochs of
`ceil(N / evals)` steps (whole epochs, so that each run ends validated and finished);
`time_budget_s=S` stops each run after S seconds of training (`train.time_budget_s`;
the steps after the last finished epoch are not validated, so keep epochs short with
`train.steps_per_epoch`). Neither: the config's own `train.max_epochs`. An epoch cut
short by `train.steps_per_epoch` starts at the beginning of the training text like any
other (the training loop's rule), so many short epochs re-read the same text.

Written into `workdir`: `compare.json` (everything), `compare.md` (the table) and
`learning_curves.png` (every head's validation and training perplexity per epoch).
Each head's measurements are kept in `workdir/NAME/compare_head.json`; a rerun with the
same settings reuses them without training, and a run that was interrupted resumes
from its checkpoints (a time-budgeted run then gets its budget afresh).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from mos_jax import config as config_lib
from mos_jax import heads as heads_lib
from mos_jax import outputs
from mos_jax.errors import CheckpointError, ConfigError, MosJaxError, note

RESULT_FILE = "compare_head.json"  # per head, in its sub-workdir
WORKER_SPEC = ".compare_worker_spec.json"
WORKER_OUT = ".compare_worker_out.json"
DEFAULT_RANK_CONTEXTS = 2000
# Keys that change neither what a run computes nor what it measures.
_IGNORED_KEYS = {"train.checkpoint_every_s", "train.log_every_steps"}


def budget_config(config: config_lib.ConfigDict, *, steps: int | None = None,
                  time_budget_s: float | None = None, evals: int | None = None
                  ) -> config_lib.ConfigDict:
    """A copy of `config` with the comparison's budget in its `train` section.

    `steps`: `train.max_epochs = E` epochs of `train.steps_per_epoch = ceil(steps / E)`
    steps, `E = evals` or by default `min(train.max_epochs, 20, steps)` (then
    `ceil(steps / steps_per_epoch)`, so no epoch is empty); `train.stop_at_step` is
    cleared. `time_budget_s`: `train.time_budget_s`. An epoch never has more steps than
    the corpus has windows, so a run can take fewer than `steps` steps (the table says
    how many it took).
    """
    c = config.copy_and_resolve_references()
    if steps is not None and time_budget_s is not None:
        raise ConfigError("give a step budget or a time budget, not both")
    t = c.train
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"the step budget must be at least 1, got {steps}")
        epochs = evals or min(int(t.max_epochs), 20, steps)
        if epochs < 1:
            raise ConfigError(f"evals must be at least 1, got {evals}")
        per_epoch = -(-steps // min(epochs, steps))
        t.steps_per_epoch = per_epoch
        t.max_epochs = -(-steps // per_epoch)
        t.stop_at_step = 0
    elif evals is not None:
        raise ConfigError("evals splits a step budget: give steps too")
    if time_budget_s is not None:
        if time_budget_s <= 0:
            raise ConfigError(f"the time budget must be positive, got {time_budget_s}")
        t.time_budget_s = float(time_budget_s)
    return c


def _probe(model_section: dict) -> None:
    """Build the model's parameter shapes (no compute); raises what the head raises.

    The corpus is not loaded yet, so the vocabulary is a large stand-in (shapes only,
    nothing is allocated): options bounded by V (an adaptive head's cutoffs) are checked
    against the real V when the run loads its corpus."""
    import jax

    from mos_jax import model as model_lib
    mc = model_lib.ModelConfig.from_dict({**model_section, "vocab_size": 1 << 20})
    jax.eval_shape(model_lib.init_params, mc, jax.random.key(0))


def head_config(config: config_lib.ConfigDict, head: str, test: bool = False
                ) -> tuple[config_lib.ConfigDict, list[str]]:
    """`config` with `model.head = head` (and `train.test = test`), and notes.

    A head that declares itself tied (`mos_jax.heads.Head.tied`: its decoder is the
    embedding applied to the last layer) gets the encoder's width (`model.nhidlast`
    for the LSTM, `model.d_model` for the Transformer) set to `model.emsize` when the
    config differs, and a note says so. Then the model's parameter shapes are built
    (no compute): a head that cannot be built raises a one-line ConfigError naming it.
    """
    from mos_jax import model as model_lib
    c = config.copy_and_resolve_references()
    c.model.head = head
    c.train.test = bool(test)
    m = c.model
    width_note = model_lib.set_tied_width(m)
    notes = [width_note] if width_note else []
    encoder = model_lib.ENCODERS.get(m.get("encoder", "lstm"), model_lib.AWDLSTM)
    key = encoder.width_key  # nhidlast (LSTM), d_model (Transformer)
    try:
        _probe(m.to_dict())
    except Exception as e:  # a head of one's own may fail in any way: one line
        text = str(e).strip().splitlines()
        reason = text[0] if text else ""
        if not isinstance(e, MosJaxError):
            reason = f"{type(e).__name__}: {reason}".rstrip(": ")
        hint = ""
        if encoder.output_size(m) != m.emsize:
            hint = (f" ({key} {m[key]} != emsize {m.emsize}: a head whose decoder "
                    "is the embedding applied to its input declares tied = True)")
        raise ConfigError(f"the {head} head cannot be built with this config: "
                          f"{reason}{hint}") from None
    return c, notes


def _differences(old: dict, new: dict) -> list[str]:
    """`key old != new` for the run-defining sections of two config dicts. A key one
    of them lacks (a run saved before the key existed) counts at its default."""
    defaults = config_lib.flat_values(config_lib.default_config().to_dict())
    a = {**defaults, **config_lib.flat_values(json.loads(json.dumps(old)))}
    b = {**defaults, **config_lib.flat_values(json.loads(json.dumps(new)))}
    keys = sorted(k for k in set(a) | set(b)
                  if k.split(".")[0] in ("model", "data", "optim", "train")
                  and k not in _IGNORED_KEYS)
    return [f"{k} {a.get(k)!r} != {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


# ---------------------------------------------------------------------- one head

def throughput(records: list[dict]) -> dict:
    """Training tokens, seconds and tokens/s of a run, from its per-epoch records.

    `tokens_per_s` leaves out epoch 1, which compiles the train step, when the run has
    later epochs (it is epoch 1 alone otherwise); `tokens_per_s_all` counts every
    epoch, and `train_tokens`, `train_s` are its sums. Every record counts (a resumed
    epoch logs the part after the resume again, with that part's tokens and time), so
    interrupted parts that were never logged are left out of both sums. Records
    written before `train_tokens`/`train_s` existed fall back to
    `tokens_per_s * wall_time` (validation time included).
    """
    def sums(rs):
        tokens = seconds = 0.0
        for r in rs:
            if "train_tokens" in r and "train_s" in r:
                tokens += r["train_tokens"]
                seconds += r["train_s"]
            elif "tokens_per_s" in r and "wall_time" in r:
                tokens += r["tokens_per_s"] * r["wall_time"]
                seconds += r["wall_time"]
        return tokens, seconds

    tokens, seconds = sums(records)
    later = [r for r in records if int(r["epoch"]) > 1]
    steady_tokens, steady_s = sums(later) if later else (tokens, seconds)
    return {"train_tokens": int(round(tokens)), "train_s": seconds,
            "tokens_per_s_all": tokens / seconds if seconds > 0 else None,
            "tokens_per_s": steady_tokens / steady_s if steady_s > 0 else None}


def run_head(config: config_lib.ConfigDict, workdir: str | Path, *,
             rank_contexts: int = DEFAULT_RANK_CONTEXTS,
             log: Callable[[str], None] = print) -> dict:
    """Train (or resume, or reuse) the run in `workdir` and measure it (see module doc).

    Meant to run in a process of its own (the worker), which makes the peak memory
    this head's. `peak_rss_bytes` is None when this process trained nothing (the run
    had finished before).
    """
    from mos_jax import evaluate, frequency
    from mos_jax import model as model_lib
    from mos_jax import rank as rank_lib
    from mos_jax import train
    from mos_jax import progress as progress_lib
    from mos_jax.progress import read_metrics

    workdir = Path(workdir)
    head = config.model.head
    start = time.perf_counter()
    result = train.train_and_evaluate(config, workdir, log=log)
    trained = result["trained_steps"] > 0
    train_wall = time.perf_counter() - start
    peak_rss = progress_lib.peak_rss_bytes() if trained else None
    peak_device = progress_lib.peak_device_bytes() if trained else None

    try:
        _, corpus, model_config, params = train.load_best(workdir)
    except CheckpointError:
        raise MosJaxError(
            f"the {head} head finished no epoch within the budget, so it has no "
            "validated weights: raise the budget, or shorten epochs with "
            "--config.train.steps_per_epoch") from None
    records = [r for r in read_metrics(workdir)
               if r.get("mode") == "train" and not r.get("final") and "epoch" in r]
    epochs = sorted({int(r["epoch"]) for r in records})
    steps = result.get("step", records[-1]["step"] if records else 0)
    valid = corpus.valid
    if records and not config.train.eval_max_tokens:
        # The loop validated the best weights on the whole split with this batch size
        # and bptt, through `evaluate`'s program: the same number, without recompiling.
        ppl = math.exp(min(r["valid_loss"] for r in records))
    else:
        ppl = evaluate.perplexity(model_config, params, valid,
                                  config.data.eval_batch_size, config.data.bptt)
    # Perplexity by training-set word frequency on the same split (`mos_jax.frequency`).
    freq = frequency.by_frequency(model_config, params, corpus, "valid",
                                  config.data.eval_batch_size, config.data.bptt)
    n = min(corpus.vocab_size, rank_contexts, len(valid))
    # In float32 whatever model.compute_dtype: bfloat16 round-off would count as rank.
    matrix = rank_lib.logprob_matrix(model_config.replace(compute_dtype="float32"),
                                     params, valid, n)
    r = rank_lib.empirical_rank(matrix)
    out = {
        "head": head,
        "params": model_lib.param_count(params),
        **throughput(records),
        "peak_rss_bytes": peak_rss,
        "peak_device_bytes": peak_device,
        "trained_now": trained,
        "train_wall_s": train_wall,
        "steps": int(steps),
        "epochs": len(epochs),
        "stopped": result.get("stopped"),
        "best_epoch": result.get("best_epoch"),
        "valid_ppl": ppl,
        "valid_tokens": int(len(valid) // config.data.eval_batch_size - 1)
        * int(config.data.eval_batch_size),
        "rank": r.rank,
        "rank_contexts": n,
        "rank_threshold": r.threshold,
        "top_singular_value": float(r.singular_values[0]),
        "vocab_size": corpus.vocab_size,
        "emsize": model_config.emsize,
        "nhidlast": model_config.nhidlast,
        "rank_bound": heads_lib.get_head(head).rank_bound(model_config),
        "entropy_rate": corpus.entropy_rate,
        "by_frequency": {k: freq[k] for k in ("top", "edges", "tokens", "nll", "ppl",
                                               "buckets")},
    }
    if out["best_epoch"] is None and records:
        best = min(records, key=lambda rec: rec["valid_loss"])
        out["best_epoch"] = int(best["epoch"])
    if "test_ppl" in result:
        out["test_ppl"] = result["test_ppl"]
    return out


def _run_worker(spec: dict, workdir: Path, head: str) -> dict:
    """`run_head` in a child process; its result, or the error it reported."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = workdir / WORKER_SPEC, workdir / WORKER_OUT
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "mos_jax.compare", "--worker", str(spec_path),
           str(out_path)]
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the child too: let it save, then stop
        proc.wait()
        raise
    reply = json.loads(out_path.read_text()) if out_path.is_file() else {}
    spec_path.unlink(missing_ok=True)
    out_path.unlink(missing_ok=True)
    if rc == 130:
        raise KeyboardInterrupt(f"the {head} head was interrupted; its checkpoint is in "
                                f"{workdir}: run the comparison again to resume it")
    if "error" in reply:
        raise MosJaxError(f"{head} head: {reply['error']}")
    if rc != 0 or "result" not in reply:
        raise MosJaxError(f"training the {head} head failed (exit status {rc}); its "
                          "output is above")
    return reply["result"]


def _worker_main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    config = config_lib.ConfigDict(spec["config"])
    config.lock()
    try:
        result = run_head(config, spec["workdir"], rank_contexts=spec["rank_contexts"],
                          log=note)
    except MosJaxError as e:
        Path(out_path).write_text(json.dumps({"error": str(e)}))
        return 2
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    Path(out_path).write_text(json.dumps({"result": result}))
    return 0


# ------------------------------------------------------------------- the comparison

def compare_heads(config: config_lib.ConfigDict, heads: str | Sequence[str],
                  workdir: str | Path, *, log: Callable[[str], None] = print,
                  steps: int | None = None, time_budget_s: float | None = None,
                  evals: int | None = None, rank_contexts: int = DEFAULT_RANK_CONTEXTS,
                  test: bool = False, isolate: bool = True, plot: bool = True,
                  title: str | None = None) -> dict:
    """Train each head of `heads` on `config` with one budget; table, JSON and plot.

    Args:
      config: a ConfigDict (`mos_jax.config.load_config`); `model.head` is replaced.
      heads: names registered in `mos_jax.heads.HEADS` (a list, or "softmax,mos").
      workdir: head NAME trains in `workdir/NAME`; the outputs go into `workdir`.
      log: where the table and the comparison's own messages go (the runs' progress
        goes to stderr).
      steps, time_budget_s, evals: the budget (`budget_config`).
      rank_contexts: the cap on N, the validation contexts of the rank matrix.
      test: also evaluate the best weights on the test split (`train.test`) when a
        run finishes; reported as `test_ppl`.
      isolate: train each head in a process of its own (peak memory per head); False
        runs them here (`peak_rss_bytes` is then this process's peak so far).
      plot: write `learning_curves.png`.

    Returns the dict written to `compare.json`: `heads` (name -> measurements, see the
    module doc, plus `notes`), `order`, `budget`, `seed`, `rank_contexts`, `table`
    (the markdown lines), and the paths written.
    """
    from mos_jax import train
    names = heads_lib.parse_names(heads)
    if rank_contexts < 1:
        raise ConfigError(f"rank_contexts must be at least 1, got {rank_contexts}")
    workdir = Path(workdir)
    base = budget_config(config, steps=steps, time_budget_s=time_budget_s, evals=evals)
    plans = {}
    for name in names:  # every config error before any training
        plans[name] = head_config(base, name, test=test)
    outputs.make_folder("--workdir", workdir)  # a bad path: one line, before training
    results: dict[str, dict] = {}
    for name in names:
        cfg, notes = plans[name]
        sub = workdir / name
        spec = {"config": json.loads(config_lib.to_json(cfg)), "workdir": str(sub),
                "rank_contexts": rank_contexts}
        marker = sub / RESULT_FILE
        saved = json.loads(marker.read_text()) if marker.is_file() else None
        same_run = saved is not None and not _differences(
            saved.get("spec", {}).get("config", {}), spec["config"])
        if same_run and saved["spec"].get("rank_contexts") == rank_contexts:
            log(f"compare: reusing the {name} head's measurements in {marker}")
            results[name] = {**saved["result"], "reused": True}
            continue
        if (sub / "config.json").is_file():
            diff = _differences(train.load_run_config(sub).to_dict(), spec["config"])
            if diff:
                raise ConfigError(
                    f"{sub} holds a run with other settings ({'; '.join(diff[:4])}"
                    f"{'; ...' if len(diff) > 4 else ''}): use another --workdir, or "
                    f"delete {sub} to train the {name} head anew")
        log(f"compare: training the {name} head in {sub}")
        if isolate:
            result = _run_worker(spec, sub, name)
        else:
            result = run_head(cfg, sub, rank_contexts=rank_contexts, log=log)
        if not result["trained_now"] and same_run:
            for key in ("peak_rss_bytes", "peak_device_bytes", "train_wall_s"):
                result[key] = saved["result"].get(key)  # measured when it trained
        result["notes"] = notes
        marker.write_text(json.dumps({"spec": spec, "result": result}, indent=2) + "\n")
        results[name] = {**result, "reused": False}

    first = results[names[0]]
    summary = {
        "order": names,
        "heads": results,
        "budget": {"steps": steps, "time_budget_s": time_budget_s,
                   "evals": evals, "steps_per_epoch": int(base.train.steps_per_epoch),
                   "max_epochs": int(base.train.max_epochs)},
        "seed": int(base.train.seed),
        "data": str(base.data.dir),
        "vocab_size": first["vocab_size"],
        "rank_contexts": first["rank_contexts"],
        "true_ppl": (math.exp(first["entropy_rate"])
                     if first.get("entropy_rate") is not None else None),
    }
    deliveries = outputs.Deliveries()  # a failed write loses nothing: see check()
    if plot:
        from mos_jax.plot import plot_learning_curves
        title = title or (f"heads on {Path(str(base.data.dir)).name}, "
                          f"V={summary['vocab_size']}, seed {summary['seed']}")
        summary["plot"] = outputs.where(deliveries.write(
            "", workdir / "learning_curves.png", lambda path: plot_learning_curves(
                {name: workdir / name for name in names}, path, title=title,
                reference_ppl=summary["true_ppl"])))
    summary["table"] = format_table(summary)
    summary["markdown"] = outputs.where(deliveries.text(
        "", workdir / "compare.md", "\n".join(summary["table"]) + "\n"))
    summary["json"] = str(workdir / "compare.json")
    summary["json"] = outputs.where(deliveries.text(
        "", workdir / "compare.json", json.dumps(summary, indent=2) + "\n"))
    for line in summary["table"]:
        log(line)
    deliveries.check()
    return summary


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2 ** 20:,.0f} MiB"


def _budget_text(summary: dict) -> str:
    b = summary["budget"]
    if b["steps"] is not None:
        return (f"{b['steps']:,} steps ({b['max_epochs']} epochs of "
                f"{b['steps_per_epoch']:,} steps)")
    if b["time_budget_s"] is not None:
        return f"{b['time_budget_s']:g} s of training"
    per = f" of {b['steps_per_epoch']:,} steps" if b["steps_per_epoch"] else ""
    return f"the config's {b['max_epochs']} epochs{per}"


def format_table(summary: dict) -> list[str]:
    """The comparison as markdown lines: a heading line, the table, notes."""
    names = summary["order"]
    heads = summary["heads"]
    n = summary["rank_contexts"]
    device = any(heads[h].get("peak_device_bytes") is not None for h in names)
    test = any("test_ppl" in heads[h] for h in names)
    cols = ["head", "params", "tokens/s", "peak RSS"]
    cols += ["peak device mem"] if device else []
    cols += ["steps", "epochs", "valid ppl"] + (["test ppl"] if test else [])
    cols += [f"rank (N={n})", "notes"]
    rows = []
    for name in names:
        h = heads[name]
        tps = h.get("tokens_per_s")
        row = [name, f"{h['params']:,}", "n/a" if tps is None else f"{tps:,.0f}",
               _mib(h.get("peak_rss_bytes"))]
        if device:
            row.append(_mib(h.get("peak_device_bytes")))
        row += [f"{h['steps']:,}", str(h["epochs"]), f"{h['valid_ppl']:.2f}"]
        if test:
            row.append(f"{h['test_ppl']:.2f}" if "test_ppl" in h else "")
        notes = list(h.get("notes", []))
        if h.get("best_epoch") is not None and h["best_epoch"] != h["epochs"]:
            notes.append(f"best epoch {h['best_epoch']}")
        if h.get("stopped"):
            notes.append(h["stopped"])
        row += [str(h["rank"]), "; ".join(notes)]
        rows.append(row)
    lines = [f"Heads compared on {summary['data']} (V={summary['vocab_size']:,}), "
             f"seed {summary['seed']}, budget: {_budget_text(summary)}.", "",
             "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if i in (0, len(cols) - 1) else "---:"
                            for i in range(len(cols))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    bounds = [f"{name} {heads[name]['rank_bound']:,}" for name in names
              if heads[name].get("rank_bound") is not None]
    bound = (f" Rank bounds the heads declare (a softmax over a d-vector: d + 2): "
             f"{', '.join(bounds)}." if bounds else "")
    lines += ["",
              "tokens/s: training tokens / training time, validation excluded, over "
              "the epochs after the first (which compiles the train step). Peak RSS: the head's training process's maximum "
              "resident memory (JAX and the compiler included). Valid ppl: the best "
              "weights on the whole validation split. Rank: numerical rank of the "
              f"[N, V] log-probability matrix over the first N = {n} validation "
              f"contexts.{bound}"]
    if summary.get("true_ppl") is not None:
        lines.append(f"True perplexity of the synthetic chain (exp entropy rate): "
                     f"{summary['true_ppl']:.2f}.")
    return lines + frequency_table(summary)


def frequency_table(summary: dict) -> list[str]:
    """Validation perplexity per training-frequency bucket (`mos_jax.frequency`): a row
    of token counts, then a row per head, each cell `ppl (share of the head's loss)`.
    Empty when no head has the buckets (measurements saved before they existed)."""
    names = [h for h in summary["order"] if summary["heads"][h].get("by_frequency")]
    if not names:
        return []
    first = summary["heads"][names[0]]["by_frequency"]
    buckets = [b["name"] for b in first["buckets"]]
    cols = ["head"] + buckets + ["all"]
    tokens = ["tokens"] + [f"{b['tokens']:,} ({100 * b['token_share']:.1f}%)"
                           for b in first["buckets"]] + [f"{first['tokens']:,}"]
    lines = ["", "Validation perplexity by training-set word frequency (ppl, and in "
             "brackets the bucket's share of the head's total loss):", "",
             "| " + " | ".join(cols) + " |",
             "|---|" + "|".join("---:" for _ in cols[1:]) + "|",
             "| " + " | ".join(tokens) + " |"]
    for name in names:
        f = summary["heads"][name]["by_frequency"]
        cells = [name]
        for b in f["buckets"]:
            cells.append("-" if b["ppl"] is None else
                         f"{b['ppl']:.2f} ({100 * b['loss_share']:.0f}%)")
        lines.append("| " + " | ".join(cells + [f"{f['ppl']:.2f}"]) + " |")
    edges = ", ".join(map(str, first["edges"]))
    lines += ["", f"Buckets: the {first['top']} most frequent training types, then "
              f"training count edges {edges or 'none'}, <unk> on its own (a type is in "
              "one bucket only; unseen words count 0). The all column is the mean over "
              "every validation token, as valid ppl above but from this evaluation."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="worker of `mos-jax compare-heads`: one head's run and measurements")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), required=True)
    args = parser.parse_args(argv)
    return _worker_main(*args.worker)


if __name__ == "__main__":
    sys.exit(main())
