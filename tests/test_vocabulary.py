"""A run knows its vocabulary: it is recorded with the weights, and every command that
scores text with them maps the text's words through it by string, never by id."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from mos_jax import cli, data, train
from mos_jax.errors import DataError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_corpus(directory: Path, splits: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, lines in splits.items():
        (directory / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return directory


def text_lines(ids, words, per_line=12):
    tokens = [words[i] for i in ids]
    return [" ".join(tokens[i:i + per_line]) for i in range(0, len(tokens), per_line)]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny run trained on a text corpus with an <unk> word, and a copy of that corpus
    whose train lines are shuffled (same words, same test text, other ids)."""
    root = tmp_path_factory.mktemp("vocab")
    chain = data.synthetic_corpus(vocab_size=30, train_tokens=3000, valid_tokens=400,
                                  test_tokens=400, seed=3)
    words = [f"word{i}" for i in range(29)] + ["<unk>"]
    splits = {s: text_lines(chain.split(s), words) for s in data.SPLITS}
    original = write_corpus(root / "original", splits)
    lines = list(splits["train"])
    random.Random(0).shuffle(lines)
    shuffled = write_corpus(root / "shuffled", {**splits, "train": lines})
    workdir = root / "run"
    assert cli.main(["train", "--config", str(CONFIGS / "tiny.py"), "--workdir",
                     str(workdir), "--config.data.dir", str(original),
                     "--config.train.max_epochs=1", "--config.train.test=false",
                     "--config.train.steps_per_epoch=4"]) == 0  # weights: any will do
    return workdir, original, shuffled


def run_json(capsys, *argv):
    assert cli.main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_the_run_records_its_vocabulary(text_run):
    workdir, original, _ = text_run
    record = json.loads((workdir / "vocab.json").read_text())
    corpus = data.read_corpus(original)
    assert record["words"] == list(corpus.vocab) and record["size"] == 31  # + <eos>
    import hashlib
    assert record["sha256"] == hashlib.sha256(
        json.dumps(list(corpus.vocab)).encode()).hexdigest()
    assert data.load_vocab(workdir) == corpus.vocab
    damaged = dict(record, words=record["words"][::-1])
    (workdir.parent / "damaged").mkdir(exist_ok=True)
    (workdir.parent / "damaged" / "vocab.json").write_text(json.dumps(damaged))
    with pytest.raises(DataError, match="do not match its digest"):
        data.load_vocab(workdir.parent / "damaged")


def test_a_shuffled_copy_of_the_corpus_scores_exactly_as_the_original(text_run, capsys):
    workdir, original, shuffled = text_run
    a, b = data.read_corpus(original), data.read_corpus(shuffled)
    assert a.vocab != b.vocab and not np.array_equal(a.test, b.test)  # ids differ
    assert [a.vocab[i] for i in a.test] == [b.vocab[i] for i in b.test]  # words do not
    own, _ = run_json(capsys, "evaluate", "--workdir", workdir, "--split", "test")
    ours, _ = run_json(capsys, "evaluate", "--workdir", workdir, "--data", original)
    theirs, _ = run_json(capsys, "evaluate", "--workdir", workdir, "--data", shuffled)
    text, _ = run_json(capsys, "evaluate", "--workdir", workdir, "--text",
                       original / "test.txt")
    assert own["ppl"] == ours["ppl"] == theirs["ppl"] == text["ppl"]
    assert own["tokens"] == text["tokens"] == len(a.test) - 1
    assert theirs["unknown_tokens"] == 0 and text["text"].endswith("test.txt")
    # the old way, by id, gives another number: the test above is not vacuous
    _, _, mc, params = train.load_best(workdir)
    from mos_jax import evaluate
    by_id = evaluate.token_logprobs(mc, params, b.test, 1, 70)
    assert not math.isclose(-float(np.mean(by_id)), theirs["nll"], rel_tol=1e-3)


def test_unknown_words_are_counted_and_scored_as_unk(text_run, tmp_path, capsys):
    workdir, original, _ = text_run
    test_text = (original / "test.txt").read_text().splitlines()
    rng = np.random.default_rng(0)
    novel, replaced = [], []
    for line in test_text[:20]:
        tokens = line.split()
        for k in rng.choice(len(tokens), size=2, replace=False):
            tokens[k] = f"new{k}"
        novel.append(" ".join(tokens))
        replaced.append(" ".join("<unk>" if t.startswith("new") else t for t in tokens))
    (tmp_path / "novel.txt").write_text("\n".join(novel) + "\n")
    (tmp_path / "replaced.txt").write_text("\n".join(replaced) + "\n")
    got, err = run_json(capsys, "evaluate", "--workdir", workdir, "--text",
                        tmp_path / "novel.txt")
    want, _ = run_json(capsys, "evaluate", "--workdir", workdir, "--text",
                       tmp_path / "replaced.txt")
    count = sum(t.startswith("new") for line in novel for t in line.split())
    distinct = len({t for line in novel for t in line.split() if t.startswith("new")})
    assert got["unknown_tokens"] == count == 40
    assert got["ppl"] == want["ppl"]
    assert (f"{count} of {got['tokens'] + 1} tokens" in err and f"({distinct} distinct"
            in err and "scored as <unk>" in err and "'new" in err)


def test_without_unk_unknown_words_are_refused_in_one_line(tiny_run, tmp_path, capsys):
    # the synthetic corpus has no <unk> (and no <eos>: its text has no sentence ends)
    (tmp_path / "t.txt").write_text("w1 w2 zebra w3\nw4 yak\n")
    assert cli.main(["evaluate", "--workdir", str(tiny_run), "--text",
                     str(tmp_path / "t.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "'zebra', '<eos>', 'yak'" in err[0] and "4 of 8 tokens" in err[0]
    assert "no <unk>" in err[0]


def test_generate_reads_an_unknown_prompt_word_as_unk(text_run, capsys):
    workdir = text_run[0]
    assert cli.main(["generate", "--workdir", str(workdir), "--prompt",
                     "word1 zebra word2", "--words", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split()[:3] == ["word1", "<unk>", "word2"]
    assert "1 of 3 tokens of the prompt" in captured.err and "'zebra'" in captured.err


def test_a_run_refuses_to_resume_or_finetune_on_other_ids(text_run, tmp_path, capsys):
    workdir, original, shuffled = text_run
    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--config", str(CONFIGS / "tiny_finetune.py"),
                     "--workdir", str(ft), "--config.finetune.init_from", str(workdir),
                     "--config.data.dir", str(shuffled)]) == 2
    err = capsys.readouterr().err
    assert "same words in another order" in err and err.count("\n") == 1
    assert not (ft / "checkpoints").exists()
    # the corpus files of a run changed under the same path: its resume is refused
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    saved = json.loads((copy / "config.json").read_text())
    saved["data"]["dir"] = str(shuffled)
    (copy / "config.json").write_text(json.dumps(saved))
    assert cli.main(["train", "--workdir", str(copy), "--config.train.max_epochs=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "same words in another order" in err and str(copy) in err


def test_imported_weights_record_the_vocabulary_of_their_corpus(text_run, tmp_path,
                                                                  capsys):
    import numpy_reference as ref
    _, original, shuffled = text_run
    v = data.read_corpus(original).vocab_size
    state = ref.random_state(np.random.default_rng(1), vocab=v, emsize=4, nhid=6,
                             nhidlast=5, nlayers=2, n_experts=2, head="mos", scale=0.3)
    np.savez(tmp_path / "w.npz", **state)
    out = tmp_path / "imported"
    # a corpus of another size: refused before anything is written
    assert cli.main(["import", str(tmp_path / "w.npz"), "--out", str(out), "--data",
                     "synthetic"]) == 2
    assert "nothing was written" in capsys.readouterr().err and not out.exists()
    assert cli.main(["import", str(tmp_path / "w.npz"), "--out", str(out), "--data",
                     str(original)]) == 0
    assert "vocabulary of" in capsys.readouterr().out
    assert data.load_vocab(out) == data.read_corpus(original).vocab
    scores = [run_json(capsys, "evaluate", "--weights", out, "--data", d)[0]["ppl"]
              for d in (original, shuffled)]
    assert scores[0] == scores[1]
    # the reference's own numbers, by the original corpus's ids
    want = ref.token_logprobs(state, data.read_corpus(original).test, 1, 70, "mos")
    assert math.isclose(scores[0], math.exp(-np.mean(want)), rel_tol=1e-5)
    # --text with weights that record no vocabulary: --data gives it
    bare = tmp_path / "bare"
    assert cli.main(["import", str(tmp_path / "w.npz"), "--out", str(bare)]) == 0
    capsys.readouterr()
    assert data.load_vocab(bare) is None
    text, _ = run_json(capsys, "evaluate", "--weights", bare, "--data", original,
                       "--text", original / "test.txt")
    assert text["ppl"] == scores[0]
    # an import without --data into a folder that had a vocabulary removes it
    assert cli.main(["import", str(tmp_path / "w.npz"), "--out", str(out)]) == 0
    assert data.load_vocab(out) is None
    assert cli.main(["evaluate", "--weights", str(out), "--text",
                     str(original / "test.txt"), "--split", "valid"]) == 2
    assert "not both" in capsys.readouterr().err


def test_text_mostly_outside_the_vocabulary_is_refused(text_run, tmp_path, capsys):
    """Another corpus or language: a perplexity of mostly <unk> would mean nothing."""
    workdir = text_run[0]
    (tmp_path / "other.txt").write_text("alpha beta word1 gamma\n")  # 3 of 5 unknown
    (tmp_path / "half.txt").write_text("alpha word1 word2 word3\n")  # 1 of 5: scored
    assert cli.main(["evaluate", "--workdir", str(workdir), "--text",
                     str(tmp_path / "other.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 of 5 tokens" in err[0] and "more than half" in err[0]
    got, _ = run_json(capsys, "evaluate", "--workdir", workdir, "--text",
                      tmp_path / "half.txt")
    assert got["unknown_tokens"] == 1
    assert cli.main(["evaluate", "--workdir", str(workdir), "--text",
                     str(tmp_path)]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err
