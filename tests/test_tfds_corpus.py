"""Tests of `mos_jax.tfds_corpus`: corpora from TensorFlow Datasets, without TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from mos_jax.data import SPLITS, read_corpus  # noqa: E402
from mos_jax.errors import DataError  # noqa: E402
from mos_jax.sources import load_corpus  # noqa: E402
from mos_jax.tfds_corpus import load_tfds_corpus, prepare_builder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Blank lines, a line that is a single space, tabs, a carriage return and non-ASCII
# words: each must come back so that `line.split()` and the `<eos>` count are unchanged.
SMALL_CORPUS = {
    "train.txt": "the cat sat\n\n \n  naïve  café \tthe\ndog\r\nthe end\n",
    "valid.txt": "the dog sat\n \nœuvre 東京\n",
    "test.txt": "\ncat the\n",
}


def _write_corpus(directory: Path, files: dict[str, str] = SMALL_CORPUS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8", newline="")
    return directory


def _assert_same_corpus(got, want) -> None:
    assert got.vocab == want.vocab
    for s in SPLITS:
        np.testing.assert_array_equal(got.split(s), want.split(s), err_msg=s)
        assert got.split(s).dtype == np.int32


# --------------------------------------------------------------------------------------
# The project's own builders.

@pytest.mark.parametrize("name", ["mos_jax_ptb", "mos_jax_wikitext2", "mos_jax_wikitext103",
                                  "mos_jax_lm1b"])
def test_line_builder_matches_read_corpus(tmp_path, name):
    src = _write_corpus(tmp_path / "src")
    data_dir = tmp_path / "tfds"
    corpus = load_tfds_corpus(name, data_dir=data_dir, manual_dir=src)
    assert corpus.name == f"tfds:{name}"
    _assert_same_corpus(corpus, read_corpus(src, cache=False))
    # ArrayRecord files, one per split, and nothing else written as records.
    records = sorted(p.name for p in data_dir.rglob("*") if ".array_record" in p.name)
    assert records == [f"{name}-{s}.array_record-00000-of-00001"
                       for s in ("test", "train", "validation")]
    assert not list(data_dir.rglob("*.tfrecord*"))


def test_line_builder_keeps_lines_verbatim_and_in_order(tmp_path):
    src = _write_corpus(tmp_path / "src")
    builder = prepare_builder("mos_jax_ptb", src, tmp_path / "tfds")
    assert builder.info.disable_shuffling
    assert str(builder.info.file_format.value) == "array_record"
    assert set(builder.info.splits) == {"train", "validation", "test"}
    source = builder.as_data_source(split="train")
    stored = [source[i]["text"].decode("utf-8") for i in range(len(source))]
    assert stored == SMALL_CORPUS["train.txt"].split("\n")[:-1]
    assert stored[2] == " "


def test_prepared_dataset_is_reused_and_checked(tmp_path):
    src = _write_corpus(tmp_path / "src")
    data_dir = tmp_path / "tfds"
    first = prepare_builder("mos_jax_ptb", src, data_dir)
    record = next(Path(first.data_dir).glob("*-train.array_record-*"))
    mtime = record.stat().st_mtime_ns
    # Prepared already: read back without manual_dir, and with the same files.
    want = read_corpus(src, cache=False)
    _assert_same_corpus(load_tfds_corpus("mos_jax_ptb", data_dir=data_dir), want)
    _assert_same_corpus(load_tfds_corpus("mos_jax_ptb", data_dir=data_dir,
                                         manual_dir=src), want)
    assert record.stat().st_mtime_ns == mtime
    # Other files than those it was prepared from: refuse rather than serve stale data.
    other = _write_corpus(tmp_path / "other", {**SMALL_CORPUS, "test.txt": "a b\n"})
    with pytest.raises(DataError, match="prepared from files other than"):
        load_tfds_corpus("mos_jax_ptb", data_dir=data_dir, manual_dir=other)


def test_load_corpus_dispatches_tfds_sources(tmp_path):
    src = _write_corpus(tmp_path / "src")
    want = read_corpus(src, cache=False)
    corpus = load_corpus("tfds:mos_jax_wikitext2", data_dir=tmp_path / "tfds",
                         manual_dir=src, vocab=want.vocab[::-1])
    assert corpus.vocab == want.vocab[::-1]
    assert corpus.decode(corpus.train) == want.decode(want.train)
    # a fixed vocabulary keeps its ids: renumbering it by frequency is refused
    with pytest.raises(DataError, match="renumber the fixed vocabulary"):
        load_tfds_corpus("mos_jax_wikitext2", data_dir=tmp_path / "tfds",
                         vocab=want.vocab, order="frequency")


# Lines of made-up words, more than the few of SMALL_CORPUS, so that the cache is written
# in many blocks; blank and whitespace-only lines kept.
def _many_lines(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(30)] + ["caf\u00e9", "\u6771"]
    return "".join(" ".join(rng.choice(words, size=rng.integers(0, 8))) + "\n"
                   for _ in range(n)) + " \n\nlast\n"


@pytest.mark.parametrize("order", ["first", "frequency"])
def test_ids_are_streamed_into_the_cache_and_mapped(tmp_path, monkeypatch, order):
    """A TFDS corpus is written into the id cache a block of examples at a time (blocks
    of 5 tokens here): the ids of reading it into memory (today's result, and the word
    path's of the same files), memory-mapped; a second load reads no example."""
    from mos_jax import data, sources, tfds_corpus
    monkeypatch.setattr(data, "_BLOCK_TOKENS", 5)
    src_files = {"train.txt": _many_lines(0, 80), "valid.txt": _many_lines(1, 20),
                 "test.txt": _many_lines(2, 20)}
    src = _write_corpus(tmp_path / "src", src_files)
    data_dir, cache = tmp_path / "tfds", tmp_path / "cache"
    got = load_tfds_corpus("mos_jax_ptb", data_dir=data_dir, manual_dir=src,
                           order=order, cache_dir=cache)
    memory = load_tfds_corpus("mos_jax_ptb", data_dir=data_dir, order=order,
                              cache=False)
    want = data.order_vocab(read_corpus(src, cache=False), order)
    _assert_same_corpus(got, want)
    _assert_same_corpus(memory, want)
    assert got.name == memory.name == "tfds:mos_jax_ptb"
    for s in SPLITS:
        assert isinstance(got.split(s), np.memmap)
        assert not isinstance(memory.split(s), np.memmap)
    assert [p.name.endswith(f"-tfds{'' if order == 'first' else '-' + order}.ids")
            for p in cache.iterdir()] == [True]
    read = []
    real = tfds_corpus._iter_lines
    monkeypatch.setattr(tfds_corpus, "_iter_lines", lambda *a: read.append(a) or real(*a))
    again = load_tfds_corpus("mos_jax_ptb", data_dir=data_dir, order=order,
                             cache_dir=cache)
    assert read == []
    _assert_same_corpus(again, want)
    assert all(isinstance(again.split(s), np.memmap) for s in SPLITS)
    # the config path passes the order on: the mapped cache of this order again
    monkeypatch.setenv("MOS_JAX_CACHE", str(cache))
    from mos_jax import config as config_lib
    config = config_lib.default_config()
    config.data.dir, config.data.tfds_data_dir = "tfds:mos_jax_ptb", str(data_dir)
    config.data.vocab_order = order
    through = sources.load_corpus_from(config)
    assert read == []
    _assert_same_corpus(through, want)
    assert isinstance(through.train, np.memmap)
    # the same dataset prepared from other text elsewhere: another key, its own ids
    other = _write_corpus(tmp_path / "other", {**src_files, "valid.txt": "w1 w2\n"})
    monkeypatch.setattr(tfds_corpus, "_iter_lines", real)
    changed = load_tfds_corpus("mos_jax_ptb", data_dir=tmp_path / "tfds2",
                               manual_dir=other, order=order, cache_dir=cache)
    _assert_same_corpus(changed, data.order_vocab(read_corpus(other, cache=False), order))
    assert len(list(cache.iterdir())) == 2


def test_the_cache_key_holds_the_feature_and_the_dataset(prepared_dir, tmp_path):
    cache = tmp_path / "cache"
    title = load_tfds_corpus("mos_jax_test_two_texts:title", data_dir=prepared_dir,
                             cache_dir=cache)
    body = load_tfds_corpus("mos_jax_test_two_texts:body", data_dir=prepared_dir,
                            cache_dir=cache)
    assert title.decode(title.valid) == ["dev", "title", "<eos>"]
    assert body.decode(body.valid) == ["dev", "body", "<eos>"]
    sentences = load_tfds_corpus("mos_jax_test_sentences", data_dir=prepared_dir,
                                 cache_dir=cache)
    _assert_same_corpus(sentences, load_tfds_corpus("mos_jax_test_sentences",
                                                    data_dir=prepared_dir, cache=False))
    assert len(list(cache.glob("*.ids"))) == 3
    assert isinstance(sentences.train, np.memmap)


def test_an_interrupted_cache_write_leaves_nothing_trusted(tmp_path, monkeypatch):
    """An exception raised part-way through the examples publishes no entry and leaves
    no partial file; the next load writes the whole entry, with the right ids."""
    from mos_jax import data, tfds_corpus
    monkeypatch.setattr(data, "_BLOCK_TOKENS", 5)
    src = _write_corpus(tmp_path / "src", {"train.txt": _many_lines(3, 60),
                                           "valid.txt": _many_lines(4, 10),
                                           "test.txt": _many_lines(5, 10)})
    data_dir, cache = tmp_path / "tfds", tmp_path / "cache"
    prepare_builder("mos_jax_ptb", src, data_dir)
    real = tfds_corpus._iter_lines

    def broken(builder, split, feature):
        for i, line in enumerate(real(builder, split, feature)):
            if split == "validation" and i == 4:
                raise RuntimeError("the disk went away")
            yield line

    monkeypatch.setattr(tfds_corpus, "_iter_lines", broken)
    with pytest.raises(RuntimeError, match="went away"):
        load_tfds_corpus("mos_jax_ptb", data_dir=data_dir, order="frequency",
                         cache_dir=cache)
    assert list(cache.iterdir()) == []  # no entry, no .part directory
    monkeypatch.setattr(tfds_corpus, "_iter_lines", real)
    got = load_tfds_corpus("mos_jax_ptb", data_dir=data_dir, order="frequency",
                           cache_dir=cache)
    _assert_same_corpus(got, data.order_vocab(read_corpus(src, cache=False),
                                              "frequency"))
    assert isinstance(got.train, np.memmap)


@pytest.mark.parametrize("corpus, sizes, vocab_size", [
    ("ptb", (929_589, 73_760, 82_430), 10_000),
    ("wikitext-2", (2_088_628, 217_646, 245_569), 33_278),
])
def test_real_corpus(tmp_path, corpus, sizes, vocab_size):
    src = SHARED_DATA / corpus
    if not all((src / f"{s}.txt").is_file() for s in SPLITS):
        pytest.skip(f"{corpus} not found in {src}")
    name = {"ptb": "mos_jax_ptb", "wikitext-2": "mos_jax_wikitext2"}[corpus]
    got = load_tfds_corpus(name, data_dir=tmp_path / "tfds", manual_dir=src)
    assert tuple(len(got.split(s)) for s in SPLITS) == sizes
    assert got.vocab_size == vocab_size
    _assert_same_corpus(got, read_corpus(src, cache=False))


# --------------------------------------------------------------------------------------
# Any prepared TFDS dataset with a text feature.

class _TinyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A small in-memory dataset: EXAMPLES maps split -> list of feature dicts."""

    VERSION = tfds.core.Version("0.1.0")
    FEATURES: dict = {}
    EXAMPLES: dict[str, list[dict]] = {}
    url_infos = None  # downloads nothing (see mos_jax.tfds_corpus._LineCorpus)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(self.FEATURES))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(rows) for split, rows in self.EXAMPLES.items()}

    def _generate_examples(self, rows):
        for i, row in enumerate(rows):
            yield i, row


class MosJaxTestSentences(_TinyBuilder):
    """A text feature, a non-text feature, splits train/validation/test (shuffled)."""

    FEATURES = {"sentence": tfds.features.Text(),
                "label": tfds.features.Scalar(dtype=np.int64)}
    EXAMPLES = {
        "train": [{"sentence": "a b", "label": 0}, {"sentence": "c", "label": 1}],
        "validation": [{"sentence": "b ä", "label": 0}],
        "test": [{"sentence": "a", "label": 1}],
    }


class MosJaxTestTwoTexts(_TinyBuilder):
    """Two text features; the validation split is called `dev`."""

    FEATURES = {"title": tfds.features.Text(), "body": tfds.features.Text()}
    EXAMPLES = {s: [{"title": f"{s} title", "body": f"{s} body"}]
                for s in ("train", "dev", "test")}


class MosJaxTestNoValidation(_TinyBuilder):
    FEATURES = {"text": tfds.features.Text()}
    EXAMPLES = {s: [{"text": f"{s} words"}] for s in ("train", "test")}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    for cls in (MosJaxTestSentences, MosJaxTestTwoTexts, MosJaxTestNoValidation):
        cls(data_dir=os.fspath(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_any_dataset_by_name_and_feature(prepared_dir):
    corpus = load_tfds_corpus("mos_jax_test_sentences:sentence", data_dir=prepared_dir)
    assert corpus.name == "tfds:mos_jax_test_sentences:sentence"
    # Examples of a shuffled dataset come back in TFDS's stored order: compare as sets.
    assert sorted(" ".join(corpus.decode(corpus.train)).split("<eos>")) == \
        sorted(["a b ", " c ", ""])
    assert corpus.decode(corpus.valid) == ["b", "ä", "<eos>"]
    assert corpus.decode(corpus.test) == ["a", "<eos>"]
    # The only Text feature is chosen when none is named.
    auto = load_tfds_corpus("mos_jax_test_sentences", data_dir=prepared_dir)
    _assert_same_corpus(auto, corpus)
    same = load_tfds_corpus("mos_jax_test_sentences", data_dir=prepared_dir,
                            feature="sentence")
    _assert_same_corpus(same, corpus)


def test_any_dataset_feature_errors(prepared_dir):
    with pytest.raises(DataError, match=r"no feature 'words'.*label, sentence|"
                                        r"no feature 'words'.*sentence, label"):
        load_tfds_corpus("mos_jax_test_sentences:words", data_dir=prepared_dir)
    with pytest.raises(DataError, match="'label' .* is not text"):
        load_tfds_corpus("mos_jax_test_sentences:label", data_dir=prepared_dir)
    with pytest.raises(DataError, match="2 text features .*title.*body.*tfds:NAME:FEATURE"):
        load_tfds_corpus("mos_jax_test_two_texts", data_dir=prepared_dir)
    with pytest.raises(DataError, match="two features given"):
        load_tfds_corpus("mos_jax_test_two_texts:title", data_dir=prepared_dir,
                         feature="body")


def test_any_dataset_split_names(prepared_dir):
    corpus = load_tfds_corpus("mos_jax_test_two_texts:body", data_dir=prepared_dir)
    assert corpus.decode(corpus.valid) == ["dev", "body", "<eos>"]
    with pytest.raises(DataError, match="no valid split .*its splits are train, test"):
        load_tfds_corpus("mos_jax_test_no_validation", data_dir=prepared_dir)


def test_spec_with_version(prepared_dir):
    corpus = load_tfds_corpus("mos_jax_test_sentences:0.1.0:sentence",
                              data_dir=prepared_dir)
    assert corpus.decode(corpus.test) == ["a", "<eos>"]
    assert load_tfds_corpus("mos_jax_test_sentences:0.1.0",
                            data_dir=prepared_dir).vocab == corpus.vocab


# --------------------------------------------------------------------------------------
# Errors.

def test_manual_dir_missing_file(tmp_path):
    src = _write_corpus(tmp_path / "src")
    (src / "valid.txt").unlink()
    with pytest.raises(DataError, match=r"has no valid\.txt"):
        load_tfds_corpus("mos_jax_ptb", data_dir=tmp_path / "tfds", manual_dir=src)
    assert not list((tmp_path / "tfds").rglob("*.array_record*"))
    with pytest.raises(DataError, match="is not a directory"):
        prepare_builder("mos_jax_ptb", tmp_path / "nowhere", tmp_path / "tfds")


def test_not_prepared_without_manual_dir(tmp_path):
    with pytest.raises(DataError, match="not prepared .* pass manual_dir"):
        load_tfds_corpus("mos_jax_wikitext2", data_dir=tmp_path)


def test_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="unknown TFDS dataset 'mos_jax_pbt'.*mos_jax_ptb"):
        load_tfds_corpus("mos_jax_pbt", data_dir=tmp_path)
    with pytest.raises(DataError, match="no mos_jax builder named 'lm1b'"):
        prepare_builder("lm1b", tmp_path, tmp_path)


def test_catalogue_dataset_not_prepared(tmp_path):
    # A registered TFDS dataset is never downloaded here: the error says how to prepare it.
    with pytest.raises(DataError, match="lm1b.* is not prepared .*--file_format array_record"):
        load_tfds_corpus("lm1b:text", data_dir=tmp_path)
    with pytest.raises(DataError, match="manual_dir is only used by"):
        load_tfds_corpus("lm1b", data_dir=tmp_path, manual_dir=tmp_path)


def test_tfrecord_dataset_is_refused(tmp_path):
    # Writing TFRecord needs TensorFlow, so relabel an ArrayRecord dataset as TFRecord:
    # it is refused before any record is read.
    builder = MosJaxTestSentences(data_dir=os.fspath(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    info_file = Path(builder.data_dir) / "dataset_info.json"
    info = json.loads(info_file.read_text())
    assert info["fileFormat"] == "array_record"
    info_file.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    with pytest.raises(DataError, match="stored as tfrecord.*--file_format array_record"):
        load_tfds_corpus("mos_jax_test_sentences", data_dir=tmp_path)


# --------------------------------------------------------------------------------------
# Imports: tensorflow_datasets only on the TFDS path, TensorFlow never.

def _run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (os.fspath(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_data_module_does_not_import_tfds():
    out = _run_python("""
        import sys
        import mos_jax.data
        print(sorted(m for m in sys.modules
                     if m.split(".")[0] in ("tensorflow_datasets", "tensorflow")))
    """)
    assert out.splitlines()[-1] == "[]"


def test_loading_does_not_import_tensorflow(tmp_path):
    src = _write_corpus(tmp_path / "src")
    out = _run_python(f"""
        import sys
        from mos_jax.sources import load_corpus
        c = load_corpus("tfds:mos_jax_ptb", data_dir={os.fspath(tmp_path / 'tfds')!r},
                        manual_dir={os.fspath(src)!r})
        print(c.vocab_size, "tensorflow_datasets" in sys.modules,
              "tensorflow" in sys.modules)
    """)
    # TFDS logs its progress to stdout; the last line is ours.
    assert out.splitlines()[-1].split() == [
        str(read_corpus(src, cache=False).vocab_size), "True", "False"]


@pytest.mark.parametrize("source", ["tfds:", "tfds:Bad-Name!", "tfds:a b"])
def test_a_malformed_tfds_source_is_refused_in_one_line(source, tmp_path):
    """No dataset name, or one TFDS cannot parse: a one-line DataError (TFDS's own
    ValueError, a page of usage, reached the command as a traceback)."""
    with pytest.raises(DataError) as e:
        load_corpus(source, data_dir=tmp_path)
    assert "\n" not in str(e.value) and "tfds:NAME" in str(e.value), str(e.value)
