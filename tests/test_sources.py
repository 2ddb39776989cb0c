"""The registry of corpus sources and the one config-to-corpus path."""

import numpy as np
import pytest

from mos_jax import config as config_lib, data, sources, train
from mos_jax.errors import DataError


def _config(**data_keys):
    c = config_lib.default_config()
    for key, value in data_keys.items():
        if key == "synthetic":
            c.data.synthetic.update(value)
        else:
            c.data[key] = value
    return c


def test_the_registry_names_every_source_in_one_line():
    assert {"synthetic", "tfds:", sources.DIRECTORY} <= set(sources.SOURCES)
    lines = sources.describe_sources().splitlines()
    assert len(lines) == len(sources.SOURCES)
    assert all(line.split()[0] in sources.SOURCES for line in lines)


def test_find_source_exact_prefix_directory_and_unknown(tmp_path):
    assert sources.find_source("synthetic")[0].name == "synthetic"
    entry, rest = sources.find_source("tfds:lm1b:text")
    assert (entry.name, rest) == ("tfds:", "lm1b:text")
    entry, rest = sources.find_source(str(tmp_path))
    assert (entry.name, rest) == (sources.DIRECTORY, str(tmp_path))
    odd = tmp_path / "a:b"  # an existing directory with a colon is a directory
    odd.mkdir()
    assert sources.find_source(str(odd))[0].name == sources.DIRECTORY
    with pytest.raises(DataError, match=r"unknown corpus source prefix 'tfsd:'") as e:
        sources.find_source("tfsd:lm1b")
    assert "synthetic" in str(e.value) and "tfds:" in str(e.value)
    with pytest.raises(DataError, match="empty corpus source"):
        sources.find_source("")


def test_the_config_path_reads_each_source_with_its_keys(tmp_path):
    small = {"vocab_size": 20, "train_tokens": 300, "valid_tokens": 50,
             "test_tokens": 50, "seed": 3}
    got = sources.load_corpus_from(_config(dir="synthetic", synthetic=small,
                                           vocab_order="first"))
    want = data.synthetic_corpus(**small)
    assert got.vocab == want.vocab and np.array_equal(got.train, want.train)
    assert train.load_corpus_from is sources.load_corpus_from  # one path
    d = tmp_path / "c"
    d.mkdir()
    for s, text in zip(data.SPLITS, ("a b b\n", "a\n", "b\n")):
        (d / f"{s}.txt").write_text(text)
    first = sources.load_corpus_from(_config(dir=str(d), vocab_order="first"))
    assert first.vocab == ("a", "b", "<eos>")  # first occurrence
    freq = sources.load_corpus_from(_config(dir=str(d), vocab_order="frequency"))
    assert freq.vocab == ("b", "a", "<eos>")  # b twice; a before <eos> (first seen)
    assert freq.train.tolist() == [1, 0, 0, 2]


def test_corpus_of_takes_a_runs_source_options():
    run = _config(dir="synthetic", vocab_order="frequency",
                  synthetic={"vocab_size": 12, "train_tokens": 200, "valid_tokens": 40,
                             "test_tokens": 40, "seed": 5})
    got = sources.corpus_of("synthetic", run)
    want = data.synthetic_corpus(vocab_size=12, train_tokens=200, valid_tokens=40,
                                 test_tokens=40, seed=5)
    assert got.vocab == want.vocab  # first occurrence: words are mapped by string later
    assert np.array_equal(got.valid, want.valid)
    assert run.data.vocab_order == "frequency"  # the run's config is left as it was
    assert sources.corpus_of("synthetic").vocab_size == data.synthetic_corpus().vocab_size


def test_corpus_of_keeps_every_word_of_another_corpus(tmp_path):
    """A run trained with data.min_count 2 reads another corpus (`--data`) word for
    word: its words known to the run keep their ids, whatever their count there, and
    only words the run lacks become the run's <unk> (and are counted)."""
    d = tmp_path / "other"
    d.mkdir()
    for s, text in zip(data.SPLITS, ("the cat the cat\n", "the dog\n", "a dog sat\n")):
        (d / f"{s}.txt").write_text(text)
    run = _config(dir=str(d), min_count=2)
    got = sources.corpus_of(str(d), run)
    assert got.decode(got.test) == ["a", "dog", "sat", "<eos>"]
    vocab = ("the", "cat", "dog", "<eos>", "<unk>")  # the run's: no "a", no "sat"
    mapped, unknown = data.map_to_vocab(got, vocab, ["test"])
    assert [vocab[i] for i in mapped.test] == ["<unk>", "dog", "<unk>", "<eos>"]
    assert unknown  # reported, not silent
    assert run.data.min_count == 2  # the run's config is left as it was
