"""Perplexity by word frequency (`mos_jax.frequency`, `mos-jax evaluate --by-frequency`):
the buckets against a Counter written here, and the partition of the targets."""

import json
import math
from collections import Counter

import jax
import numpy as np
import pytest

from mos_jax import cli, data, evaluate, frequency, model, train
from mos_jax.errors import ConfigError


def expected_bucket(words_train, vocab, top, edges):
    """word -> bucket name, by the documented rule, from a Counter of the train words."""
    count = Counter(words_train)
    seen = [w for w in vocab if count[w] > 0 and w != "<unk>"]
    seen.sort(key=lambda w: (-count[w], vocab.index(w)))  # ties: the smaller id first
    tops = set(seen[:top])
    edges = sorted(edges, reverse=True)
    out = {}
    for w in vocab:
        c = count[w]
        if w == "<unk>":
            out[w] = "<unk>"
        elif w in tops:
            out[w] = f"top {top}"
        elif c >= edges[0]:
            out[w] = f">= {edges[0]}"
        elif c < edges[-1]:
            out[w] = f"< {edges[-1]}"
        else:
            hi = min(e for e in edges if e > c)
            lo = max(e for e in edges if e <= c)
            out[w] = f"{lo}-{hi - 1}"
    return out


def test_default_buckets_on_a_corpus_that_fills_each_of_them():
    # 105 types tied at 5,000 (100 go to the top bucket, the smaller ids), 10 at 1,500,
    # 10 at 500, 10 at 50, 10 at 5, 5 never seen, and <unk> (frequent, its own bucket).
    sizes = [5000] * 105 + [1500] * 10 + [500] * 10 + [50] * 10 + [5] * 10 + [0] * 5
    vocab = ["<unk>"] + [f"w{i}" for i in range(len(sizes))]
    ids = np.repeat(np.arange(len(vocab)), [6000] + sizes)
    np.random.default_rng(0).shuffle(ids)
    b = frequency.assign_buckets(ids, vocab)
    assert b.names == ("top 100", ">= 1000", "100-999", "10-99", "< 10", "<unk>")
    want = expected_bucket([vocab[i] for i in ids], vocab, 100, (1000, 100, 10))
    assert [b.names[k] for k in b.of_type] == [want[w] for w in vocab]
    sizes_of = Counter(want.values())
    assert sizes_of == {"top 100": 100, ">= 1000": 15, "100-999": 10, "10-99": 10,
                        "< 10": 15, "<unk>": 1}
    assert [want[f"w{i}"] for i in (99, 100)] == ["top 100", ">= 1000"]  # the tie rule


def test_no_unk_word_no_unk_bucket_and_edges_in_any_order():
    vocab = ["a", "b", "c", "d"]
    b = frequency.assign_buckets(np.array([0, 0, 0, 1, 1, 2]), vocab, top=1,
                                 edges=(1, 2))
    assert b.names == ("top 1", ">= 2", "1-1", "< 1")
    assert [b.names[k] for k in b.of_type] == ["top 1", ">= 2", "1-1", "< 1"]
    assert list(b.counts) == [3, 2, 1, 0]


@pytest.mark.parametrize("top,edges,match", [(-1, (10,), "0 or more"),
                                             (5, (10, 0), "positive"),
                                             (5, (10, 10), "distinct")])
def test_bad_buckets_are_clear_errors(top, edges, match):
    with pytest.raises(ConfigError, match=match):
        frequency.assign_buckets(np.array([0, 1]), ["a", "b"], top=top, edges=edges)


CONFIG = model.ModelConfig(vocab_size=30, emsize=4, nhid=6, nhidlast=4, nlayers=1,
                           n_experts=2)
B, BPTT, TOP, EDGES = 3, 7, 2, (40, 10, 3)


def small_corpus():
    """30 types with Zipf-like training counts; the last 3 never seen in train."""
    rng = np.random.default_rng(5)
    vocab = tuple(["<unk>"] + [f"w{i}" for i in range(29)])
    p = 1.0 / np.arange(1, 28)
    train_ids = rng.choice(27, size=600, p=p / p.sum()).astype(np.int32)
    valid = rng.integers(0, 30, size=B * 41 + 2).astype(np.int32)  # every type
    return data.Corpus(name="small", vocab=vocab, train=train_ids, valid=valid,
                       test=valid[:20])


def test_the_buckets_partition_the_scored_targets():
    corpus = small_corpus()
    params = model.init_params(CONFIG, jax.random.key(1))
    logp = evaluate.token_logprobs(CONFIG, params, corpus.valid, B, BPTT)
    rep = frequency.by_frequency(CONFIG, params, corpus, "valid", B, BPTT, top=TOP,
                                 edges=EDGES)
    # The scored targets: column j is valid[j*n : (j+1)*n], row r scores its row r+1.
    n = len(corpus.valid) // B
    assert logp.shape == (n - 1, B)
    want = expected_bucket([corpus.vocab[i] for i in corpus.train], list(corpus.vocab),
                           TOP, EDGES)
    tokens, loss = Counter(), Counter()
    for j in range(B):
        for r in range(n - 1):
            name = want[corpus.vocab[corpus.valid[j * n + r + 1]]]
            tokens[name] += 1
            loss[name] += -float(logp[r, j])
    buckets = {b["name"]: b for b in rep["buckets"]}
    assert list(buckets) == ["top 2", ">= 40", "10-39", "3-9", "< 3", "<unk>"]
    for name, b in buckets.items():
        assert b["tokens"] == tokens[name] > 0
        assert b["loss"] == pytest.approx(loss[name], rel=1e-9)
        assert b["ppl"] == pytest.approx(math.exp(loss[name] / tokens[name]), rel=1e-9)
        assert b["token_share"] == pytest.approx(tokens[name] / logp.size, rel=1e-12)
    # A partition: counts add up to the scored tokens, losses to the total NLL.
    total = -np.sum(logp, dtype=np.float64)
    assert sum(b["tokens"] for b in rep["buckets"]) == rep["tokens"] == logp.size
    assert sum(b["loss"] for b in rep["buckets"]) == pytest.approx(total, rel=1e-12)
    assert sum(b["loss_share"] for b in rep["buckets"]) == pytest.approx(1, rel=1e-12)
    assert rep["ppl"] == pytest.approx(
        evaluate.perplexity(CONFIG, params, corpus.valid, B, BPTT), rel=1e-9)
    assert sum(b["types"] for b in rep["buckets"]) == corpus.vocab_size


def test_by_frequency_command(tiny_run, tmp_path, capsys):
    out = tmp_path / "freq.json"
    assert cli.main(["evaluate", "--workdir", str(tiny_run), "--split", "valid",
                     "--batch-size", "4", "--bptt", "20", "--by-frequency",
                     "--top-words", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    result = json.loads(out.read_text())
    _, corpus, config, params = train.load_best(tiny_run)
    logp = evaluate.token_logprobs(config, params, corpus.valid, 4, 20)
    assert result["tokens"] == logp.size
    assert result["ppl"] == pytest.approx(math.exp(-logp.mean(dtype=np.float64)),
                                          rel=1e-6)
    rows = result["by_frequency"]["buckets"]
    names = ["top 5", ">= 1000", "100-999", "10-99", "< 10"]  # no <unk> in synthetic
    assert [b["name"] for b in rows] == names
    targets = frequency.target_ids(corpus.valid, 4)
    want = expected_bucket([corpus.vocab[i] for i in corpus.train], list(corpus.vocab),
                           5, (1000, 100, 10))
    got = Counter(want[corpus.vocab[t]] for t in targets.ravel())
    assert {b["name"]: b["tokens"] for b in rows} == {k: got[k] for k in names}
    assert sum(b["loss"] for b in rows) == pytest.approx(result["nll"] * logp.size,
                                                         rel=1e-9)
    # The table: a header, a row per bucket with its token count, and the whole split.
    assert any(line.startswith("| bucket | types | tokens |") for line in printed)
    for b in rows:
        row = next(line for line in printed if line.startswith(f"| {b['name']} |"))
        assert f"| {b['tokens']:,} |" in row
    assert any(line.startswith(f"| all | {corpus.vocab_size} | {logp.size:,} |")
               and f"| {result['ppl']:.2f} |" in line for line in printed)


@pytest.mark.parametrize("args,match", [(["--count-edges", "100,x"], "integers"),
                                        (["--top-words", "-1"], "0 or more")])
def test_bad_bucket_options_exit_2(tmp_path, capsys, args, match):
    try:  # argparse exits, the command returns: 2 either way, no traceback
        rc = cli.main(["evaluate", "--workdir", str(tmp_path), "--by-frequency", *args])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert match in capsys.readouterr().err
