"""Subword vocabularies (data.tokenizer bpe / unigram) and the vocabulary order
(data.vocab_order): training, determinism, the cache, decoding, word counts, the
orders checked against counts made here, the one-line refusals, and the commands that
read text through a run's tokenizer."""

import collections
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

import numpy_reference as ref
from conftest import shared_corpus
from mos_jax import cli, config as config_lib, convert, data, heads, subword, train
from mos_jax.errors import ConfigError, DataError

needs_tokenizers = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None,
    reason="the Hugging Face tokenizers package is not installed")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write_corpus(directory, seed=0):
    """A small corpus of made-up words (syllables), PTB-like: a leading and trailing
    space on each line, some `<unk>`s, and words of valid/test never seen in train."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "me", "su", "la", "no", "pe", "di", "bo"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
             for _ in range(150)]
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 600), ("valid", 60), ("test", 60)):
        lines = [" " + " ".join(rng.choice(words) if rng.random() > 0.05 else "<unk>"
                                for _ in range(rng.randint(3, 12))) + " "
                 for _ in range(n)]
        if split != "train":
            lines.append(" zuzu kazu ")  # a word (and a character) train lacks
        (directory / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return directory


def _lines(directory, split):
    return (directory / f"{split}.txt").read_text().split("\n")[:-1]


def _words(lines):  # the word tokenizer's tokens, written out here
    out = []
    for line in lines:
        out.extend(line.split())
        out.append("<eos>")
    return out


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("subword") / "corpus")


@needs_tokenizers
@pytest.mark.parametrize("kind,n", [("bpe", 120), ("unigram", 80)])
def test_training_is_deterministic_and_decodes_to_the_words(corpus_dir, kind, n):
    train_lines = _lines(corpus_dir, "train")
    a = subword.train(kind, n, train_lines, "c")
    b = subword.train(kind, n, train_lines, "c")
    assert a.to_json() == b.to_json()  # byte for byte
    assert len(a.pieces) == n and a.pieces[:2] == ("<eos>", "<unk>")
    for split in ("train", "valid"):
        lines = _lines(corpus_dir, split)
        ids = a.encode_lines(lines)
        np.testing.assert_array_equal(ids, b.encode_lines(lines))
        whole = []  # the library on whole lines (encode_lines encodes distinct words)
        for line in lines:
            whole += a.tokenizer.encode(line.split(), is_pretokenized=True).ids + [0]
        np.testing.assert_array_equal(ids, whole)
        words = subword.decode_words(a.pieces[i] for i in ids)
        if split == "train":
            assert words == _words(lines)
        else:  # the last line's 'z' is not in the training text: <unk> in its place
            want = _words(lines[:-1])
            assert words[:len(want)] == want
            assert "<unk>" in words[len(want):] and words[-1] == "<eos>"
    assert subword.count_words(_lines(corpus_dir, "valid")) == len(
        _words(_lines(corpus_dir, "valid")))


@needs_tokenizers
def test_unigram_is_deterministic_with_characters_it_adds_at_the_end():
    """The Unigram trainer adds the characters its model lacks at the bottom, with
    scores stepped by 1e-4 in the order of a hash set (another on each training): the
    tokenizer's JSON and ids must not depend on that order."""
    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "me", "su", "la", "no", "pe", "di", "bo"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
             for _ in range(150)]
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)]
    lines += [f"ka{chr(0x3b1 + i)}to" for i in range(20)]  # 20 rare characters
    texts = {subword.train("unigram", 80, lines, "c").to_json() for _ in range(4)}
    assert len(texts) == 1
    vocab = json.loads(texts.pop())["tokenizer"]["model"]["vocab"]
    tail = [p for p, s in vocab if s < vocab[-1][1] + 0.01]  # the added ones
    assert all(len(p) == 1 for p in tail) and tail == sorted(tail)
    assert [chr(0x3b1 + i) for i in range(20)] == [p for p in tail if p >= "\u03b1"]


@needs_tokenizers
def test_the_cache_keeps_tokenizer_and_ids(corpus_dir, tmp_path, monkeypatch):
    calls = []
    real = subword.train
    monkeypatch.setattr(subword, "train", lambda *a: calls.append(a) or real(*a))
    first = data.read_corpus(corpus_dir, tokenizer="bpe", vocab_size=120,
                             cache_dir=tmp_path)
    assert len(calls) == 1 and calls[0][:2] == ("bpe", 120)
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert len(cached) == 2 and cached[1].endswith(".tokenizer.json")
    again = data.read_corpus(corpus_dir, tokenizer="bpe", vocab_size=120,
                             cache_dir=tmp_path)
    assert len(calls) == 1  # neither trained nor tokenised again
    assert again.vocab == first.vocab and again.subwords.spec == first.subwords.spec
    for s in data.SPLITS:
        np.testing.assert_array_equal(again.split(s), first.split(s))
        assert again.words_in(s) == len(_words(_lines(corpus_dir, s)))
    # another order: new ids, the same tokenizer (not trained again)
    freq = data.read_corpus(corpus_dir, tokenizer="bpe", vocab_size=120,
                            order="frequency", cache_dir=tmp_path)
    assert len(calls) == 1 and len(list(tmp_path.iterdir())) == 3
    assert freq.vocab != first.vocab
    assert freq.decode(freq.valid) == first.decode(first.valid)
    # another N: trained again
    data.read_corpus(corpus_dir, tokenizer="bpe", vocab_size=100, cache_dir=tmp_path)
    assert len(calls) == 2


def _library_ids(spec, lines):
    """The ids of `lines` by the `tokenizers` library itself: each line's whitespace
    words encoded (pre-tokenised, no special tokens added), then `<eos>`."""
    import tokenizers
    tok = tokenizers.Tokenizer.from_str(spec)
    eos = tok.token_to_id("<eos>")
    ids = []
    for line in lines:
        ids.extend(tok.encode(line.split(), is_pretokenized=True,
                              add_special_tokens=False).ids)
        ids.append(eos)
    return ids


@needs_tokenizers
@pytest.mark.parametrize("kind,n,run_bytes", [("bpe", 100, 1 << 20),
                                              ("unigram", 80, 1 << 20),
                                              ("bpe", 100, 3), ("unigram", 80, 5)])
def test_subword_ids_are_streamed_into_the_cache_and_mapped(tmp_path, monkeypatch,
                                                            kind, n, run_bytes):
    """The subword ids are written a block of words at a time (blocks of 7 tokens
    here; the files read `run_bytes` of a line at a time, words cut between reads)
    into the id cache: the tokenizer of training on the lines in memory, the ids of
    the `tokenizers` library's own encoding, memory-mapped; a second load neither
    trains nor encodes; other text is another entry."""
    monkeypatch.setattr(data, "_BLOCK_TOKENS", 7)
    monkeypatch.setattr(data, "_RUN_BYTES", run_bytes)
    folder = _write_corpus(tmp_path / "c", seed=0)
    cache = tmp_path / "cache"
    got = data.read_corpus(folder, tokenizer=kind, vocab_size=n, cache_dir=cache)
    lines = {s: _lines(folder, s) for s in data.SPLITS}
    assert got.subwords.spec == subword.train(kind, n, lines["train"], "c").spec
    memory = data.read_corpus(folder, tokenizer=kind, vocab_size=n, cache=False)
    assert memory.vocab == got.vocab
    for s in data.SPLITS:
        assert isinstance(got.split(s), np.memmap) and got.split(s).dtype == np.int32
        np.testing.assert_array_equal(got.split(s), _library_ids(got.subwords.spec,
                                                                 lines[s]))
        np.testing.assert_array_equal(got.split(s), memory.split(s))
        assert got.words_in(s) == memory.words_in(s) == len(_words(lines[s]))
    calls = []
    real = subword.train, subword.Subwords.encode_runs
    monkeypatch.setattr(subword, "train", lambda *a: calls.append("train"))
    monkeypatch.setattr(subword.Subwords, "encode_runs",
                        lambda *a: calls.append("encode"))
    again = data.read_corpus(folder, tokenizer=kind, vocab_size=n, cache_dir=cache)
    assert calls == [] and again.vocab == got.vocab
    for s in data.SPLITS:
        assert isinstance(again.split(s), np.memmap)
        np.testing.assert_array_equal(again.split(s), got.split(s))
    monkeypatch.setattr(subword, "train", real[0])
    monkeypatch.setattr(subword.Subwords, "encode_runs", real[1])
    (folder / "valid.txt").write_text(" kato rime \n")  # other text: another key
    other = data.read_corpus(folder, tokenizer=kind, vocab_size=n, cache_dir=cache)
    np.testing.assert_array_equal(other.valid, _library_ids(other.subwords.spec,
                                                            [" kato rime "]))
    assert len(list(cache.glob("*.ids"))) == 2


@needs_tokenizers
@pytest.mark.parametrize("killed", [False, True])
def test_an_interrupted_subword_cache_write_leaves_nothing_trusted(tmp_path,
                                                                   monkeypatch, killed):
    """An exception (here a KeyboardInterrupt) in the middle of writing the blocks
    publishes no entry and leaves no partial file; the next load writes it whole. A
    process killed there (its clean-up never run: the partial directory stays) leaves
    nothing a later load reads either."""
    import shutil
    real_rmtree = shutil.rmtree
    if killed:
        monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)
    monkeypatch.setattr(data, "_BLOCK_TOKENS", 7)
    folder = _write_corpus(tmp_path / "c", seed=4)
    cache = tmp_path / "cache"
    real = subword.Subwords.encode_runs
    calls = []

    def interrupted(self, runs):
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return real(self, runs)

    monkeypatch.setattr(subword.Subwords, "encode_runs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.read_corpus(folder, tokenizer="bpe", vocab_size=100, order="frequency",
                         cache_dir=cache)
    left = sorted(p.name for p in cache.iterdir())
    assert left[-1].endswith(".tokenizer.json") and not any(n.endswith(".ids")
                                                             for n in left)
    assert len(left) == 1 + killed and (not killed or left[0].endswith(".part"))
    monkeypatch.setattr(subword.Subwords, "encode_runs", real)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    got = data.read_corpus(folder, tokenizer="bpe", vocab_size=100, order="frequency",
                           cache_dir=cache)
    want = data.order_vocab(data.read_corpus(folder, tokenizer="bpe", vocab_size=100,
                                             cache=False), "frequency")
    assert got.vocab == want.vocab
    for s in data.SPLITS:
        assert isinstance(got.split(s), np.memmap)
        np.testing.assert_array_equal(got.split(s), want.split(s))


def _check_frequency_order(vocab, base_tokens):
    """`vocab` must list the tokens by training count (descending), ties by first
    occurrence over train, valid, test; `base_tokens` the tokens of each split."""
    counts = collections.Counter(base_tokens["train"])
    first = {}
    for s in data.SPLITS:
        for t in base_tokens[s]:
            first.setdefault(t, len(first))
    met = sorted(first, key=lambda t: (-counts[t], first[t]))
    assert list(vocab[:len(met)]) == met
    return met


def test_frequency_order_of_words(corpus_dir, tmp_path):
    tokens = {s: _words(_lines(corpus_dir, s)) for s in data.SPLITS}
    corpus = data.read_corpus(corpus_dir, order="frequency", cache_dir=tmp_path)
    met = _check_frequency_order(corpus.vocab, tokens)
    assert len(met) == corpus.vocab_size
    assert corpus.vocab[-2:] == ("zuzu", "kazu")  # only in valid/test: last
    for s in data.SPLITS:
        assert corpus.decode(corpus.split(s)) == tokens[s]
    # the default order is first occurrence, as before (ids by a dict built here)
    default = data.read_corpus(corpus_dir, cache_dir=tmp_path)
    want = list(dict.fromkeys(tokens["train"] + tokens["valid"] + tokens["test"]))
    assert list(default.vocab) == want
    np.testing.assert_array_equal(default.train, [want.index(t) for t in tokens["train"]])
    # the first-occurrence cache's key has no suffix (in a .ids entry)
    names = {p.name for p in tmp_path.iterdir()}
    digest = data.files_digest([corpus_dir / f"{s}.txt" for s in data.SPLITS])
    assert names == {f"{digest}.ids", f"{digest}-word-frequency.ids"}


@needs_tokenizers
def test_frequency_order_of_subwords(corpus_dir, tmp_path):
    base = data.read_corpus(corpus_dir, tokenizer="unigram", vocab_size=80,
                            cache_dir=tmp_path)
    assert base.vocab == base.subwords.pieces  # first: the tokenizer's own ids
    freq = data.read_corpus(corpus_dir, tokenizer="unigram", vocab_size=80,
                            order="frequency", cache_dir=tmp_path)
    pieces = {s: base.decode(base.split(s)) for s in data.SPLITS}
    met = _check_frequency_order(freq.vocab, pieces)
    unmet = [p for p in base.vocab if p not in met]  # never met: tokenizer order
    assert list(freq.vocab[len(met):]) == unmet
    for s in data.SPLITS:
        assert freq.decode(freq.split(s)) == pieces[s]
    # text read through the run's tokenizer lands on the run's (frequency) ids
    np.testing.assert_array_equal(
        freq.subwords.encode(_lines(corpus_dir, "test"), freq.vocab, "t"), freq.test)


def test_auto_order_follows_the_head(monkeypatch):
    c = config_lib.default_config()
    assert train.vocab_order(c) == "first"  # mos: the ids of every earlier version
    tiny = config_lib.load_config(str(CONFIGS / "tiny.py"))
    assert train.load_corpus_from(tiny).vocab == tuple(f"w{i}" for i in range(50))

    class Wants:
        wants_frequency_order = True
    monkeypatch.setitem(heads.HEADS, "wants_frequency", Wants)
    c.model.head = "wants_frequency"
    assert train.vocab_order(c) == "frequency"
    c.data.vocab_order = "first"
    assert train.vocab_order(c) == "first"


def _config(**data_keys):
    c = config_lib.default_config()
    for k, v in data_keys.items():
        c.data[k] = v
    return c


@pytest.mark.parametrize("keys,words", [
    ({"vocab_size": 500}, ["data.vocab_size=500 is ignored by data.tokenizer=word"]),
    ({"tokenizer": "bpe"}, ["needs the number of subword pieces",
                            "--config.data.vocab_size=N"]),
    ({"tokenizer": "unigram", "vocab_size": 50, "dir": "synthetic"},
     ["cannot read the synthetic corpus", "tokenizer=word"]),
    ({"tokenizer": "bpe", "vocab_size": 50, "dir": "tfds:ptb_text_only"},
     ["cannot read tfds:ptb_text_only"]),
])
def test_bad_combinations_are_refused_in_one_line(keys, words):
    with pytest.raises(ConfigError) as e:
        config_lib.validate(_config(**keys))
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)
    with pytest.raises(ConfigError):  # and before any corpus loads
        train.load_corpus_from(_config(**keys))


@needs_tokenizers
def test_sizes_out_of_range_are_refused(corpus_dir, tmp_path):
    chars = set("".join(w for w in _words(_lines(corpus_dir, "train"))
                        if w not in ("<unk>", "<eos>")))
    least = 2 + 1 + len(chars)  # specials, the word mark, the characters
    with pytest.raises(ConfigError, match=f"too small.*use at least {least}$"):
        data.read_corpus(corpus_dir, tokenizer="bpe", vocab_size=least - 1,
                         cache_dir=tmp_path)
    assert len(data.read_corpus(corpus_dir, tokenizer="bpe", vocab_size=least,
                                cache_dir=tmp_path).vocab) == least
    with pytest.raises(ConfigError, match=r"too small for the unigram trainer.* it keeps "
                       r"\d+ pieces .*use a larger N$"):  # it overshoots at the least N
        data.read_corpus(corpus_dir, tokenizer="unigram", vocab_size=least,
                         cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"more than the training split .* allows: its "
                       r"bpe vocabulary stops at (\d+) pieces; use at most \1$") as e:
        data.read_corpus(corpus_dir, tokenizer="bpe", vocab_size=5000, cache_dir=tmp_path)
    most = int(str(e.value).rsplit(" ", 1)[1])
    assert least < most < 5000
    assert data.read_corpus(corpus_dir, tokenizer="bpe", vocab_size=most,
                            cache_dir=tmp_path).vocab_size == most


def _fake_run(workdir, **data_keys):
    (workdir / "checkpoints" / "1").mkdir(parents=True)
    saved = json.loads(config_lib.to_json(_config(**data_keys)))
    (workdir / "config.json").write_text(json.dumps(saved))


def test_a_resume_with_another_tokenizer_or_order_is_refused(corpus_dir, tmp_path):
    _fake_run(tmp_path / "bpe", tokenizer="bpe", vocab_size=120)
    with pytest.raises(ConfigError, match="this run was trained with tokenizer bpe 120; "
                       "--config.data.tokenizer=unigram --config.data.vocab_size=120"):
        train._config_changes(_config(tokenizer="unigram", vocab_size=120),
                              tmp_path / "bpe", print)
    with pytest.raises(ConfigError, match="trained with tokenizer bpe 120; "
                       "--config.data.tokenizer=word"):
        train._config_changes(_config(), tmp_path / "bpe", print)
    assert train._config_changes(_config(tokenizer="bpe", vocab_size=120),
                                 tmp_path / "bpe", print) == {}
    # another order: the same words, other ids; the vocabulary check says so
    work = tmp_path / "order"
    _fake_run(work, dir=str(corpus_dir))
    data.save_vocab(work, data.read_corpus(corpus_dir, cache_dir=tmp_path).vocab)
    freq = data.read_corpus(corpus_dir, order="frequency", cache_dir=tmp_path)
    with pytest.raises(DataError, match="same words in another order .*data.vocab_order"):
        train._check_vocabulary(_config(vocab_order="frequency"), work, "train", freq)


@needs_tokenizers
def test_ptb_bpe_round_trip():
    ptb = shared_corpus("ptb")  # (read_corpus's whole path is tested on a small corpus)
    bpe = subword.train("bpe", 500, _lines(ptb, "train"), "ptb")
    assert len(bpe.pieces) == 500 and bpe.pieces[:2] == ("<eos>", "<unk>")
    lines = _lines(ptb, "valid")
    ids = bpe.encode_lines(lines)
    valid = _words(lines)
    assert subword.count_words(lines) == len(valid)  # 73,760 words with <eos>
    assert subword.decode_words(bpe.pieces[i] for i in ids) == valid
    assert len(ids) > 1.5 * len(valid)  # pieces, not words


@pytest.fixture(scope="module")
def subword_weights(corpus_dir, tmp_path_factory):
    """Random reference-layout weights over the corpus's bpe 120 pieces, recorded with
    the tokenizer and vocabulary as a run records them."""
    corpus = data.read_corpus(corpus_dir, tokenizer="bpe", vocab_size=120,
                              order="frequency",
                              cache_dir=tmp_path_factory.mktemp("cache"))
    state = ref.random_state(np.random.default_rng(0), vocab=corpus.vocab_size, emsize=4,
                             nhid=6, nhidlast=5, nlayers=2, n_experts=2, head="mos",
                             scale=0.3)
    out = tmp_path_factory.mktemp("weights")
    np.savez(out / "w.npz", **state)
    convert.save_weights(out, *convert.load_reference_npz(out / "w.npz"))
    data.save_vocab(out, corpus.vocab)
    data.save_subwords(out, corpus.subwords)
    return corpus, state, out


@needs_tokenizers
def test_evaluate_text_reads_it_through_the_tokenizer(subword_weights, corpus_dir,
                                                      tmp_path, capsys):
    corpus, state, weights = subword_weights
    text = tmp_path / "t.txt"
    lines = _lines(corpus_dir, "test")[:8]
    text.write_text("\n".join(lines) + "\n")
    assert cli.main(["evaluate", "--weights", str(weights), "--text", str(text),
                     "--batch-size", "1", "--bptt", "20"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = corpus.subwords.encode(lines, corpus.vocab, "t")
    assert subword.decode_words(corpus.decode(ids)) == _words(lines)
    want = ref.token_logprobs(state, ids, 1, 20, "mos")
    n_words = len(_words(lines))
    assert result["tokens"] == want.size == len(ids) - 1
    assert result["ppl"] == pytest.approx(float(np.exp(-want.mean())), rel=1e-5)
    assert result["words"] == n_words and result["tokenizer"] == "bpe 120"
    assert result["word_perplexity"] == pytest.approx(
        float(np.exp(-want.mean() * len(ids) / n_words)), rel=1e-5)


@needs_tokenizers
def test_generate_encodes_the_prompt_and_prints_words(subword_weights, capsys):
    corpus, _, weights = subword_weights
    prompt = "sukame ka <unk> topeme"
    assert cli.main(["generate", "--weights", str(weights), "--prompt", prompt,
                     "--words", "25", "--seed", "1"]) == 0
    out = capsys.readouterr()
    stats = json.loads(out.err.strip().splitlines()[-1])
    prompt_ids = corpus.subwords.encode([prompt], corpus.vocab, "p")[:-1]
    assert stats["prompt_words"] == len(prompt_ids) > 4  # pieces, not words
    text = out.out.rstrip("\n")
    assert text.startswith(prompt)  # words, spaces restored: no pieces, no marks
    assert subword.MARK not in text


@needs_tokenizers
def test_vocab_study_reports_per_word_and_checks_sizes_first(corpus_dir, tmp_path,
                                                             monkeypatch):
    from mos_jax import compare, study
    base = config_lib.load_config(str(CONFIGS / "tiny.py"))
    base.data.dir = str(corpus_dir)
    trained = []

    def fake_compare(config, heads, workdir, **kw):  # what compare_heads measures
        trained.append((config.data.tokenizer, config.data.vocab_size,
                        config.model.emsize))
        return {"heads": {h: {"params": 1, "valid_ppl": 50.0 + i, "rank": 7,
                              "rank_contexts": 60, "steps": 4, "epochs": 2}
                          for i, h in enumerate(heads)}}
    monkeypatch.setattr(compare, "compare_heads", fake_compare)
    with pytest.raises(ConfigError, match="bpe vocabulary stops at"):
        study.run_vocab_study(base, "softmax", "60,5000", tmp_path / "no", steps=4,
                              evals=2, log=lambda line: None)
    assert trained == []  # refused before anything trained
    out = study.run_vocab_study(base, "softmax,mos", "60,100", tmp_path / "vs", width=8,
                                steps=4, evals=2, log=lambda line: None, plot=False)
    assert trained == [("bpe", 60, 8), ("bpe", 100, 8)]
    words = len(_words(_lines(corpus_dir, "valid")))
    for row in out["rows"]:
        pieces = data.read_corpus(corpus_dir, tokenizer="bpe",
                                  vocab_size=row["vocab_size"]).valid.size
        ppl = 50.0 + ("softmax", "mos").index(row["head"])
        assert row["valid_word_ppl"] == pytest.approx(ppl ** (pieces / words))
    assert (tmp_path / "vs" / "vocab_study.md").read_text().count("| mos |") == 2


@pytest.mark.parametrize("argv, message", [
    (["--vocab-sizes", "60"], "give its config with --config FILE"),
    (["--config", "configs/tiny.py", "--vocab-sizes", "60", "--widths", "8,16"],
     "one width"),
    (["--config", "configs/tiny.py", "--vocab-sizes", "60,60"], "given twice"),
    (["--config", "configs/tiny.py", "--vocab-sizes", "60"],
     "cannot read the synthetic corpus"),
    (["--config", "configs/tiny.py", "--vocab-sizes", "60", "--encoders", "transformer"],
     "--encoders belongs to the width study"),
    (["--config", "configs/tiny.py", "--vocab-sizes", "60", "--transformer-config",
      "configs/tiny.py"], "--transformer-config belongs to the width study"),
])
def test_vocab_study_arguments_fail_before_any_training(argv, message, tmp_path, capsys):
    workdir = tmp_path / "study"
    assert cli.main(["study", "--workdir", str(workdir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not workdir.exists()


def test_vocab_study_writes_where_workdir_says(tmp_path, monkeypatch):
    from mos_jax import study
    seen = []
    monkeypatch.setattr(study, "run_vocab_study", lambda config, heads, sizes, workdir,
                        **kw: seen.append(workdir) or {"plot": "p.png"})
    monkeypatch.chdir(tmp_path)
    tiny = str(CONFIGS / "tiny.py")
    for given in (["--workdir", "runs/study"], []):  # the width study's default name too
        assert cli.main(["study", "--config", tiny, "--vocab-sizes", "60", *given]) == 0
    assert seen == [Path("runs/study"), Path("runs/vocab-study")]


@needs_tokenizers
def test_a_resume_reads_its_corpus_with_the_runs_tokenizer(corpus_dir, tmp_path,
                                                          monkeypatch):
    """When the tokenizer trained now differs from the one a run recorded (another
    version of the library, say), a resume or a finetune reads the corpus with the
    run's tokenizer.json, so the ids are the ones its weights were trained on; a change
    of order is still refused."""
    monkeypatch.setenv("MOS_JAX_CACHE", str(tmp_path / "cache"))
    config = _config(dir=str(corpus_dir), tokenizer="bpe", vocab_size=120,
                     vocab_order="frequency")
    theirs = subword.train("bpe", 120, _lines(corpus_dir, "train")[:250], "other")
    assert theirs.spec != train.load_corpus_from(config).subwords.spec
    lines = {s: _lines(corpus_dir, s) for s in data.SPLITS}
    first = [theirs.pieces[i] for i in theirs.encode_lines(lines["train"])]
    counts = collections.Counter(first)  # frequency order, computed here
    order = {p: k for k, p in enumerate(dict.fromkeys(
        first + [theirs.pieces[i] for s in ("valid", "test")
                 for i in theirs.encode_lines(lines[s])]))}
    recorded = tuple(sorted(theirs.pieces, key=lambda p: (
        -counts[p], order.get(p, len(order)), theirs.pieces.index(p))))
    work = tmp_path / "run"
    _fake_run(work, dir=str(corpus_dir), tokenizer="bpe", vocab_size=120,
              vocab_order="frequency")
    data.save_vocab(work, recorded)
    data.save_subwords(work, theirs)
    with pytest.raises(DataError):  # the corpus as the tokenizer trained now gives it
        train._check_vocabulary(config, work, "train", train.load_corpus_from(config))
    corpus = train._run_corpus(config, work, "train")
    train._check_vocabulary(config, work, "train", corpus)
    assert corpus.vocab == recorded and corpus.subwords.spec == theirs.spec
    for s in data.SPLITS:
        want = [recorded.index(theirs.pieces[i]) for i in theirs.encode_lines(lines[s])]
        np.testing.assert_array_equal(corpus.split(s), want)
        assert corpus.words_in(s) == len(_words(lines[s]))
    finetune = _config(dir=str(corpus_dir), tokenizer="bpe", vocab_size=120,
                       vocab_order="frequency")
    finetune.finetune.init_from = str(work)
    assert train._run_corpus(finetune, tmp_path / "ft", "finetune").vocab == recorded
    config.data.vocab_order = "first"  # another order: refused, as before
    with pytest.raises(DataError, match="same words in another order"):
        train._check_vocabulary(config, work, "train",
                                train._run_corpus(config, work, "train"))


@needs_tokenizers
def test_cached_ids_are_those_of_the_cached_tokenizer(corpus_dir, tmp_path):
    """The ids cached for one order stay bound to the tokenizer they were encoded
    with: when the tokenizer cached beside them is another (written by another
    process or version), they are encoded again with it, never mixed."""
    data.read_corpus(corpus_dir, tokenizer="bpe", vocab_size=120, order="frequency",
                     cache_dir=tmp_path)
    other = subword.train("bpe", 120, _lines(corpus_dir, "train")[:250], "other")
    (path,) = tmp_path.glob("*.tokenizer.json")
    path.write_text(other.to_json())
    again = data.read_corpus(corpus_dir, tokenizer="bpe", vocab_size=120,
                             order="frequency", cache_dir=tmp_path)
    assert again.subwords.spec == other.spec
    lines = _lines(corpus_dir, "valid")
    want = [again.vocab.index(other.pieces[i]) for i in other.encode_lines(lines)]
    np.testing.assert_array_equal(again.valid, want)


@needs_tokenizers
def test_a_tokenizer_without_its_vocabulary_is_one_line(subword_weights, corpus_dir,
                                                        tmp_path, capsys):
    import shutil
    weights = tmp_path / "w"
    shutil.copytree(subword_weights[2], weights)
    (weights / data.VOCAB_FILE).unlink()
    assert cli.main(["evaluate", "--weights", str(weights), "--data", str(corpus_dir),
                     "--split", "valid"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no vocabulary (vocab.json)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@needs_tokenizers
def test_evaluate_text_counts_the_characters_the_tokenizer_lacks(subword_weights, tmp_path,
                                                                 capsys):
    corpus, _, weights = subword_weights
    text = tmp_path / "t.txt"
    text.write_text(" sukame zuzu ka <unk> \n kazu <unk> topeme \n")
    assert cli.main(["evaluate", "--weights", str(weights), "--text", str(text),
                     "--batch-size", "1", "--bptt", "20"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["unknown_tokens"] == 3  # the z's (bpe: one <unk> per character)
    assert "'zuzu', 'kazu'" in out.err  # named in the note (the <unk> words are words)


@needs_tokenizers
def test_generate_notes_the_characters_of_the_prompt_the_tokenizer_lacks(
        subword_weights, capsys):
    _, _, weights = subword_weights
    assert cli.main(["generate", "--weights", str(weights), "--prompt", "sukame zuzu",
                     "--words", "3"]) == 0
    err = capsys.readouterr().err
    assert "note: 2 of " in err and "the prompt" in err and "'zuzu'" in err
