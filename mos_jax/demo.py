"""The softmax-bottleneck demo: a softmax head and a MoS head of one hidden size.

`run_demo(workdir)` trains both heads (same config otherwise) on the built-in synthetic
corpus, a random first-order Markov chain whose log-transition matrix has full rank V
(see `mos_jax.data.synthetic_chain`), then prints and returns:

- the true perplexity `exp(entropy rate)`, the best any model can do in expectation;
- each head's validation and test perplexity (best weights);
- the empirical rank (`mos_jax.rank`) of each head's log-probability matrix over the
  first N contexts of the validation split, next to the rank of the true chain's
  log-probabilities at the same contexts. A softmax head of hidden size d cannot go
  above d + 2 (d + 1 plus the decoder bias); MoS can reach the true rank.

It writes `learning_curves.png` and `demo.json` into the work directory; the runs live
in `workdir/softmax` and `workdir/mos` (a finished run is not trained again).
`demo_config()` is the tuned configuration (also `configs/bottleneck.py`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from mos_jax import compare
from mos_jax import config as config_lib
from mos_jax import data as data_lib
from mos_jax import model as model_lib
from mos_jax import outputs
from mos_jax import rank as rank_lib
from mos_jax import train
from mos_jax.errors import ConfigError

HEADS = ("softmax", "mos")


def demo_config() -> config_lib.ConfigDict:
    """The demo's configuration, tuned to finish well within 5 minutes on 2 CPU cores.

    V = 100 words, peakedness 2 (true perplexity 22.1); a 1-layer LSTM with tied
    embeddings, hidden size d = emsize = nhidlast = 8; MoS with 15 experts. No dropout
    (the corpus is a stationary chain: little to overfit). Short unrolls (bptt 8, no
    longer windows: a first-order chain needs one step of context, and one window
    length means one compiled train step) over 128 columns. Plain SGD at lr 20 with a
    small clip (0.05): the long plateau at the start (near-unigram predictions) has
    gradients under the clip, so it is left fast; afterwards every step has length
    lr * clip = 1. NT-ASGD (nonmono 5) averages the iterates once validation stalls.
    """
    c = config_lib.default_config()
    c.data.dir = "synthetic"
    s = c.data.synthetic
    s.vocab_size, s.peakedness, s.seed = 100, 2.0, 0
    s.train_tokens, s.valid_tokens, s.test_tokens = 200_000, 20_000, 20_000
    c.data.batch_size = 128
    c.data.eval_batch_size = 100
    c.data.test_batch_size = 100
    c.data.bptt = 8
    c.data.max_seq_len_delta = 0
    c.model.nlayers = 1
    c.model.emsize = c.model.nhid = c.model.nhidlast = 8
    c.model.n_experts = 15
    for rate in ("dropout", "dropouth", "dropouti", "dropoute", "dropoutl", "wdrop"):
        c.model[rate] = 0.0
    c.optim.lr = 20.0
    c.optim.clip = 0.05
    c.optim.alpha = 0.0
    c.optim.beta = 0.0
    c.train.seed = 0
    c.train.max_epochs = 30
    c.train.log_every_steps = 50
    return c


def _rank_entry(matrix: np.ndarray, **kwargs) -> dict:
    r = rank_lib.empirical_rank(matrix, **kwargs)
    return {"rank": r.rank, "threshold": r.threshold,
            "singular_values": [float(x) for x in r.singular_values]}


def run_demo(workdir: str | Path, config: config_lib.ConfigDict | None = None,
             log: Callable[[str], None] = print, *, split: str = "valid",
             n_contexts: int | None = None, rank_batch_size: int = 1,
             plot: bool = True) -> dict:
    """Train softmax and MoS heads, measure their ranks, print the table.

    Args:
      workdir: the runs go to `workdir/softmax` and `workdir/mos`; `learning_curves.png`
        and `demo.json` are written beside them.
      config: a ConfigDict as `demo_config()` returns (default: that one); each head is
        trained with it, `model.head` set to "softmax", then "mos". The softmax head
        needs `model.nhidlast == model.emsize`, the hidden size d of both.
      log: where progress and the table go (one string per call).
      split: the split whose first `n_contexts` contexts form the rank matrices.
      n_contexts: N, default `min(10 V, length of the split)`. The rank is at most
        min(N, V); the true chain's log-probabilities at N contexts have as many
        independent rows as there are distinct current words among them, so N must
        be well above V for all words to occur.
      rank_batch_size: columns scored in parallel for the rank matrix (1: every
        context sees its whole history; see `mos_jax.rank.logprob_matrix`).
      plot: write `learning_curves.png`.

    Returns the dict also written to `demo.json`: `true_ppl`, `vocab_size`,
    `hidden_size`, `n_experts`, `n_contexts`, `rank_bound_softmax` (d + 2), per head
    (`softmax`, `mos`) its training result (`valid_ppl`, `test_ppl`, ...) plus `rank`,
    `rank_threshold`, `singular_values` and `train_time_s`, the `true` chain's
    perplexity on each split and rank over the same contexts, `gap_recovered`
    (the share of softmax's test-perplexity gap to the true perplexity that MoS
    closes), `wall_time_s`, and the paths of the plot and the JSON.
    """
    start = time.perf_counter()
    workdir = Path(workdir)
    config = demo_config() if config is None else config
    for head in HEADS:  # one hidden size d for every head, what a tied head needs
        m = config.model.copy_and_resolve_references()
        m.head = head
        problem = model_lib.tied_width_problem(m)
        if problem:
            raise ConfigError(f"the demo compares heads of one hidden size d: {problem}")
    if config.data.dir != "synthetic":
        raise ConfigError("the demo needs the synthetic corpus (data.dir = "
                          f"'synthetic'), whose true perplexity is known; got "
                          f"{config.data.dir!r}")
    outputs.make_folder("--workdir", workdir)  # a bad path: one line, before training

    results: dict[str, dict] = {}
    for head in HEADS:
        log(f"demo: training the {head} head in {workdir / head}")
        t = time.perf_counter()
        c, _ = compare.head_config(config, head, test=True)
        result = train.train_and_evaluate(c, workdir / head, log=log)
        if "stopped" in result:
            raise ConfigError(f"the {head} run stopped early ({result['stopped']}); "
                              "the demo needs finished runs: clear train.stop_at_step "
                              "and train.time_budget_s")
        results[head] = {**result, "train_time_s": time.perf_counter() - t}

    corpus = None
    n = None
    for head in HEADS:
        _, corpus, model_config, params = train.load_best(workdir / head)
        ids = corpus.split(split)
        n = n_contexts or min(10 * corpus.vocab_size, len(ids))
        matrix = rank_lib.logprob_matrix(model_config, params, ids, n,
                                         batch_size=rank_batch_size)
        entry = _rank_entry(matrix)
        results[head].update(rank=entry["rank"], rank_threshold=entry["threshold"],
                             singular_values=entry["singular_values"])

    s = config.data.synthetic
    chain = data_lib.synthetic_chain(**s.to_dict())
    # The run's ids (in its data.vocab_order) as the chain's states: word w<i> is state i.
    state = np.asarray([int(w[1:]) for w in corpus.vocab])
    true_ppl = math.exp(corpus.entropy_rate)
    true = {"ppl": true_ppl}
    for name in ("valid", "test"):  # the true model's perplexity on the finite samples
        ids = state[corpus.split(name)]
        true[f"{name}_ppl"] = math.exp(-float(np.mean(chain.log_prob(ids[:-1],
                                                                     ids[1:]))))
    # The true log-probabilities at the same contexts are exact in float64 (the rank
    # does not depend on the order of the columns).
    true_entry = _rank_entry(chain.log_rows(state[corpus.split(split)[:n]]),
                             eps=float(np.finfo(np.float64).eps))
    true.update(rank=true_entry["rank"], rank_threshold=true_entry["threshold"])

    d = config.model.emsize
    soft, mos = results["softmax"], results["mos"]
    gap = soft["test_ppl"] - true_ppl
    summary = {
        "true_ppl": true_ppl,
        "vocab_size": corpus.vocab_size,
        "hidden_size": d,
        "n_experts": config.model.n_experts,
        "rank_split": split,
        "n_contexts": n,
        "rank_bound_softmax": d + 2,
        "true": true,
        "softmax": soft,
        "mos": mos,
        "gap_recovered": (soft["test_ppl"] - mos["test_ppl"]) / gap if gap > 0 else None,
    }
    deliveries = outputs.Deliveries()  # a failed write loses nothing: see check()
    if plot:
        from mos_jax.plot import plot_learning_curves
        summary["plot"] = outputs.where(deliveries.write(
            "", workdir / "learning_curves.png", lambda path: plot_learning_curves(
                {"softmax": workdir / "softmax",
                 f"MoS ({config.model.n_experts} experts)": workdir / "mos"}, path,
                title=f"softmax vs MoS, hidden size d={d}, synthetic chain V="
                      f"{corpus.vocab_size}", reference_ppl=true_ppl)))
    summary["wall_time_s"] = time.perf_counter() - start
    summary["json"] = str(workdir / "demo.json")
    summary["json"] = outputs.where(deliveries.text(
        "", workdir / "demo.json", json.dumps(summary, indent=2) + "\n"))
    for line in format_table(summary):
        log(line)
    deliveries.check()
    return summary


def format_table(summary: dict) -> list[str]:
    """The demo's result table, one string per line."""
    d, v, n = summary["hidden_size"], summary["vocab_size"], summary["n_contexts"]
    soft, mos, true = summary["softmax"], summary["mos"], summary["true"]
    rows = [
        (f"true chain (exp entropy rate = {summary['true_ppl']:.2f})",
         true["valid_ppl"], true["test_ppl"], true["rank"], ""),
        (f"softmax, d={d}", soft["valid_ppl"], soft["test_ppl"], soft["rank"],
         f"(bound d+2 = {d + 2})"),
        (f"MoS, d={d}, {summary['n_experts']} experts", mos["valid_ppl"],
         mos["test_ppl"], mos["rank"], ""),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"softmax bottleneck demo: synthetic Markov chain, V={v}, "
             f"true perplexity {summary['true_ppl']:.2f}",
             f"{'':{width}}  {'valid ppl':>9}  {'test ppl':>9}  "
             f"rank ({n} {summary['rank_split']} contexts)"]
    for name, valid, test, rank, note in rows:
        line = f"{name:{width}}  {valid:9.2f}  {test:9.2f}  {rank:5d} {note}"
        lines.append(line.rstrip())
    if summary["gap_recovered"] is not None:
        lines.append(f"MoS closes {100 * summary['gap_recovered']:.0f}% of softmax's "
                     f"test-perplexity gap to the true perplexity.")
    lines.append(f"train time: softmax {soft['train_time_s']:.0f} s, MoS "
                 f"{mos['train_time_s']:.0f} s; total wall time "
                 f"{summary['wall_time_s']:.0f} s")
    return lines
