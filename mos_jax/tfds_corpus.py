"""Corpora from TensorFlow Datasets (TFDS), read without TensorFlow.

Two builders are registered when this module is imported, under names that TFDS's own
catalogue does not use:

- `mos_jax_ptb`: Penn Treebank (Mikolov's preprocessed version);
- `mos_jax_wikitext2`: WikiText-2;
- `mos_jax_wikitext103`: WikiText-103;
- `mos_jax_lm1b`: the One Billion Word benchmark (one sentence per line).

Each takes `train.txt`, `valid.txt` and `test.txt` from a `manual_dir` (the files
exactly as the corpora ship them, or as `mos-jax download` unpacks them from their
archives; the files are read a line at a time), store one example per
line with a single `text` feature, and write the splits `train`, `validation` and `test`
as ArrayRecord files with shuffling disabled, so that reading back yields the lines in
file order. Blank lines are kept: each still ends in an `<eos>` token.

Any other prepared TFDS dataset with a text feature (lm1b, say) can be loaded by name.
Splits are read with `builder.as_data_source`, which needs a random-access file format
(ArrayRecord or Parquet) but not TensorFlow.

`mos_jax.sources.load_corpus` imports this module (and so `tensorflow_datasets`) only
for a source `tfds:NAME[:FEATURE]`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds

from mos_jax.data import (CACHE_SUFFIX, SPLITS, Corpus, build_corpus, check_order,
                          default_cache_dir, files_digest, iter_lines, load_cache_entry,
                          order_vocab, sha256_files, stream_word_cache, word_runs)
from mos_jax.errors import DataError

FILE_FORMAT = "array_record"
# Our split name -> TFDS split names to try, in order.
_SPLIT_CANDIDATES = {
    "train": ("train",),
    "valid": ("validation", "valid", "dev"),
    "test": ("test",),
}
# The manual-dir file of each TFDS split written by the line builders.
_SOURCE_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
_DIGEST_KEY = "source_sha256"
_VERSION_RE = re.compile(r"\d+\.(\d+|\*)\.(\d+|\*)")
_READ_CHUNK = 8192


def _source_digest(manual_dir: Path) -> str:
    """SHA-256 over the three source files, in split order."""
    return sha256_files([manual_dir / f for f in _SOURCE_FILES.values()], separator=b"\0")


def _check_manual_dir(name: str, manual_dir: Path) -> None:
    if not manual_dir.is_dir():
        raise DataError(
            f"manual_dir {manual_dir} for {name} is not a directory: pass the directory "
            f"that holds {', '.join(_SOURCE_FILES.values())} (fetch one with "
            "`mos-jax download`)")
    missing = [f for f in _SOURCE_FILES.values() if not (manual_dir / f).is_file()]
    if missing:
        raise DataError(
            f"manual_dir {manual_dir} for {name} has no {', '.join(missing)}: it must hold "
            f"{', '.join(_SOURCE_FILES.values())}, the corpus files as distributed")


class _LineCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A language-modelling corpus of three text files, one example per line.

    Example keys are line indices, so with shuffling disabled the stored order is the
    file order. Lines are stored verbatim (a blank line or a single space included);
    the SHA-256 of the source files is kept in `info.metadata` to detect a prepared
    dataset that came from other files.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the corpus files train.txt, valid.txt and test.txt (unchanged) into the "
        "manual directory, e.g. as fetched by `mos-jax download`.")
    DESCRIPTION = ""
    HOMEPAGE = ""
    # Nothing is downloaded, so there are no URL checksums to look up. Looking them up
    # would import `importlib_resources`, which TFDS 4.9.10 uses for any builder defined
    # in a package but declares only for Python < 3.9 (tensorflow/datasets#11212).
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            homepage=self.HOMEPAGE,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        manual_dir = Path(dl_manager.manual_dir)
        _check_manual_dir(self.name, manual_dir)
        self.info.metadata[_DIGEST_KEY] = _source_digest(manual_dir)
        return {split: self._generate_examples(manual_dir / fname)
                for split, fname in _SOURCE_FILES.items()}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict[str, str]]]:
        # The same notion of a line as `mos_jax.data.read_corpus`, a line at a time.
        for i, line in enumerate(iter_lines(path)):
            yield i, {"text": line}


class MosJaxPtb(_LineCorpus):
    """Penn Treebank as preprocessed by Mikolov et al. (10k words), one line per example."""

    name = "mos_jax_ptb"
    DESCRIPTION = ("The Penn Treebank language-modelling corpus (Mikolov's 10k-word "
                   "version), one sentence per example, in file order.")
    HOMEPAGE = "https://www.fit.vutbr.cz/~imikolov/rnnlm/"


class MosJaxWikitext2(_LineCorpus):
    """WikiText-2 (tokenised, v1), one line of the files per example."""

    name = "mos_jax_wikitext2"
    DESCRIPTION = ("The WikiText-2 language-modelling corpus (tokenised version), one "
                   "line of the files per example, in file order; blank lines kept.")
    HOMEPAGE = ("https://www.salesforce.com/blog/"
                "the-wikitext-long-term-dependency-language-modeling-dataset/")


class MosJaxWikitext103(_LineCorpus):
    """WikiText-103 (tokenised, v1), one line of the files per example."""

    name = "mos_jax_wikitext103"
    DESCRIPTION = ("The WikiText-103 language-modelling corpus (tokenised version, "
                   "wiki.*.tokens of wikitext-103-v1.zip), one line of the files per "
                   "example, in file order; blank lines kept.")
    HOMEPAGE = MosJaxWikitext2.HOMEPAGE


class MosJaxLm1b(_LineCorpus):
    """The One Billion Word benchmark, one sentence per example, as `mos-jax download
    lm1b` lays it out (train: the 99 training shards; valid: heldout shard 1; test:
    heldout shard 0)."""

    name = "mos_jax_lm1b"
    DESCRIPTION = ("The One Billion Word language-modelling benchmark (r13output), one "
                   "sentence per example in file order: train the 99 training shards, "
                   "validation heldout shard 1, test heldout shard 0.")
    HOMEPAGE = "https://www.statmt.org/lm-benchmark/"


BUILDERS: dict[str, type[_LineCorpus]] = {
    b.name: b for b in (MosJaxPtb, MosJaxWikitext2, MosJaxWikitext103, MosJaxLm1b)}


def _parse_spec(spec: str) -> tuple[str, str | None]:
    """`NAME[:FEATURE]` -> (name, feature); NAME may carry a TFDS `:VERSION`."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and not _VERSION_RE.fullmatch(tail):
        return head, tail
    return spec, None


def _base_name(name: str) -> str:
    """The dataset name without `/config` and `:version`."""
    return name.split(":", 1)[0].split("/", 1)[0]


def _make_builder(name: str, data_dir: str | os.PathLike | None, **kwargs):
    if not name:
        raise DataError("a TFDS source names its dataset: tfds:NAME[:FEATURE] (e.g. "
                        f"tfds:{next(iter(BUILDERS))}, tfds:lm1b:text)")
    try:
        return tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir),
                            **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        where = f"in {data_dir}" if data_dir is not None else "in the default data_dir"
        known = sorted({*BUILDERS, *tfds.list_builders(with_community_datasets=False)})
        close = difflib.get_close_matches(_base_name(name), known, n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise DataError(
            f"unknown TFDS dataset {name!r}: it is neither registered nor prepared {where}."
            f"{hint} Use {' or '.join(BUILDERS)} (with manual_dir), the name of a TFDS "
            "dataset, or pass the data_dir where it was prepared.") from None
    except ValueError as e:  # a name TFDS cannot parse (its message: a page of usage)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"tfds:{name}: TFDS refused it ({first}): use "
                        "tfds:NAME[:FEATURE], NAME as dataset[/config][:version]") from None


def prepare_builder(name: str, manual_dir: str | os.PathLike,
                    data_dir: str | os.PathLike | None = None):
    """Prepare one of this module's builders from the files in `manual_dir`.

    Args:
      name: one of `BUILDERS` (`mos_jax_ptb`, `mos_jax_wikitext2`,
        `mos_jax_wikitext103`, `mos_jax_lm1b`).
      manual_dir: a directory with `train.txt`, `valid.txt` and `test.txt`.
      data_dir: the TFDS data directory (default: TFDS's, `$TFDS_DATA_DIR` or
        `~/tensorflow_datasets`).

    Returns:
      The prepared `tfds.core.DatasetBuilder`, stored as ArrayRecord. A dataset already
      prepared under `data_dir` is reused if it came from files with the same contents;
      otherwise a DataError says how to start afresh.
    """
    if _base_name(name) not in BUILDERS:
        raise DataError(
            f"no mos_jax builder named {name!r}: choose one of {', '.join(BUILDERS)}")
    manual_dir = Path(manual_dir)
    _check_manual_dir(name, manual_dir)
    builder = _make_builder(name, data_dir)
    if builder.is_prepared():
        stored = (builder.info.metadata or {}).get(_DIGEST_KEY)
        if stored != _source_digest(manual_dir):
            raise DataError(
                f"{name} in {builder.data_dir} was prepared from files other than those "
                f"in {manual_dir}: use another data_dir, or delete {builder.data_dir} to "
                "prepare it again")
        return builder
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)),
        file_format=FILE_FORMAT,
    )
    return builder


def _pick_split(builder, ours: str) -> str:
    found = list(builder.info.splits)
    for candidate in _SPLIT_CANDIDATES[ours]:
        if candidate in found:
            return candidate
    raise DataError(
        f"TFDS dataset {builder.info.full_name} has no {ours} split (looked for "
        f"{', '.join(_SPLIT_CANDIDATES[ours])}); its splits are {', '.join(found)}. "
        "A language-model corpus needs train, validation and test splits.")


def _pick_feature(builder, feature: str | None) -> str:
    features = builder.info.features
    names = list(features.keys())
    if feature is not None:
        if feature not in features:
            raise DataError(
                f"TFDS dataset {builder.info.full_name} has no feature {feature!r}; its "
                f"features are {', '.join(names)}. Write tfds:NAME:FEATURE with one "
                "of them.")
        return feature
    text = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
    if len(text) == 1:
        return text[0]
    raise DataError(
        f"TFDS dataset {builder.info.full_name} has {len(text) or 'no'} text features "
        f"({', '.join(text) or 'none'}) among {', '.join(names)}: name the one to use, "
        "as tfds:NAME:FEATURE.")


def _as_line(value: Any, name: str, feature: str) -> str:
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(
                f"feature {feature!r} of {name} holds bytes that are not UTF-8 text: "
                "choose a text feature") from None
    if isinstance(value, str):
        return value
    raise DataError(
        f"feature {feature!r} of {name} is not text (got {type(value).__name__}): "
        "choose a text feature as tfds:NAME:FEATURE")


def _iter_lines(builder, split: str, feature: str) -> Iterator[str]:
    """The text of `feature` in each example of `split`, in stored order, read a batch
    of examples at a time."""
    source = builder.as_data_source(split=split)
    name = builder.info.full_name
    # Batched reads: ArrayRecord fetches the records of a batch in parallel.
    for start in range(0, len(source), _READ_CHUNK):
        keys = range(start, min(start + _READ_CHUNK, len(source)))
        for ex in source.__getitems__(keys):
            yield _as_line(ex[feature], name, feature)


def _read_lines(builder, split: str, feature: str) -> list[str]:
    return list(_iter_lines(builder, split, feature))


def _cache_path(builder, splits: dict[str, str], feature: str, order: str,
                cache_dir: str | os.PathLike | None) -> Path | None:
    """The id cache entry of a dataset's text (None: its data_dir is not a local
    directory, read into memory as before): keyed by the dataset's full name
    (name/config/version), the TFDS split of each of ours, the feature, the files
    the dataset is stored in (names and contents), and the vocabulary order."""
    root = Path(os.fspath(builder.data_dir))
    if not root.is_dir():
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file())
    label = json.dumps({"source": "tfds", "dataset": builder.info.full_name,
                        "splits": splits, "feature": feature,
                        "files": [p.relative_to(root).as_posix() for p in files]},
                       sort_keys=True, ensure_ascii=False)
    stem = f"{files_digest(files, label)}-tfds"
    if order != "first":
        stem += f"-{order}"
    return Path(cache_dir or default_cache_dir()) / f"{stem}{CACHE_SUFFIX}"


def _open_for_reading(builder) -> None:
    """Check that the dataset can be read without TensorFlow, else say how to fix it."""
    name = builder.info.full_name
    if not builder.is_prepared():
        raise DataError(
            f"TFDS dataset {name} is not prepared in {builder.data_dir_root}: prepare it "
            f"there as ArrayRecord first, e.g. `tfds build {builder.name} --data_dir "
            f"{builder.data_dir_root} --file_format {FILE_FORMAT}`, or pass the data_dir "
            "where it was prepared")
    formats = builder.info.available_file_formats()
    readable = formats & set(tfds.core.file_adapters.FileFormat.with_random_access())
    if not readable:
        shown = ", ".join(f.value for f in formats) or "unknown"
        raise DataError(
            f"TFDS dataset {name} in {builder.data_dir} is stored as {shown}, which "
            "cannot be read without TensorFlow: prepare it again with "
            f"`--file_format {FILE_FORMAT}` into another data_dir")


def load_tfds_corpus(spec: str, *, data_dir: str | os.PathLike | None = None,
                     manual_dir: str | os.PathLike | None = None,
                     vocab: Sequence[str] | None = None,
                     feature: str | None = None, order: str = "first",
                     cache: bool = True,
                     cache_dir: str | os.PathLike | None = None) -> Corpus:
    """A corpus from a TFDS text dataset.

    Args:
      spec: `NAME` or `NAME:FEATURE`, e.g. `mos_jax_ptb`, `lm1b:text`. NAME may carry
        a TFDS config and version (`name/config:1.0.0`).
      data_dir: the TFDS data directory (default: TFDS's).
      manual_dir: for the builders of `BUILDERS`, the directory with
        `train.txt`, `valid.txt`, `test.txt`; the dataset is prepared from it unless
        already prepared in `data_dir`. Other datasets must already be prepared (as
        ArrayRecord or Parquet); nothing is downloaded.
      vocab: a fixed vocabulary, as for `mos_jax.data.build_corpus`.
      feature: the text feature to read; also settable as `NAME:FEATURE`. Default: the
        dataset's only `Text` feature.
      order: the vocabulary order, one of `mos_jax.data.ORDERS` (`first` with a fixed
        `vocab`, which keeps its ids).
      cache, cache_dir: as for `mos_jax.data.read_corpus`: the ids are written a block
        of examples at a time into the id cache (default
        `mos_jax.data.default_cache_dir()`) and the splits opened memory-mapped, so a
        second load reads neither the dataset nor tokenises. A fixed `vocab` bypasses
        the cache.

    Returns:
      The corpus named `tfds:SPEC`: train from split `train`, valid from `validation`
      (or `valid`, `dev`), test from `test`, one line per example.
    """
    name, spec_feature = _parse_spec(spec)
    if feature is not None and spec_feature is not None and feature != spec_feature:
        raise DataError(
            f"two features given for {name}: {spec_feature!r} in {spec!r} and "
            f"feature={feature!r}; give one")
    feature = feature if feature is not None else spec_feature
    if _base_name(name) in BUILDERS:
        if manual_dir is not None:
            builder = prepare_builder(name, manual_dir, data_dir)
        else:
            builder = _make_builder(name, data_dir)
            if not builder.is_prepared():
                raise DataError(
                    f"{name} is not prepared in {builder.data_dir_root}: pass manual_dir, "
                    "a directory with train.txt, valid.txt and test.txt, to prepare it")
    elif manual_dir is not None:
        raise DataError(
            f"manual_dir is only used by {' and '.join(BUILDERS)}; {name} must already be "
            "prepared in data_dir")
    else:
        builder = _make_builder(name, data_dir)
    _open_for_reading(builder)
    splits = {ours: _pick_split(builder, ours) for ours in SPLITS}
    feature = _pick_feature(builder, feature)
    check_order(order, vocab)
    label = f"tfds:{spec}"
    path = (_cache_path(builder, splits, feature, order, cache_dir)
            if cache and vocab is None else None)
    if path is not None:
        cached = load_cache_entry(path, label)
        if cached is not None:
            return cached
        try:  # streamed into the cache, a block of examples at a time
            stream_word_cache(
                [(word_runs(_iter_lines(builder, split, feature)),
                  f"the {ours} split of {label} is empty: it holds no words")
                 for ours, split in splits.items()], path, order)
        except OSError as e:
            warnings.warn(f"could not write the corpus cache {path}: {e}; reading the "
                          "corpus into memory")
        else:
            cached = load_cache_entry(path, label)
            if cached is not None:
                return cached
    lines = {ours: _read_lines(builder, split, feature) for ours, split in splits.items()}
    return order_vocab(build_corpus(lines, name=label, vocab=vocab), order)
