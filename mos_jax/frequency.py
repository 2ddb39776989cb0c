"""Perplexity by word frequency: the targets of a split in buckets of training-set count.

Does the softmax bottleneck hurt rare words more than frequent ones? Each vocabulary
type gets one bucket from its count `c` in the training split, by this rule (the first
that applies):

1. the unknown-word type (`<unk>`, when the vocabulary has it): bucket `<unk>`;
2. the `top` most frequent other types with `c > 0` (ties: the smaller id first):
   bucket `top 100` (for `top = 100`);
3. otherwise by count, with `edges` descending (default `1000, 100, 10`):
   `>= 1000`, `100-999`, `10-99`, `< 10`. A type never seen in training has `c = 0`
   and falls in `< 10`.

So every type is in exactly one bucket and the buckets partition the targets: each
scored position goes to its target's bucket. Per bucket the report gives the number of
tokens, their share of the split's scored tokens, the summed and mean NLL, the
perplexity `exp(mean NLL)`, and the bucket's share of the total loss. The summed losses
of the buckets add up to the loss of the whole split (in float64).

The log-probabilities come from `mos_jax.evaluate.token_logprobs` (`[nrows - 1, B]` in
the batchified layout): position `(r, j)` scores `batchify(ids, B)[r + 1, j]`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

from mos_jax.batching import batchify
from mos_jax.errors import ConfigError

DEFAULT_TOP = 100
DEFAULT_EDGES = (1000, 100, 10)
UNK = "<unk>"


class Buckets(NamedTuple):
    """Bucket of every vocabulary type: `of_type[v]` indexes `names`; `counts[v]` is the
    type's training-set count."""

    names: tuple[str, ...]
    of_type: np.ndarray  # [V] int
    counts: np.ndarray  # [V] int64


def check_edges(top: int, edges: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """`(top, edges)` validated: `top >= 0`, edges positive and distinct, returned
    in descending order. Raises ConfigError naming the bad value."""
    if int(top) != top or top < 0:
        raise ConfigError(f"the number of most frequent words must be 0 or more, got {top}")
    out = []
    for e in edges:
        if int(e) != e or e < 1:
            raise ConfigError(f"count edges must be positive integers, got {e!r}: e.g. "
                              "1000,100,10")
        out.append(int(e))
    if len(set(out)) != len(out):
        raise ConfigError(f"count edges must be distinct, got {','.join(map(str, edges))}")
    return int(top), tuple(sorted(out, reverse=True))


def parse_edges(text: str) -> tuple[int, ...]:
    """`"1000,100,10"` -> `(1000, 100, 10)`; anything else is a ConfigError."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"count edges are comma-separated integers, e.g. 1000,100,10; "
                          f"got {text!r}") from None
    return check_edges(0, values)[1]


def bucket_names(top: int = DEFAULT_TOP, edges: Sequence[int] = DEFAULT_EDGES,
                 unk: bool = True) -> tuple[str, ...]:
    """The bucket names in report order, e.g. `top 100, >= 1000, 100-999, 10-99, < 10,
    <unk>`. With no edges the count buckets are one, `rest`."""
    top, edges = check_edges(top, edges)
    names = [f"top {top}"] if top else []
    if edges:
        names.append(f">= {edges[0]}")
        names += [f"{lo}-{hi - 1}" for hi, lo in zip(edges, edges[1:])]
        names.append(f"< {edges[-1]}")
    else:
        names.append("rest")
    return tuple(names + ([UNK] if unk else []))


def assign_buckets(train_ids: np.ndarray, vocab: Sequence[str], *,
                   top: int = DEFAULT_TOP, edges: Sequence[int] = DEFAULT_EDGES,
                   unk: str | None = UNK) -> Buckets:
    """The bucket of every type of `vocab` from its count in `train_ids` (module doc).

    `unk`: the unknown-word spelling, or None for no `<unk>` bucket; a vocabulary
    without that word has no `<unk>` bucket either.
    """
    top, edges = check_edges(top, edges)
    v = len(vocab)
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64).ravel(), minlength=v)
    if len(counts) > v:
        raise ConfigError(f"the training ids reach {len(counts) - 1} but the vocabulary "
                          f"has {v} words: use the corpus the ids come from")
    unk_id = None
    if unk is not None and unk in vocab:
        unk_id = list(vocab).index(unk)
    names = bucket_names(top, edges, unk=unk_id is not None)
    of_type = np.empty(v, dtype=np.int64)
    # Count buckets: index of the first edge the count reaches, len(edges) below all.
    first = 1 if top else 0
    if edges:
        reached = counts[:, None] >= np.asarray(edges)[None, :]
        level = np.where(reached.any(axis=1), reached.argmax(axis=1), len(edges))
    else:
        level = np.zeros(v, dtype=np.int64)
    of_type[:] = first + level
    if top:
        ranked = [i for i in np.lexsort((np.arange(v), -counts))
                  if counts[i] > 0 and i != unk_id][:top]
        of_type[np.asarray(ranked, dtype=np.int64)] = 0
    if unk_id is not None:
        of_type[unk_id] = len(names) - 1
    return Buckets(names, of_type, counts)


def target_ids(ids: np.ndarray, batch_size: int) -> np.ndarray:
    """The target of every scored position, `[nrows - 1, B]`: the layout of
    `evaluate.token_logprobs(..., ids, batch_size, ...)`."""
    return batchify(ids, batch_size)[1:]


def report(logp: np.ndarray, targets: np.ndarray, buckets: Buckets) -> dict:
    """Per-bucket statistics of log-probabilities `logp` of `targets` (same shape).

    Returns `{"tokens", "loss", "nll", "ppl", "buckets": [...]}`: the whole split's
    token count, summed NLL, mean NLL and perplexity, and per bucket (in `names`
    order) `name`, `types` (vocabulary types in it), `tokens`, `token_share`, `loss`
    (summed NLL), `nll` (mean), `ppl` and `loss_share`; mean, ppl and shares are None
    for a bucket without tokens.
    """
    logp = np.asarray(logp, dtype=np.float64)
    targets = np.asarray(targets)
    if logp.shape != targets.shape:
        raise ValueError(f"log-probabilities {logp.shape} and targets {targets.shape} "
                         "differ in shape")
    k = len(buckets.names)
    which = buckets.of_type[targets.ravel()]
    tokens = np.bincount(which, minlength=k)
    losses = np.bincount(which, weights=-logp.ravel(), minlength=k)
    n = int(logp.size)
    total = float(-logp.sum())
    types = np.bincount(buckets.of_type, minlength=k)
    rows = []
    for i, name in enumerate(buckets.names):
        t, loss = int(tokens[i]), float(losses[i])
        mean = loss / t if t else None
        rows.append({"name": name, "types": int(types[i]), "tokens": t,
                     "token_share": t / n if n else None, "loss": loss, "nll": mean,
                     "ppl": math.exp(mean) if mean is not None else None,
                     "loss_share": loss / total if t and total else None})
    nll = total / n if n else float("nan")
    return {"tokens": n, "loss": total, "nll": nll, "ppl": math.exp(nll),
            "buckets": rows}


def by_frequency(model_config, params, corpus, split: str = "valid",
                 batch_size: int = 10, bptt: int = 70, *, top: int = DEFAULT_TOP,
                 edges: Sequence[int] = DEFAULT_EDGES, plan=None,
                 progress: Callable[[int, int], None] | None = None,
                 log: Callable[[str], None] | None = None,
                 logp: np.ndarray | None = None) -> dict:
    """Perplexity by training-set frequency of `corpus.split(split)` (module doc).

    Scores the split with `evaluate.token_logprobs` (or takes its result, `logp`) and
    returns `report(...)` plus `split`, `batch_size`, `bptt`, `top`, `edges`.
    """
    from mos_jax import evaluate
    top, edges = check_edges(top, edges)
    ids = corpus.split(split)
    if logp is None:
        logp = evaluate.token_logprobs(model_config, params, ids, batch_size, bptt,
                                       progress, plan=plan, log=log)
    buckets = assign_buckets(corpus.train, corpus.vocab, top=top, edges=edges)
    out = report(logp, target_ids(ids, batch_size), buckets)
    return {"split": split, "batch_size": batch_size, "bptt": bptt, "top": top,
            "edges": list(edges), **out}


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(rep: dict) -> list[str]:
    """One split's report as markdown lines: a row per bucket and one for all."""
    lines = ["| bucket | types | tokens | share of tokens | mean NLL | ppl | "
             "share of loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    for b in rep["buckets"]:
        lines.append(f"| {b['name']} | {b['types']:,} | {b['tokens']:,} | "
                     f"{_pct(b['token_share'])} | "
                     f"{_num(b['nll'], '.3f')} | {_num(b['ppl'], '.2f')} | "
                     f"{_pct(b['loss_share'])} |")
    lines.append(f"| all | {sum(b['types'] for b in rep['buckets']):,} | "
                 f"{rep['tokens']:,} | 100.0% | {rep['nll']:.3f} | {rep['ppl']:.2f} | "
                 "100.0% |")
    return lines


def describe(rep: dict) -> str:
    """One line saying how the buckets were made."""
    edges = ", ".join(map(str, rep["edges"]))
    unk = any(b["name"] == UNK for b in rep["buckets"])
    what = rep["text"] if rep.get("text") else f"the {rep['split']} split"
    return (f"Targets of {what} by their training-set count: the "
            f"{rep['top']} most frequent types, then count edges {edges or 'none'}"
            f"{'; <unk> on its own' if unk else ''}; a type is in one bucket only; "
            "unseen words count 0.")
