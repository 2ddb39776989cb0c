"""Corpus reading, the id cache, errors, and the synthetic Markov corpus."""

import hashlib

import numpy as np
import pytest

from conftest import shared_corpus
from mos_jax import data, sources
from mos_jax.errors import DataError


def write_corpus(path, train, valid, test, mode="w"):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in zip(data.SPLITS, (train, valid, test)):
        (path / f"{name}.txt").write_text(text, encoding="utf-8")
    return path


def test_vocabulary_order_and_eos_by_hand(tmp_path):
    d = write_corpus(tmp_path / "c", " a b \n\n c a \n", "b d\n   \n", "e a\n")
    c = data.read_corpus(d, cache=False)
    # First occurrence over train, valid, test; blank lines are a lone <eos>.
    assert c.vocab == ("a", "b", "<eos>", "c", "d", "e")
    assert c.train.tolist() == [0, 1, 2, 2, 3, 0, 2]
    assert c.valid.tolist() == [1, 4, 2, 2]
    assert c.test.tolist() == [5, 0, 2]
    assert c.train.dtype == np.int32
    assert c.decode(c.encode(["e", "a"])) == ["e", "a"]


def test_a_fixed_vocabulary_keeps_its_ids_and_refuses_renumbering(tmp_path):
    """A run's vocabulary fixes the ids: given in an order unlike the corpus's own,
    the words get exactly those ids; asking for frequency order with it is refused
    (it would renumber the ids the model was trained on)."""
    d = write_corpus(tmp_path / "c", "a b a a\n", "b a\n", "a\n")
    vocab = ("<eos>", "b", "a")  # not the corpus's first-occurrence order
    c = data.read_corpus(d, vocab=vocab)
    assert c.vocab == vocab
    assert c.train.tolist() == [2, 1, 2, 2, 0] and c.valid.tolist() == [1, 2, 0]
    with pytest.raises(DataError, match="renumber the fixed vocabulary"):
        data.read_corpus(d, vocab=vocab, order="frequency")


def test_sha256_files_hashes_prefix_files_and_separators(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.bin"
    a.write_bytes(b"hello\n")
    b.write_bytes(bytes(range(256)) * 5000)  # over one 1 MiB read
    assert data.sha256_files([a]) == hashlib.sha256(b"hello\n").hexdigest()
    whole = b"pre" + b"hello\n" + b"\0" + bytes(range(256)) * 5000 + b"\0"
    assert data.sha256_files([a, b], b"pre", b"\0") == hashlib.sha256(whole).hexdigest()
    # the id cache's key: the cache format, then each file's length and bytes
    fmt = data._CACHE_FORMAT.encode()
    assert data.files_digest([b, a]) == hashlib.sha256(
        fmt + (256 * 5000).to_bytes(8, "little") + bytes(range(256)) * 5000
        + (6).to_bytes(8, "little") + b"hello\n").hexdigest()


def test_corpora_that_differ_only_in_where_a_byte_lies_have_their_own_entries(tmp_path):
    """A byte moved from the end of train.txt to the start of valid.txt makes
    another corpus, with another cache key: each gets its own ids, as read without
    the cache."""
    one = write_corpus(tmp_path / "one", "a b\0", "c\n", "a\n")
    two = write_corpus(tmp_path / "two", "a b", "\0c\n", "a\n")
    cache = tmp_path / "cache"
    for d in (one, two):
        got = data.read_corpus(d, cache_dir=cache)
        want = data.read_corpus(d, cache=False)
        assert got.vocab == want.vocab and got.train.tolist() == want.train.tolist()
    assert len(list(cache.glob("*.ids"))) == 2


def test_ptb_counts_and_ids():
    c = data.read_corpus(shared_corpus("ptb"))
    assert (len(c.train), len(c.valid), len(c.test)) == (929_589, 73_760, 82_430)
    assert c.vocab_size == 10_000
    assert (c.vocab[0], c.vocab[24], c.vocab[9999]) == ("aer", "<eos>", "unilab")


def test_wikitext2_counts():
    c = data.read_corpus(shared_corpus("wikitext-2"))
    assert (len(c.train), len(c.valid), len(c.test)) == (2_088_628, 217_646, 245_569)
    assert c.vocab_size == 33_278
    assert c.word_to_id["<eos>"] == 0


def test_cache_is_used_and_keyed_by_content(tmp_path, monkeypatch):
    d = write_corpus(tmp_path / "c", "a b\n", "b\n", "a\n")
    cache = tmp_path / "cache"
    first = data.read_corpus(d, cache_dir=cache)
    assert len(list(cache.glob("*.ids"))) == 1

    def fail(*a, **k):
        raise AssertionError("tokenised again despite the cache")
    monkeypatch.setattr(data, "build_corpus", fail)
    monkeypatch.setattr(data, "_stream_word_ids", fail)
    second = data.read_corpus(d, cache_dir=cache)
    assert second.vocab == first.vocab
    assert np.array_equal(second.train, first.train)
    monkeypatch.undo()

    (d / "test.txt").write_text("a c\n")  # new content -> new key, new vocabulary
    third = data.read_corpus(d, cache_dir=cache)
    assert "c" in third.vocab and len(list(cache.glob("*.ids"))) == 2


def test_damaged_cache_is_rebuilt(tmp_path):
    d = write_corpus(tmp_path / "c", "a b\n", "b\n", "a\n")
    cache = tmp_path / "cache"
    data.read_corpus(d, cache_dir=cache)
    (entry,) = cache.glob("*.ids")
    (entry / "meta.json").write_bytes(b"not json")
    assert data.read_corpus(d, cache_dir=cache).train.tolist() == [0, 1, 2]
    train = entry / "train.npy"  # a short file (an interrupted copy, say)
    train.write_bytes(train.read_bytes()[:-4])
    assert data.read_corpus(d, cache_dir=cache).train.tolist() == [0, 1, 2]
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no temporary left


def test_a_cache_whose_ids_were_damaged_is_rebuilt(tmp_path):
    """Ids overwritten in place (the file's length and header intact: a bad sector, a
    stray write) are caught by the checksum the entry records, and the entry rebuilt:
    the ids are those of the text, never the damaged ones (an `.npz` cache had its
    zip CRC for this; a bare `.npy` has nothing of its own)."""
    d = write_corpus(tmp_path / "c", "a b\n", "b\n", "a\n")
    cache = tmp_path / "cache"
    data.read_corpus(d, cache_dir=cache)
    (entry,) = cache.glob("*.ids")
    train = entry / "train.npy"
    raw = bytearray(train.read_bytes())
    raw[-4:] = np.array([1_000_000], "<i4").tobytes()  # the last id: 2 -> 1,000,000
    train.write_bytes(bytes(raw))
    again = data.read_corpus(d, cache_dir=cache)
    want = data.build_corpus({s: (d / f"{s}.txt").read_text().splitlines()
                              for s in data.SPLITS}, str(d))
    assert again.vocab == want.vocab
    for s in data.SPLITS:
        assert again.split(s).tolist() == want.split(s).tolist(), s


def test_id_writer_streams_ids_and_leaves_nothing_when_interrupted(tmp_path):
    """Ids written in chunks read back (memory-mapped) as one int32 stream whose
    SHA-256 is that of their bytes; a writer interrupted mid-way leaves no file that
    would read as a short or empty stream, and no temporary beside it."""
    path = tmp_path / "ids.npy"
    chunks = [np.arange(5), np.array([7, 1 << 30]), np.arange(0)]
    with data.IdWriter(path) as w:
        for c in chunks:
            w.write(c)
    want = np.concatenate(chunks).astype("<i4")
    got = data.open_ids(path)
    assert isinstance(got, np.memmap) and got.tolist() == want.tolist()
    assert w.sha256 == hashlib.sha256(want.tobytes()).hexdigest()
    assert np.load(path).tolist() == want.tolist()
    broken = tmp_path / "broken.npy"
    with pytest.raises(KeyboardInterrupt):
        with data.IdWriter(broken) as w:
            w.write(np.arange(5))
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npy"]


def test_an_entry_another_process_published_first_is_kept(tmp_path):
    """Processes that stream one corpus into a shared cache at once publish the same
    entry: the later one keeps the entry already there (the same record, its ids
    intact) and drops its own, so the earlier one, mapping its entry, keeps it; an
    entry whose ids are damaged is replaced, and nothing is left beside it."""
    import shutil
    d = write_corpus(tmp_path / "c", "a b a\n", "b\n", "a\n")
    cache = tmp_path / "cache"
    first = data.read_corpus(d, cache_dir=cache)
    (entry,) = cache.glob("*.ids")
    inode = (entry / "train.npy").stat().st_ino
    theirs = tmp_path / "theirs.part"  # the other process's finished entry: the same
    shutil.copytree(entry, theirs)
    good = tmp_path / "good"
    shutil.copytree(entry, good)
    data._publish(theirs, entry)
    assert not theirs.exists() and (entry / "train.npy").stat().st_ino == inode
    assert first.train.tolist() == [0, 1, 0, 2]  # still mapped, still there
    raw = bytearray((entry / "train.npy").read_bytes())  # damaged in place
    raw[-4:] = np.array([7], "<i4").tobytes()
    (entry / "train.npy").write_bytes(bytes(raw))
    data._publish(good, entry)
    assert not good.exists() and (entry / "train.npy").stat().st_ino != inode
    assert [p.name for p in cache.iterdir()] == [entry.name]
    assert data.read_corpus(d, cache_dir=cache).train.tolist() == [0, 1, 0, 2]


def test_a_cache_whose_record_was_damaged_is_rebuilt(tmp_path):
    """The entry's record (vocabulary, sizes, digests) is itself checked: a record
    that still parses but lost words is refused and the entry rebuilt, so ids are
    never given other words."""
    import json
    d = write_corpus(tmp_path / "c", "a b c\n", "b\n", "c a\n")
    cache = tmp_path / "cache"
    data.read_corpus(d, cache_dir=cache)
    (entry,) = cache.glob("*.ids")
    record = json.loads((entry / "meta.json").read_text())
    record["vocab"] = record["vocab"][:2]  # ids 2 and 3 would point past it
    (entry / "meta.json").write_text(json.dumps(record))
    again = data.read_corpus(d, cache_dir=cache)
    assert again.vocab == ("a", "b", "c", "<eos>")
    assert again.decode(again.test) == ["c", "a", "<eos>"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        data.read_corpus(tmp_path / "nowhere")
    # How to give one (the config key; the loading commands' flag) and how to fetch one.
    assert "--config.data.dir DIR" in str(e.value) and "--data DIR" in str(e.value)
    assert "mos-jax download" in str(e.value) and "\n" not in str(e.value)
    d = write_corpus(tmp_path / "c", "a\n", "a\n", "a\n")
    (d / "valid.txt").unlink()
    with pytest.raises(DataError, match=r"missing corpus file .*valid\.txt") as e:
        data.read_corpus(d)
    assert "--config.data.dir DIR" in str(e.value) and "mos-jax download" in str(e.value)
    write_corpus(d, "a\n", " \n\n", "a\n")
    with pytest.raises(DataError, match=r"valid\.txt is empty"):
        data.read_corpus(d, cache=False)
    write_corpus(d, "a\n", "a\n", "a\n")
    (d / "test.txt").write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"not UTF-8 .*line 2"):
        data.read_corpus(d, cache=False)
    write_corpus(d, "a b\n", "a zz\n", "qq b\n")
    with pytest.raises(DataError, match=r"valid split .* 'zz'"):
        data.read_corpus(d, vocab=["a", "b", "<eos>"])
    with pytest.raises(DataError, match="unknown split"):
        data.read_corpus(d, cache=False).split("dev")
    with pytest.raises(DataError, match="'nope'"):
        data.read_corpus(d, cache=False).encode(["a", "nope"])


def test_synthetic_chain_is_exact():
    chain = data.make_markov_chain(vocab_size=40, peakedness=2.0, seed=3)
    p = np.exp(chain.log_transition)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(chain.stationary @ p, chain.stationary, atol=1e-12)
    # Entropy rate by an independent formula: H = -sum_ij pi_i P_ij log P_ij.
    h = -np.sum(chain.stationary[:, None] * p * np.log(p))
    assert chain.entropy_rate == pytest.approx(h, rel=1e-12)
    # High rank: the softmax bottleneck cannot represent it with d << V.
    assert np.linalg.matrix_rank(chain.log_transition) >= 39


def test_synthetic_corpus_samples_the_chain():
    c = data.synthetic_corpus(vocab_size=30, train_tokens=60_000, valid_tokens=100,
                              test_tokens=100, peakedness=1.5, seed=7)
    chain = data.make_markov_chain(30, 1.5, 7)
    assert c.entropy_rate == pytest.approx(chain.entropy_rate)
    # The sample's own NLL under the true chain converges to the entropy rate.
    nll = -chain.log_transition[c.train[:-1], c.train[1:]].mean()
    assert nll == pytest.approx(c.entropy_rate, rel=0.03)
    freq = np.bincount(c.train, minlength=30) / len(c.train)
    np.testing.assert_allclose(freq, chain.stationary, atol=0.02)
    again = sources.load_corpus("synthetic", vocab_size=30, train_tokens=60_000,
                                valid_tokens=100, test_tokens=100, peakedness=1.5, seed=7)
    assert np.array_equal(again.train, c.train) and again.vocab[:2] == ("w0", "w1")
    with pytest.raises(DataError, match="at least 2 tokens"):
        data.synthetic_corpus(test_tokens=1)


@pytest.mark.parametrize("order", ["first", "frequency"])
@pytest.mark.parametrize("run_bytes", [1 << 20, 1, 3, 5])
def test_streamed_cache_equals_reading_in_memory(tmp_path, monkeypatch, order, run_bytes):
    """The cache is written a block of words at a time (blocks of 7 tokens here), the
    files read `run_bytes` of a line at a time (words and UTF-8 characters of 2, 3
    and 4 bytes cut between reads; one line of 400 words): the same vocabulary and
    ids as tokenising the whole text in memory (`build_corpus`, then `order_vocab`),
    whitespace of every kind, blank lines and a last line without its newline
    included; the cached splits are memory-mapped."""
    monkeypatch.setattr(data, "_BLOCK_TOKENS", 7)
    monkeypatch.setattr(data, "_RUN_BYTES", run_bytes)
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)] + ["caf\u00e9", "x\ry", "\u6771\u4eac",
                                             "\U0001f600z", "a\u3000b", "c\x85d"]
    def text(n):
        lines = [" ".join(rng.choice(words, size=rng.integers(0, 9))) for _ in range(n)]
        lines.append(" ".join(rng.choice(words, size=400)))  # a long line
        return "\n".join(lines) + "\n \u2028 z\x0bq \n\n" + "tail without newline"
    d = write_corpus(tmp_path / "c", text(60), text(15), text(15))
    got = data.read_corpus(d, cache_dir=tmp_path / "cache", order=order)
    lines = {s: (d / f"{s}.txt").read_bytes().decode("utf-8").split("\n")
             for s in data.SPLITS}  # no trailing newline: no empty last line
    want = data.order_vocab(data.build_corpus(lines, str(d)), order)
    assert got.vocab == want.vocab
    for s in data.SPLITS:
        assert isinstance(got.split(s), np.memmap) and got.split(s).dtype == np.int32
        np.testing.assert_array_equal(got.split(s), want.split(s))


@pytest.mark.parametrize("run_bytes", [1 << 20, 2])
def test_streamed_cache_refuses_bad_text_like_reading_in_memory(tmp_path, monkeypatch,
                                                                run_bytes):
    monkeypatch.setattr(data, "_RUN_BYTES", run_bytes)
    d = write_corpus(tmp_path / "c", "a\n", "a\n", "a\n")
    (d / "test.txt").write_bytes(b"ok\nfine\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"not UTF-8 text: byte 11 \(line 3\)"):
        data.read_corpus(d, cache_dir=tmp_path / "cache")
    (d / "test.txt").write_bytes(b"ok\nfine\ncaf\xc3")  # cut inside its last character
    with pytest.raises(DataError, match=r"not UTF-8 text: byte 11 \(line 3\)"):
        data.read_corpus(d, cache_dir=tmp_path / "cache")
    write_corpus(d, "a\n", " \n\n", "a\n")
    with pytest.raises(DataError, match=r"valid\.txt is empty"):
        data.read_corpus(d, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written is kept


def test_a_cache_entry_written_again_replaces_the_old_one(tmp_path):
    """A stale entry (a subword corpus of another tokenizer, say) is replaced, not kept;
    arrays already mapped from the old files stay readable."""
    path = tmp_path / "key.ids"
    old = data.Corpus("c", ("a", "b"), *(np.array([0, 1, 0], np.int32),) * 3)
    data._save_cache(path, old)
    mapped = data._load_cache(path, "c")
    new = data.Corpus("c", ("x", "y", "z"), *(np.array([2, 1, 0, 2], np.int32),) * 3)
    data._save_cache(path, new)
    again = data._load_cache(path, "c")
    assert again.vocab == ("x", "y", "z") and again.train.tolist() == [2, 1, 0, 2]
    assert mapped.train.tolist() == [0, 1, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["key.ids"]


@pytest.mark.parametrize("order", ["first", "frequency"])
def test_min_count_maps_rare_words_to_unk_as_counted_by_hand(tmp_path, order):
    """`data.min_count`: words seen fewer times in training become `<unk>` (`<eos>`
    always kept), the same through the streamed cache and the in-memory path, against
    a count by hand with collections.Counter."""
    import collections
    texts = {"train": "a b a c a b d\nb a\n", "valid": "a e b\n", "test": "c a zz\n"}
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, text in texts.items():
        (folder / f"{split}.txt").write_text(text)
    tokens = {s: [w for line in t.splitlines() for w in line.split() + ["<eos>"]]
              for s, t in texts.items()}
    count = collections.Counter(tokens["train"])  # a 4, b 3, <eos> 2, c 1, d 1
    seen = list(dict.fromkeys(tokens["train"] + tokens["valid"] + tokens["test"]))
    kept = [w for w in seen if count[w] >= 2 or w == "<eos>"] + ["<unk>"]
    mapped = {s: [w if w in kept else "<unk>" for w in ts] for s, ts in tokens.items()}
    if order == "frequency":  # by training count after mapping, ties by first occurrence
        after = collections.Counter(mapped["train"])
        stream = mapped["train"] + mapped["valid"] + mapped["test"]
        kept.sort(key=lambda w: (-after[w], stream.index(w)))
    for cache in (True, False):
        corpus = data.read_corpus(folder, cache=cache, cache_dir=tmp_path / "cache",
                                  order=order, min_count=2)
        assert corpus.vocab == tuple(kept)
        for s in ("train", "valid", "test"):
            assert [corpus.vocab[i] for i in corpus.split(s)] == mapped[s], (cache, s)
    plain = data.read_corpus(folder, cache_dir=tmp_path / "cache", order=order)
    assert "zz" in plain.vocab and "c" in plain.vocab  # 0: every word, as before


def test_min_count_reaches_the_corpus_from_the_config_and_is_refused_elsewhere(
        tmp_path, monkeypatch):
    from mos_jax import config as config_lib
    from mos_jax.errors import ConfigError
    monkeypatch.setenv("MOS_JAX_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, text in {"train": "a b a c\n", "valid": "a c\n", "test": "b\n"}.items():
        (folder / f"{split}.txt").write_text(text)
    config = config_lib.default_config()
    config.data.dir, config.data.min_count = str(folder), 2
    corpus = sources.load_corpus_from(config)
    assert set(corpus.vocab) == {"a", "<eos>", "<unk>"}  # b and c once each in train
    config.data.dir = "synthetic"
    with pytest.raises(ConfigError, match=r"min_count=2 applies to the word vocabulary "
                       r"of a corpus directory, not to the synthetic corpus"):
        sources.load_corpus_from(config)
