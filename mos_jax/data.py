"""Corpora: vocabulary, reading a corpus directory, the id cache, the synthetic corpus.

Conventions follow docs/reference.md section 1: each line is split on whitespace and `<eos>` is
appended (a blank line yields just `<eos>`); one vocabulary for all splits, ids in order
of first occurrence scanning train, then valid, then test.

Other corpus sources live beside this module and return the same `Corpus`:
`mos_jax.download` (public mirrors) and `mos_jax.tfds_corpus` (TensorFlow Datasets);
`mos_jax.sources.load_corpus` dispatches on a source string.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from mos_jax.errors import DataError

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
# Bumped whenever the ids or the tokenisation change (it keys the cache; the container,
# `.npz` until the memory-mapped `.ids` directories, is told by the entry's suffix).
_CACHE_FORMAT = "mos-jax-ids-v1"
_SUBWORD_CACHE = "s1"  # the layout of subword caches (tokenizer JSON, word counts)


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenised corpus: the vocabulary and one int32 id stream per split.

    Attributes:
      name: a label for logs (the directory, TFDS name or "synthetic").
      vocab: id -> word, a tuple of length V.
      train, valid, test: int32 arrays of token ids, `<eos>` included (read-only
        memory-mapped arrays when read from the id cache).
      entropy_rate: for synthetic corpora, the true entropy rate in nats per token (the
        log of the best achievable perplexity); None for natural text.
      subwords: the subword tokenizer (`mos_jax.subword.Subwords`) whose pieces `vocab`
        holds; None for a word-level corpus.
      words: words per split (train, valid, test) as the word tokenizer counts them
        (whitespace tokens + `<eos>`), for perplexity per word; None: the ids are words.
    """

    name: str
    vocab: tuple[str, ...]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    entropy_rate: float | None = None
    subwords: object | None = None
    words: tuple[int, int, int] | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @functools.cached_property
    def word_to_id(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.vocab)}

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}: choose one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def words_in(self, split: str) -> int:
        """Words of `split` as the word tokenizer counts them (its ids, when word-level)."""
        if self.words is None:
            return len(self.split(split))
        return int(self.words[SPLITS.index(split)])

    def encode(self, words: str | Sequence[str], what: str = "word") -> np.ndarray:
        """int32 ids of `words` (a sequence of words, or a string split on whitespace).

        Words not in the vocabulary raise one DataError that names them (in order of
        first appearance) and gives examples of the corpus's words; `what` names the
        words in it ("prompt word": "prompt word(s) not in ...").
        """
        words = words.split() if isinstance(words, str) else list(words)
        w2i = self.word_to_id
        unknown = sorted({w for w in words if w not in w2i}, key=words.index)
        if unknown:
            hint = ("rare words are spelled <unk> and numbers N in PTB; " if "<unk>" in w2i
                    else "")
            raise DataError(
                f"{what}(s) not in the {self.vocab_size:,}-word vocabulary of {self.name}: "
                f"{_preview(unknown)}. Use words of the corpus ({hint}e.g. "
                f"{', '.join(repr(w) for w in self.vocab[:5])}).")
        return np.asarray([w2i[w] for w in words], dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The words of `ids`."""
        return [self.vocab[int(i)] for i in ids]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.split(s)):,}" for s in SPLITS)
        return f"Corpus({self.name!r}, V={self.vocab_size:,}, {sizes})"


def _preview(words: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(w) for w in words[:limit])
    return shown + (f", ... ({len(words) - limit} more)" if len(words) > limit else "")


def tokenize_lines(lines: Iterable[str]) -> list[str]:
    """Whitespace tokens of every line, each line followed by `<eos>`."""
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


def build_corpus(splits: Mapping[str, Iterable[str]], name: str,
                 vocab: Sequence[str] | None = None) -> Corpus:
    """Tokenise the lines of each split and encode them.

    Args:
      splits: split name -> iterable of text lines, for all of train, valid, test.
      name: label of the corpus, used in messages.
      vocab: a fixed vocabulary (id -> word). When None, it is built from the data in
        order of first occurrence over train, valid, test. When given, a word outside it
        is an error that names the word and the split.
    """
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise DataError(f"corpus {name} has no {', '.join(missing)} split")
    tokens = {s: tokenize_lines(splits[s]) for s in SPLITS}
    for s in SPLITS:
        if all(t == EOS for t in tokens[s]):
            raise DataError(f"the {s} split of {name} is empty: it holds no words")
    if vocab is None:
        w2i: dict[str, int] = {}
        for s in SPLITS:
            for t in tokens[s]:
                if t not in w2i:
                    w2i[t] = len(w2i)
        vocab_t = tuple(w2i)
    else:
        vocab_t = tuple(vocab)
        w2i = {w: i for i, w in enumerate(vocab_t)}
        if len(w2i) != len(vocab_t):
            raise DataError("the fixed vocabulary lists a word twice")
        for s in SPLITS:
            unknown = sorted({t for t in tokens[s] if t not in w2i})
            if unknown:
                raise DataError(
                    f"the {s} split of {name} has {len(unknown)} word(s) outside the "
                    f"fixed {len(vocab_t):,}-word vocabulary: {_preview(unknown)}. "
                    "Map them to a word of the vocabulary (e.g. <unk>) or build the "
                    "vocabulary from this corpus (vocab=None).")
    ids = {s: np.fromiter((w2i[t] for t in tokens[s]), dtype=np.int32,
                          count=len(tokens[s])) for s in SPLITS}
    return Corpus(name=name, vocab=vocab_t, **ids)


# How to name a corpus directory: training takes it as a config key, the commands that
# load a model's weights as --data.
_GIVE_CORPUS = ("pass a directory holding train.txt, valid.txt and test.txt with "
                "--config.data.dir DIR (evaluate, rank, generate: --data DIR), or fetch "
                "one with `mos-jax download NAME --dest DIR` (NAME: ptb, wikitext-2, "
                "wikitext-103, lm1b); `mos-jax sources` lists the other sources")


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, split on '\\n' only, as the reference reads them.

    Missing, empty and non-UTF-8 files raise a DataError that says how to fix them.
    """
    if not path.is_file():
        raise DataError(
            f"missing corpus file {path}: {_GIVE_CORPUS}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, 0, raw[:e.start].count(b"\n") + 1, raw, e) from None
    if not text.strip():
        raise DataError(f"{path} is empty: it holds no words")
    # splitlines would also break on \x0b, \x1c.. and \u2028; the reference reads lines
    # on '\n' only, so do the same (a trailing newline ends the last line).
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


# --------------------------------------------------------------------------------------
# A run's vocabulary: recorded with its weights, and the words of any other text mapped
# through it by string (never by id: ids follow first occurrence in a corpus's training
# text, so the same words get other ids in another copy of a corpus).

UNK = "<unk>"
VOCAB_FILE = "vocab.json"
_VOCAB_FORMAT = "mos-jax-vocab-v1"


def vocab_digest(vocab: Sequence[str]) -> str:
    """Hex SHA-256 of the word list (in id order): equal digests, equal ids."""
    return hashlib.sha256(json.dumps(list(vocab), ensure_ascii=False).encode()).hexdigest()


def save_vocab(directory: str | os.PathLike, vocab: Sequence[str]) -> Path:
    """Write `directory/vocab.json`: the words in id order, their count and digest."""
    path = Path(directory) / VOCAB_FILE
    atomic_write_bytes(path, json.dumps(
        {"format": _VOCAB_FORMAT, "size": len(vocab), "sha256": vocab_digest(vocab),
         "words": list(vocab)}, ensure_ascii=False).encode())
    return path


def load_vocab(directory: str | os.PathLike) -> tuple[str, ...] | None:
    """The vocabulary recorded in `directory/vocab.json` (None when there is none: a
    run from before vocabularies were recorded). A file whose words do not match its
    digest is refused."""
    path = Path(directory) / VOCAB_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        words = tuple(record["words"])
        digest = record["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is damaged ({type(e).__name__}: {e}): the run's "
                        "vocabulary cannot be read") from None
    if vocab_digest(words) != digest or len(words) != record.get("size", len(words)):
        raise DataError(f"{path} is damaged: its words do not match its digest")
    return words


def save_subwords(directory: str | os.PathLike, subwords) -> None:
    """Record a run's subword tokenizer in `directory/tokenizer.json` (beside its
    vocab.json); a word-level run (`subwords` None) keeps none there."""
    from mos_jax.subword import TOKENIZER_FILE
    path = Path(directory) / TOKENIZER_FILE
    if subwords is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_bytes(path, subwords.to_json().encode())


def load_subwords(directory: str | os.PathLike):
    """The subword tokenizer a run in `directory` records (`mos_jax.subword.Subwords`),
    or None: a word-level run."""
    from mos_jax.subword import TOKENIZER_FILE, Subwords
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        return None
    return Subwords.from_json(path.read_text(encoding="utf-8"), str(path))


@dataclasses.dataclass(frozen=True)
class Unknown:
    """Tokens of a text that a vocabulary lacks: `tokens` of `total`, the distinct
    `words` in order of first appearance."""

    what: str
    tokens: int
    total: int
    words: tuple[str, ...]
    split: str | None = None  # the corpus split, if the text is one

    def describe(self, vocab: Sequence[str], fate: str) -> str:
        plural = "s" if len(self.words) != 1 else ""
        return (f"{self.tokens:,} of {self.total:,} tokens of {self.what} "
                f"({len(self.words):,} distinct word{plural}) are not in the run's "
                f"{len(vocab):,}-word vocabulary and {fate}: {_preview(self.words)}")


def _unknown_words(words: Sequence[str], missing_ids: np.ndarray) -> tuple[str, ...]:
    """Distinct words of `missing_ids` (ids into `words`) in order of first appearance."""
    unique, first = np.unique(missing_ids, return_index=True)
    return tuple(words[int(i)] for i in unique[np.argsort(first)])


def _map_ids(ids: np.ndarray, words: Sequence[str], vocab: Sequence[str], what: str,
             split: str | None = None) -> tuple[np.ndarray, Unknown | None]:
    """`ids` (into `words`) as ids into `vocab`, mapped by string; words `vocab` lacks
    become `<unk>`, or a DataError when it has none."""
    w2i = {w: i for i, w in enumerate(vocab)}
    table = np.fromiter((w2i.get(w, -1) for w in words), dtype=np.int64, count=len(words))
    mapped = table[ids]
    missing = mapped < 0
    if not missing.any():
        return mapped.astype(np.int32), None
    unknown = Unknown(what, int(missing.sum()), int(ids.size),
                      _unknown_words(words, ids[missing]), split)
    if UNK not in w2i:
        raise DataError(
            unknown.describe(vocab, "the vocabulary has no <unk> to score them as")
            + ". Score text in the run's own words (e.g. its own corpus)")
    if 2 * unknown.tokens > unknown.total:  # a perplexity of mostly <unk> means nothing
        raise DataError(
            unknown.describe(vocab, "would be scored as <unk>: more than half")
            + ". Is it the corpus (or the language) the run was trained on? Score text "
            "in the run's own words")
    return np.where(missing, w2i[UNK], mapped).astype(np.int32), unknown


def map_to_vocab(corpus: Corpus, vocab: Sequence[str], splits: Sequence[str] = SPLITS
                 ) -> tuple[Corpus, list[Unknown]]:
    """`corpus` with its ids mapped by string into `vocab` (a run's vocabulary).

    The splits in `splits` are the ones that will be read: a word `vocab` lacks becomes
    `<unk>` (returned in the list of `Unknown`s, to report), or, when `vocab` has no
    `<unk>`, a DataError that names the words. A split not in `splits` that holds such
    words is left empty. The same vocabulary in the same order returns `corpus` itself.
    """
    vocab = tuple(vocab)
    if corpus.vocab == vocab:
        return corpus, []
    streams, unknown = {}, []
    for s in SPLITS:
        try:
            streams[s], u = _map_ids(corpus.split(s), corpus.vocab, vocab,
                                     f"the {s} split of {corpus.name}", s)
        except DataError:
            if s in splits:
                raise
            streams[s], u = np.zeros(0, np.int32), None
        if u is not None and s in splits:
            unknown.append(u)
    return Corpus(name=corpus.name, vocab=vocab,
                  entropy_rate=None if unknown else corpus.entropy_rate,
                  **streams), unknown


def encode_words(tokens: Sequence[str], vocab: Sequence[str], what: str
                 ) -> tuple[np.ndarray, Unknown | None]:
    """`tokens` as ids into `vocab`, by string; unknown words as in `map_to_vocab`
    (`what` names the tokens in messages)."""
    words = tuple(dict.fromkeys(tokens))
    index = {w: i for i, w in enumerate(words)}
    ids = np.fromiter((index[t] for t in tokens), dtype=np.int64, count=len(tokens))
    return _map_ids(ids, words, vocab, what)


def encode_text_file(path: str | os.PathLike, vocab: Sequence[str], subwords=None
                     ) -> tuple[np.ndarray, Unknown | None]:
    """The words of a plain text file (lines split on whitespace, `<eos>` after each,
    as a corpus's splits are read) as ids into `vocab`, by string; unknown words as in
    `map_to_vocab`. With `subwords` (a subword run's tokenizer) the lines are encoded
    with it: characters it lacks become `<unk>` pieces, counted in the Unknown (of
    pieces, naming the words that hold them)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--text {path}: no such file; give a UTF-8 text file to score")
    if subwords is not None:
        lines = read_lines(path)
        tokens, total, words = subwords.unknown(lines)
        return (subwords.encode(lines, vocab, str(path)),
                Unknown(str(path), tokens, total, words) if tokens else None)
    return encode_words(tokenize_lines(read_lines(path)), vocab, str(path))


def text_words(path: str | os.PathLike) -> int:
    """Words of a text file as the word tokenizer counts them (tokens + `<eos>`)."""
    return len(tokenize_lines(read_lines(Path(path))))


def default_cache_dir() -> Path:
    """`$MOS_JAX_CACHE`, else `$XDG_CACHE_HOME/mos_jax`, else `~/.cache/mos_jax`."""
    if os.environ.get("MOS_JAX_CACHE"):
        return Path(os.environ["MOS_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mos_jax"


def sha256_files(paths: Sequence[str | os.PathLike], prefix: bytes = b"",
                 separator: bytes = b"", sized: bool = False) -> str:
    """Hex SHA-256 of `prefix`, then of each file's bytes (in order, read in 1 MiB
    chunks) followed by `separator`; `sized`: each file's bytes preceded by their
    length (8 bytes, little-endian), so no byte can move between two files without
    changing the digest. One file with no prefix, separator or size: the digest
    `sha256sum` prints. The one file-hashing helper of the package (the id cache,
    `mos_jax.download`, `mos_jax.tfds_corpus`)."""
    h = hashlib.sha256(prefix)
    for path in paths:
        if sized:
            h.update(os.path.getsize(path).to_bytes(8, "little"))
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(separator)
    return h.hexdigest()


def files_digest(paths: Sequence[Path], label: str = "") -> str:
    """SHA-256 over the cache format, `label` (what else determines the ids, for a
    source other than a text directory) and the contents of `paths` (in order, each
    with its length): the key of an id cache entry."""
    return sha256_files(paths, (_CACHE_FORMAT + label).encode(), sized=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tokenizer_digest(subwords) -> str:
    """SHA-256 of a subword tokenizer's JSON: the one its cached ids were encoded with."""
    return hashlib.sha256(subwords.spec.encode()).hexdigest()


# --------------------------------------------------------------------------------------
# The id cache: one entry per corpus (and tokenizer, and order), a directory
# `<key>.ids/` holding each split's ids as a `.npy` (train.npy, valid.npy, test.npy)
# and `meta.json` (the vocabulary, the word counts of a subword corpus, the tokenizer's
# digest). The splits are opened memory-mapped (`np.load(mmap_mode="r")`): the ids
# are stored once, on disk, and a process reads only the pages it touches (a host's
# own batch columns: `mos_jax.batching.batchify` returns a view). An `.npz` cannot be
# mapped (its members are inside a zip).

CACHE_SUFFIX = ".ids"
_META = "meta.json"
_NPY_HEADER = 128  # bytes of the .npy header IdWriter reserves (magic included)


class IdWriter:
    """Write an int32 id stream to a `.npy` file in chunks, its length unknown ahead.

    The header is written with room for any length and rewritten on `close`, so the
    ids go straight to disk, never all in memory. They go to a temporary file beside
    `path`, renamed to `path` by `close`: an interrupted writer (an exception in its
    `with` block, a killed process) leaves no file at `path` that would read as a
    short or empty stream. `np.load(path, mmap_mode="r")` reads the file back.

        with IdWriter(path) as w:
            for chunk in chunks:
                w.write(chunk)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.count = 0
        self._digest = hashlib.sha256()  # of the ids' bytes (the header excluded)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part",
                                   dir=self.path.parent)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._file.write(self._header(0))

    @staticmethod
    def _header(n: int) -> bytes:
        text = "{'descr': '<i4', 'fortran_order': False, 'shape': (%d,), }" % n
        room = _NPY_HEADER - 10  # magic (6), version (2), header length (2)
        return (b"\x93NUMPY\x01\x00" + room.to_bytes(2, "little")
                + (text.ljust(room - 1) + "\n").encode("latin1"))

    def write(self, ids) -> None:
        chunk = np.ascontiguousarray(ids, dtype="<i4")
        raw = chunk.tobytes()
        self._file.write(raw)
        self._digest.update(raw)
        self.count += int(chunk.size)

    @property
    def sha256(self) -> str:
        """SHA-256 of the ids written so far (the bytes after the header)."""
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.seek(0)
        self._file.write(self._header(self.count))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        """Stop writing and remove what was written."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "IdWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self.discard()
        else:
            self.close()


def open_ids(path: str | os.PathLike) -> np.ndarray:
    """The int32 id stream of a `.npy` file, memory-mapped read-only (`IdWriter`
    writes them; the id cache holds one per split): nothing is read until used."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no id file {path}: give a .npy of int32 token ids (written by "
                        "mos_jax.data.IdWriter, or np.save of an int32 array)")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not a readable .npy file ({e}): write it again") from None
    if ids.dtype != np.int32 or ids.ndim != 1:
        raise DataError(f"{path} holds {ids.dtype} ids of shape {ids.shape}; a stream of "
                        "token ids is 1-D int32: convert it with ids.astype(np.int32)")
    return ids


def _record_digest(record: Mapping) -> str:
    """SHA-256 of an entry's record without its own digest (checked on load, so a
    damaged record cannot give the ids other words, sizes or word counts)."""
    rest = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, ensure_ascii=False)
                          .encode()).hexdigest()


def _meta_record(vocab: Sequence[str], sizes: Mapping[str, int],
                 digests: Mapping[str, str], words=None, subwords=None) -> dict:
    record = {"format": _CACHE_FORMAT, "vocab": list(vocab),
              "sizes": {s: int(sizes[s]) for s in SPLITS},
              "sha256": {s: digests[s] for s in SPLITS}}
    if words is not None:
        record["words"] = [int(w) for w in words]
        record["tokenizer"] = _tokenizer_digest(subwords)
    record["record_sha256"] = _record_digest(record)
    return record


def _publish(tmp: Path, path: Path) -> None:
    """Move the finished entry `tmp` to `path`. An entry already there that another
    process published (the same record, its ids intact) is kept and ours dropped, so
    a process that has just published and is opening its entry never loses it; a
    damaged or stale one (a subword corpus of another tokenizer) is first moved aside,
    then removed. A process that has old files mapped keeps reading them (they are
    unlinked, not overwritten)."""
    import shutil
    ours = _read_meta(tmp)
    for _ in range(3):
        try:
            os.replace(tmp, path)  # where no entry is (or an empty directory)
            return
        except OSError:
            if not path.exists():
                raise
        if ours is not None and _read_meta(path) == ours and _entry_intact(path, ours):
            shutil.rmtree(tmp, ignore_errors=True)  # another process published it
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".stale.part",
                                      dir=path.parent))
        try:
            os.replace(path, aside / "entry")
        except FileNotFoundError:
            pass  # another process moved it
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"could not publish the corpus cache entry {path}: other processes "
                  "kept replacing it")


def _entry_dir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))


@contextlib.contextmanager
def _new_entry(path: Path):
    """A temporary directory beside the cache entry `path`, to write its splits and
    meta into; renamed to `path` when the block completes, removed (nothing published,
    nothing a later load could trust) when it raises or is interrupted."""
    import shutil
    tmp = _entry_dir(path)
    try:
        yield tmp
        _publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_meta(tmp: Path, record: dict) -> None:
    atomic_write_bytes(tmp / _META, json.dumps(record, ensure_ascii=False).encode())


def _save_cache(path: Path, corpus: Corpus) -> None:
    """Write `corpus` (its arrays in memory) as the cache entry `path`."""
    with _new_entry(path) as tmp:
        digests = {}
        for s in SPLITS:
            with IdWriter(tmp / f"{s}.npy") as w:
                w.write(corpus.split(s))
            digests[s] = w.sha256
        _write_meta(tmp, _meta_record(corpus.vocab,
                                      {s: len(corpus.split(s)) for s in SPLITS},
                                      digests, corpus.words, corpus.subwords))


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads((path / _META).read_text(encoding="utf-8"))
        return meta if meta.get("format") == _CACHE_FORMAT else None
    except (OSError, ValueError, AttributeError):
        return None


def _ids_digest(path: Path, offset: int) -> str:
    """SHA-256 of the bytes of `path` from `offset` on (a `.npy`'s ids), read in
    chunks (not mapped: checking a split does not grow the process's memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry_intact(path: Path, meta: dict) -> dict[str, np.ndarray] | None:
    """The splits of the entry at `path`, memory-mapped, if each holds the ids its
    record `meta` describes (size and SHA-256); else None."""
    streams = {}
    try:
        for s in SPLITS:
            ids = open_ids(path / f"{s}.npy")
            if (ids.shape != (meta["sizes"][s],)
                    or _ids_digest(path / f"{s}.npy", ids.offset) != meta["sha256"][s]):
                return None
            streams[s] = ids
    except Exception:  # a damaged entry is never trusted
        return None
    return streams


def _load_cache(path: Path, name: str, subwords=None) -> Corpus | None:
    """The corpus cached at `path`, its splits memory-mapped; or None: damaged (each
    split's ids are checked against the SHA-256 recorded when they were written), or
    (a subword corpus) encoded with another tokenizer than `subwords`, the one cached
    beside it now."""
    meta = _read_meta(path)
    if meta is None:
        return None
    try:
        if meta.get("record_sha256") != _record_digest(meta):
            return None  # a damaged record (or one written before it held the digest)
        words = tuple(int(w) for w in meta["words"]) if "words" in meta else None
        if (words is None) != (subwords is None):
            return None
        if subwords is not None and meta["tokenizer"] != _tokenizer_digest(subwords):
            return None
        streams = _entry_intact(path, meta)
        if not streams:
            return None
        return Corpus(name=name, vocab=tuple(meta["vocab"]), subwords=subwords,
                      words=words, **streams)
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None


def load_cache_entry(path: Path, name: str) -> Corpus | None:
    """The word-level corpus cached at `path` (`stream_word_cache` writes one), its
    splits memory-mapped; None when absent or damaged."""
    return _load_cache(path, name) if path.is_dir() else None


class _FirstSeen(dict):
    """word -> id, a new word getting the next id (first occurrence order)."""

    def __missing__(self, word: str) -> int:
        self[word] = i = len(self)
        return i


_BLOCK_TOKENS = 1 << 20  # tokens encoded (and written) at a time when streaming


def iter_lines(path: str | os.PathLike):
    """The lines of a UTF-8 text file, read one at a time and split on b'\\n' only,
    as `read_lines` reads them (with its errors, found without holding the file; an
    empty file simply has no lines)."""
    path = Path(path)
    if not path.is_file():
        read_lines(path)  # raises the missing-file error
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield (raw[:-1] if raw.endswith(b"\n") else raw).decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, offset, number, raw, e) from None
            offset += len(raw)


def _not_utf8(path: Path, offset: int, number: int, data: bytes,
              e: UnicodeDecodeError) -> DataError:
    """The error for bytes `data` of `path`, read from byte `offset` of line `number`,
    that are not UTF-8 (`e`, from decoding them)."""
    return DataError(f"{path} is not UTF-8 text: byte {offset + e.start} (line {number}) "
                     f"is {data[e.start:e.start + 1]!r}. Convert it first, e.g. "
                     "`iconv -f latin1 -t utf-8`.")


_RUN_BYTES = 1 << 20  # bytes of a line read at a time by `file_word_runs`


def _utf8_boundary(data: bytes) -> int:
    """The length of the longest prefix of `data` that does not end inside a UTF-8
    character (invalid bytes are left for the decoder to report)."""
    for back in range(1, min(4, len(data) + 1)):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back
            continue
        if byte >= 0xC0:  # a lead byte: is its character complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) - back if back < need else len(data)
        return len(data)  # ASCII
    return len(data)


def word_runs(lines: Iterable[str]) -> Iterator[tuple[list[str], bool]]:
    """Each line's words as `stream_word_cache` takes them: `(words, True)`."""
    for line in lines:
        yield line.split(), True


def file_word_runs(path: str | os.PathLike) -> Iterator[tuple[list[str], bool]]:
    """The words of a UTF-8 text file as `read_lines` and `str.split` give them, as
    `(words, ends_line)` runs read `_RUN_BYTES` at a time: a longer line (a corpus
    written as one line, say) comes in several runs, the last with True, so neither
    the line nor its words are ever all in memory. Errors as `iter_lines`'s."""
    path = Path(path)
    if not path.is_file():
        read_lines(path)  # raises the missing-file error
    offset, number, mid_line = 0, 1, False  # where the next read starts; its line
    pending, word = b"", ""  # an unfinished character; an unfinished word
    with open(path, "rb") as f:
        while True:
            raw = f.readline(_RUN_BYTES)
            if not raw and not mid_line:
                return  # the file ended where a line did (or is empty)
            ends = not raw or raw.endswith(b"\n")  # the file's end ends its last line
            data = pending + (raw[:-1] if raw.endswith(b"\n") else raw)
            start = offset - len(pending)
            cut = len(data) if ends else _utf8_boundary(data)
            data, pending = data[:cut], data[cut:]
            try:
                text = word + data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, start, number, data, e) from None
            words = text.split()
            word = words.pop() if not ends and words and not text[-1].isspace() else ""
            offset += len(raw)
            mid_line = not ends
            yield words, ends
            if not raw:
                return
            if ends:
                number += 1


def min_count_mapping(vocab: Sequence[str], counts: np.ndarray, min_count: int
                      ) -> tuple[tuple[str, ...], np.ndarray]:
    """`(new_vocab, mapping)` keeping the words of `vocab` that occur at least
    `min_count` times in training (`counts`, by id): kept words in their order, every
    other word (one only in valid or test included) mapped to `<unk>` (`<eos>` is always
    kept), which keeps its
    place where it is a kept word of the text and is appended otherwise. `mapping`
    [len(vocab)] gives each old id its new one."""
    counts = np.asarray(counts, np.int64)
    keep = counts >= min_count
    if EOS in vocab:  # the line end is structure, never a rare word
        keep[list(vocab).index(EOS)] = True
    kept = np.flatnonzero(keep)
    new_vocab = [vocab[int(i)] for i in kept]
    if UNK in new_vocab:
        unk = new_vocab.index(UNK)
    else:
        unk = len(new_vocab)
        new_vocab.append(UNK)
    mapping = np.full(len(vocab), unk, np.int32)
    mapping[kept] = np.arange(len(kept), dtype=np.int32)
    return tuple(new_vocab), mapping


def apply_min_count(corpus: Corpus, min_count: int) -> Corpus:
    """`corpus` with the words of fewer than `min_count` training occurrences as
    `<unk>` (`min_count_mapping`); 0 or 1: unchanged."""
    if min_count <= 1:
        return corpus
    counts = np.bincount(np.asarray(corpus.train, np.int64), minlength=corpus.vocab_size)
    vocab, mapping = min_count_mapping(corpus.vocab, counts, min_count)
    return dataclasses.replace(corpus, vocab=vocab,
                               **{s: mapping[corpus.split(s)] for s in SPLITS})


def _frequency_ids(counts: np.ndarray, first_at: np.ndarray) -> np.ndarray:
    """old id -> new id numbering the ids by `counts` (descending), ties by `first_at`
    (where each first occurs), then by id: `frequency_permutation`'s order."""
    return _inverse(_frequency_order(counts, first_at))


def _frequency_order(counts: np.ndarray, first_at: np.ndarray) -> np.ndarray:
    """The ids by `counts` (descending), ties by `first_at`, then by id."""
    return np.lexsort((np.arange(len(counts)), first_at, -counts))


def _inverse(perm: np.ndarray) -> np.ndarray:
    """new id -> old id (`perm`) as old id -> new id."""
    new_id = np.empty(len(perm), np.int32)
    new_id[perm] = np.arange(len(perm), dtype=np.int32)
    return new_id


def _finish_splits(tmp: Path, new_id: np.ndarray | None, digests: dict) -> None:
    """Turn each split's `<split>.first.npy` in `tmp` into `<split>.npy`: renumbered
    through `new_id` a block at a time in a second pass over the written file (its
    digest updated), or (None) renamed as it is."""
    for s in SPLITS:
        first_path = tmp / f"{s}.first.npy"
        if new_id is None:
            os.replace(first_path, tmp / f"{s}.npy")
            continue
        first = np.load(first_path, mmap_mode="r")
        with IdWriter(tmp / f"{s}.npy") as out:
            for i in range(0, len(first), _BLOCK_TOKENS):
                out.write(new_id[first[i:i + _BLOCK_TOKENS]])
        digests[s] = out.sha256
        del first
        first_path.unlink()


def stream_word_cache(splits: Sequence[tuple[Iterable[tuple[list[str], bool]], str]],
                      path: Path, order: str = "first", min_count: int = 0) -> None:
    """Tokenise the lines of a word-level corpus a block of words at a time into the
    cache entry `path` (the ids of `build_corpus`, `apply_min_count` and
    `order_vocab`, never all in memory). `splits`: for train, valid and test, the
    split's words as `(words, ends_line)` runs (an iterable read once: `word_runs` of
    its lines, or `file_word_runs` of a file) and the message of the DataError raised
    when they hold no word. Ids in order of first occurrence over train, valid, test; with
    `min_count`, rare words as `<unk>`; for `frequency` order, renumbered by training
    count, ties by first occurrence (for first-seen ids, the smallest id of the words
    a new id gathers), in a second pass over the written files. The entry is published
    only when complete (`_new_entry`). Text directories, TFDS datasets."""
    with _new_entry(path) as tmp:
        w2i = _FirstSeen()
        counts = np.zeros(0, np.int64)
        sizes, digests = {}, {}
        for s, (runs, empty) in zip(SPLITS, splits):
            words_seen = False
            with IdWriter(tmp / f"{s}.first.npy") as out:
                tokens: list[str] = []

                def flush():
                    nonlocal counts
                    ids = np.fromiter(map(w2i.__getitem__, tokens), np.int32,
                                      count=len(tokens))
                    out.write(ids)
                    if s == "train":
                        c = np.bincount(ids, minlength=len(w2i))
                        c[:len(counts)] += counts
                        counts = c
                    tokens.clear()

                for words, ends in runs:
                    words_seen = words_seen or bool(words)
                    tokens.extend(words)
                    if ends:
                        tokens.append(EOS)
                    if len(tokens) >= _BLOCK_TOKENS:
                        flush()
                flush()
            if not words_seen:
                raise DataError(empty)
            sizes[s], digests[s] = out.count, out.sha256
        vocab = tuple(w2i)
        w2i.clear()
        counts = np.concatenate([counts, np.zeros(len(vocab) - len(counts), np.int64)])
        remap = None  # first-seen id -> final id, where they differ
        if min_count > 1:
            vocab_old = vocab
            vocab, remap = min_count_mapping(vocab_old, counts, min_count)
            first_at = np.full(len(vocab), len(vocab_old), np.int64)
            np.minimum.at(first_at, remap, np.arange(len(vocab_old)))
            counts = np.bincount(remap, weights=counts, minlength=len(vocab)).astype(np.int64)
        else:
            first_at = np.arange(len(vocab))
        if order == "frequency":
            new_id = _frequency_ids(counts, first_at)
            perm = np.argsort(new_id)
            vocab = tuple(vocab[int(i)] for i in perm)
            remap = new_id if remap is None else new_id[remap]
        _finish_splits(tmp, remap, digests)
        _write_meta(tmp, _meta_record(vocab, sizes, digests))


def _stream_word_ids(paths: Sequence[Path], path: Path, name: str, order: str,
                     min_count: int = 0) -> None:
    """`stream_word_cache` of the three files of a text directory (read a run of
    words at a time, `file_word_runs`)."""
    stream_word_cache([(file_word_runs(p), f"{p} is empty: it holds no words")
                       for p in paths], path, order, min_count)


def _run_blocks(runs: Iterable[tuple[list[str], bool]]):
    """`(words, ends_line)` runs in lists of about `_BLOCK_TOKENS` word-tokenizer
    tokens."""
    block: list[tuple[list[str], bool]] = []
    tokens = 0
    for run in runs:
        block.append(run)
        tokens += len(run[0]) + run[1]
        if tokens >= _BLOCK_TOKENS:
            yield block
            block, tokens = [], 0
    if block:
        yield block


def _stream_subword_ids(paths: Sequence[Path], path: Path, subwords, order: str) -> None:
    """Encode the three files of a text directory with `subwords` a block of words at a
    time into the cache entry `path` (the ids of `_subword_corpus` then `order_vocab`,
    never all in memory): the tokenizer's ids, or (`frequency`) renumbered by training
    count, ties by first occurrence over train, valid, test, then by tokenizer id, in a
    second pass over the written files. The word counts of each split go to the meta.
    The files are read a run of words at a time (`file_word_runs`)."""
    with _new_entry(path) as tmp:
        size = len(subwords.pieces)
        counts = np.zeros(size, np.int64)
        never = np.iinfo(np.int64).max
        first_at = np.full(size, never, np.int64)
        offset = 0
        sizes, digests, words = {}, {}, []
        for s, p in zip(SPLITS, paths):
            n_words = 0
            with IdWriter(tmp / f"{s}.first.npy") as out:
                for block in _run_blocks(file_word_runs(p)):
                    n_words += sum(len(words) + ends for words, ends in block)
                    ids = subwords.encode_runs(block)
                    out.write(ids)
                    if order == "frequency":
                        if s == "train":
                            counts += np.bincount(ids, minlength=size)
                        met, at = np.unique(ids, return_index=True)
                        new = first_at[met] == never
                        first_at[met[new]] = offset + at[new]
                        offset += len(ids)
            words.append(n_words)
            sizes[s], digests[s] = out.count, out.sha256
        vocab = subwords.pieces
        new_id = None
        if order == "frequency":
            new_id = _frequency_ids(counts, first_at)
            vocab = tuple(vocab[int(i)] for i in np.argsort(new_id))
        _finish_splits(tmp, new_id, digests)
        _write_meta(tmp, _meta_record(vocab, sizes, digests, words, subwords))


class _Lines:
    """The lines of a text file as a tokenizer trains on them, read again on each
    iteration: a re-iterable that never holds the file (a tokenizer's training reads
    it twice). A long line comes in parts of at most `WORDS` whole words
    (`file_word_runs`): the trainers count words, each on its own, so the parts
    train what the line would, and the batches of texts a trainer buffers stay
    small."""

    WORDS = 1000

    def __init__(self, path: Path):
        self.path = path

    def __iter__(self):
        for words, ends in file_word_runs(self.path):
            if not words:
                if ends:
                    yield ""
                continue
            for i in range(0, len(words), self.WORDS):
                yield " ".join(words[i:i + self.WORDS])


def _has_words(path: Path) -> bool:
    """Whether the text file `path` holds a word (read up to its first one)."""
    return any(words for words, _ in file_word_runs(path))


# --------------------------------------------------------------------------------------
# The order of the vocabulary (data.vocab_order): `first` keeps the ids a corpus comes
# with (first occurrence over train, valid, test for words; the tokenizer's ids for
# subwords), `frequency` numbers them by training-split count.

ORDERS = ("first", "frequency")


def frequency_permutation(streams: Sequence[np.ndarray], size: int) -> np.ndarray:
    """The ids `0..size-1` in frequency order: by count in `streams[0]` (the training
    split), descending; ties by first occurrence over the streams in turn (so ids met
    only in later streams follow every training id), then by id (ids never met)."""
    counts = np.bincount(np.asarray(streams[0], np.int64), minlength=size)
    every = np.concatenate([np.asarray(x, np.int64) for x in streams])
    first = np.full(size, every.size, dtype=np.int64)
    met, at = np.unique(every, return_index=True)
    first[met] = at
    return _frequency_order(counts, first)


def check_order(order: str, vocab: Sequence[str] | None = None) -> None:
    """Refuse an unknown `order`, and any order but `first` with a fixed `vocab`: a
    fixed vocabulary (a run's) keeps its own ids, which renumbering would move."""
    if order not in ORDERS:
        raise DataError(f"unknown vocabulary order {order!r}: choose one of "
                        f"{', '.join(ORDERS)}")
    if vocab is not None and order != "first":
        raise DataError(
            f"order={order!r} would renumber the fixed vocabulary given (vocab=), whose "
            "ids the model was trained on: a fixed vocabulary keeps its order; leave "
            "order at 'first'")


def order_vocab(corpus: Corpus, order: str) -> Corpus:
    """`corpus` with its ids renumbered in `order` (one of ORDERS)."""
    check_order(order)
    if order == "first":
        return corpus
    perm = frequency_permutation([corpus.train, corpus.valid, corpus.test],
                                 corpus.vocab_size)
    new_id = _inverse(perm)
    return dataclasses.replace(corpus, vocab=tuple(corpus.vocab[int(i)] for i in perm),
                               **{s: new_id[corpus.split(s)] for s in SPLITS})


def _subword_corpus(lines: Mapping[str, list[str]], name: str, subwords,
                    vocab: Sequence[str] | None = None) -> Corpus:
    """The corpus of `lines` in the tokenizer's pieces: with the tokenizer's ids (order
    `first`), or with `vocab`'s (a run's pieces in its order, by piece string)."""
    from mos_jax import subword
    encode = (subwords.encode_lines if vocab is None
              else lambda text: subwords.encode(text, vocab, name))
    return Corpus(name=name, vocab=subwords.pieces if vocab is None else tuple(vocab),
                  subwords=subwords, words=tuple(subword.count_words(lines[s])
                                                 for s in SPLITS),
                  **{s: encode(lines[s]) for s in SPLITS})


def _cached_subwords(path: Path):
    """The tokenizer cached at `path`, or None (absent, damaged or of another version:
    trained again)."""
    from mos_jax import subword
    if not path.is_file():
        return None
    try:
        return subword.Subwords.from_json(path.read_text(encoding="utf-8"), str(path))
    except (DataError, OSError, UnicodeDecodeError):
        return None


def _subword_tokenizer(kind: str, size: int, train_lines: Iterable[str], name: str,
                       path: Path | None):
    """The `kind` tokenizer of `size` pieces cached at `path`, else one trained on
    `train_lines` (a re-iterable: a list, or `_Lines` of the training file) and cached
    there."""
    from mos_jax import subword
    subwords = None if path is None else _cached_subwords(path)
    if subwords is None or (subwords.kind, subwords.size) != (kind, size):
        subwords = subword.train(kind, size, train_lines, name)
        if path is not None:
            try:
                atomic_write_bytes(path, subwords.to_json().encode())
            except OSError as e:
                warnings.warn(f"could not write the tokenizer cache {path}: {e}")
    return subwords


def read_corpus(directory: str | os.PathLike, *, vocab: Sequence[str] | None = None,
                cache: bool = True, cache_dir: str | os.PathLike | None = None,
                tokenizer: str = "word", vocab_size: int = 0, order: str = "first",
                subwords=None, min_count: int = 0) -> Corpus:
    """Read `train.txt`, `valid.txt`, `test.txt` from `directory` (docs/reference.md section 1).

    `tokenizer` `word` (whitespace words and `<eos>`) or a subword kind of
    `mos_jax.subword` (`bpe`, `unigram`: `vocab_size` pieces, trained on the training
    split); `order` one of ORDERS. The encoded ids are cached under `cache_dir`
    (default `default_cache_dir()`), one `.npy` per split in a `<key>.ids` directory,
    keyed by a SHA-256 of the three files (and, for other tokenizers or orders, by
    them), a subword tokenizer beside them as JSON, so a second load neither tokenises
    nor trains. A cached corpus's splits are memory-mapped (read-only arrays, their
    pages read when touched); a corpus is tokenised into the cache a block of words at
    a time, its files read a run of words at a time (`file_word_runs`: a subword
    tokenizer trained from those runs too), so a corpus larger than memory, or written
    as one long line, can be read. A fixed `vocab` bypasses the cache;
    with `subwords` (a run's tokenizer) the text is encoded with it into `vocab` (the
    run's pieces in its order). `min_count` (word tokenizer, no fixed `vocab`):
    words seen fewer times in training are `<unk>` (`apply_min_count`; 0: every word).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(
            f"corpus directory {directory} does not exist: {_GIVE_CORPUS}")
    paths = [directory / f"{s}.txt" for s in SPLITS]
    for p in paths:
        if not p.is_file():
            read_lines(p)  # raises the missing-file error
    name = str(directory)
    if subwords is not None:
        if vocab is None:
            raise ValueError("a run's tokenizer needs the run's vocabulary")
        check_order(order, vocab)
        return _subword_corpus({s: read_lines(p) for s, p in zip(SPLITS, paths)}, name,
                               subwords, vocab)
    check_order(order, vocab)
    cache_path = tokenizer_path = None
    if cache and vocab is None:
        folder = Path(cache_dir or default_cache_dir())
        digest = files_digest(paths)
        if tokenizer == "word":  # the first-occurrence key has no suffix
            stem = digest if order == "first" else f"{digest}-word-{order}"
            if min_count > 1:
                stem += f"-min{min_count}"
        else:
            stem = f"{digest}-{tokenizer}{vocab_size}-{_SUBWORD_CACHE}"
            tokenizer_path = folder / f"{stem}.tokenizer.json"
            stem += f"-{order}"
        cache_path = folder / f"{stem}{CACHE_SUFFIX}"
        if cache_path.is_dir():
            subwords = None if tokenizer_path is None else _cached_subwords(tokenizer_path)
            if tokenizer_path is None or subwords is not None:
                cached = _load_cache(cache_path, name, subwords)
                if cached is not None:
                    return cached
        # streamed to the cache (a subword tokenizer trained from the training file
        # read a run of words at a time), never all in memory
        subwords = None
        try:
            if tokenizer == "word":
                _stream_word_ids(paths, cache_path, name, order, min_count)
            else:
                for p in paths:  # the errors reading every file in memory would give
                    if not _has_words(p):
                        raise DataError(f"{p} is empty: it holds no words")
                subwords = _subword_tokenizer(tokenizer, vocab_size, _Lines(paths[0]),
                                              name, tokenizer_path)
                _stream_subword_ids(paths, cache_path, subwords, order)
        except OSError as e:
            warnings.warn(f"could not write the corpus cache {cache_path}: {e}; "
                          "reading the corpus into memory")
        else:
            cached = _load_cache(cache_path, name, subwords)
            if cached is not None:
                return cached
    lines = {s: read_lines(p) for s, p in zip(SPLITS, paths)}
    if tokenizer == "word":
        corpus = build_corpus(lines, name, vocab)
        if vocab is None:
            corpus = apply_min_count(corpus, min_count)
    else:
        if vocab is not None:
            raise ValueError("a subword corpus takes a run's tokenizer (subwords=), "
                             "not a fixed vocabulary")
        if subwords is None:  # else trained (or read) before the cache failed
            subwords = _subword_tokenizer(tokenizer, vocab_size, lines["train"], name,
                                          tokenizer_path)
        corpus = _subword_corpus(lines, name, subwords)
    corpus = order_vocab(corpus, order)
    if cache_path is not None:
        try:
            _save_cache(cache_path, corpus)
        except OSError as e:
            warnings.warn(f"could not write the corpus cache {cache_path}: {e}")
    return corpus


# --------------------------------------------------------------------------------------
# The synthetic high-rank corpus.

@dataclasses.dataclass(frozen=True)
class MarkovChain:
    """A first-order Markov chain over `V` words.

    Attributes:
      log_transition: [V, V] float64, row i is log P(next | current = i).
      stationary: [V] float64, the stationary distribution.
    """

    log_transition: np.ndarray
    stationary: np.ndarray

    @property
    def entropy_rate(self) -> float:
        """sum_i pi_i H(P_i): nats per token of the best possible predictor."""
        p = np.exp(self.log_transition)
        row_entropy = -(p * self.log_transition).sum(axis=1)
        return float(self.stationary @ row_entropy)

    def log_rows(self, ids: np.ndarray) -> np.ndarray:
        """[len(ids), V] log P(next | current = ids[r])."""
        return self.log_transition[np.asarray(ids)]

    def log_prob(self, current: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """log P(nxt[t] | current[t]), elementwise."""
        return self.log_transition[np.asarray(current), np.asarray(nxt)]

    def sample(self, n: int, rng: np.random.Generator, start: int | None = None) -> np.ndarray:
        """A stationary run of `n` states (the first drawn from `stationary`)."""
        import bisect
        cum = np.cumsum(np.exp(self.log_transition), axis=1)
        cum /= cum[:, -1:]
        rows = [row.tolist() for row in cum]
        u = rng.random(n).tolist()
        last = len(rows) - 1
        state = int(rng.choice(len(rows), p=self.stationary)) if start is None else start
        out = np.empty(n, dtype=np.int32)
        out[0] = state
        for t in range(1, n):
            state = min(bisect.bisect_right(rows[state], u[t]), last)
            out[t] = state
        return out


def make_markov_chain(vocab_size: int, peakedness: float, seed: int) -> MarkovChain:
    """A random chain whose transition logits are i.i.d. N(0, peakedness^2).

    The log-transition matrix is a Gaussian matrix minus a per-row constant, so it has
    full rank (V, up to at most one) almost surely: a softmax output layer with hidden
    size d < V - 2 cannot represent it exactly. Larger `peakedness` gives sharper rows
    (for large V the perplexity of a row is about V * exp(-peakedness^2 / 2); more for
    small V: V = 100 at peakedness 2 gives 22.1).
    """
    if vocab_size < 2:
        raise DataError(f"the synthetic corpus needs vocab_size >= 2, got {vocab_size}")
    rng = np.random.default_rng(seed)
    logits = peakedness * rng.standard_normal((vocab_size, vocab_size))
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    # Stationary distribution: left eigenvector of eigenvalue 1, refined by power steps.
    w, v = np.linalg.eig(p.T)
    pi = np.abs(np.real(v[:, np.argmin(np.abs(w - 1.0))]))
    pi /= pi.sum()
    for _ in range(50):
        pi = pi @ p
    pi /= pi.sum()
    return MarkovChain(log_transition=log_p, stationary=pi)


# Beyond this the dense chain's V x V matrices (and its O(V^3) eigendecomposition) do
# not fit a machine: V = 10,000 already holds several 800 MB matrices.
DENSE_MAX_VOCAB = 10_000
STRUCTURES = ("dense", "zipf")


@dataclasses.dataclass(frozen=True)
class ZipfChain:
    """A sparse first-order Markov chain over `V` words with Zipfian frequencies.

    The transition matrix is P = (1 - eps) S + eps u 1^T row-wise, i.e.
    P[i, j] = (1 - eps) S[i, j] + eps u[j]: with probability eps the next word is drawn
    from the unigram distribution u, otherwise from the m successor slots of word i,
    slot k holding word `successors[i, k]` with weight `weights[i, k]` (each row of
    `weights` sums to 1; a word in two slots of a row gets both weights). Only O(V m)
    numbers are stored; `log_rows` gives dense rows on demand.

    Ids are in order of decreasing stationary probability (id 0 the most frequent).

    Attributes:
      unigram: [V] float64, u (the smoothing distribution).
      successors: [V, m] int32, the successor words of each word (with repeats).
      weights: [V, m] float64, their weights, rows summing to 1.
      smoothing: eps in [0, 1].
      stationary: [V] float64, pi = pi P.
      entropy_rate: sum_i pi_i H(P_i), nats per token.
    """

    unigram: np.ndarray
    successors: np.ndarray
    weights: np.ndarray
    smoothing: float
    stationary: np.ndarray
    entropy_rate: float

    @property
    def vocab_size(self) -> int:
        return int(self.unigram.shape[0])

    def log_rows(self, ids: np.ndarray) -> np.ndarray:
        """[len(ids), V] float64 log P(next | current = ids[r]) (dense, on demand)."""
        ids = np.asarray(ids, dtype=np.int64)
        p = np.broadcast_to(self.smoothing * self.unigram,
                            (len(ids), self.vocab_size)).copy()
        rows = np.repeat(np.arange(len(ids)), self.successors.shape[1])
        np.add.at(p, (rows, self.successors[ids].ravel()),
                  (1.0 - self.smoothing) * self.weights[ids].ravel())
        with np.errstate(divide="ignore"):
            return np.log(p)

    def log_prob(self, current: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """log P(nxt[t] | current[t]), elementwise, in O(len * m)."""
        current, nxt = np.asarray(current), np.asarray(nxt)
        hit = self.successors[current] == nxt[:, None]
        s = np.where(hit, self.weights[current], 0.0).sum(axis=1)
        with np.errstate(divide="ignore"):
            return np.log((1.0 - self.smoothing) * s + self.smoothing * self.unigram[nxt])

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """A stationary run of `n` states (the first drawn from `stationary`).

        Exact and vectorised: a smoothing step (probability eps) draws the next word
        from u whatever the current one, so the run splits into independent segments
        at those steps; all segments advance together, one successor step at a time
        (as many numpy steps as the longest segment: about log(n) / eps). With eps = 0
        the run is one segment, one numpy step per token (about 13 us each on a 2-core
        CPU, against 0.3 s for 10^6 tokens at eps = 0.1).
        """
        v, m = self.successors.shape
        cum = np.cumsum(self.weights, axis=1)
        cum[:, -1] = 1.0
        out = np.empty(n, dtype=np.int32)
        restart = rng.random(n) < self.smoothing
        restart[0] = True
        starts = np.flatnonzero(restart)
        first = _draw(self.stationary, 1, rng)
        out[starts] = _draw(self.unigram, len(starts), rng)
        out[0] = first[0]
        ends = np.append(starts[1:], n)
        pos, end = starts + 1, ends
        live = pos < end
        pos, end = pos[live], end[live]
        r = rng.random(n)
        while pos.size:
            state = out[pos - 1]
            slot = (cum[state] < r[pos, None]).sum(axis=1)
            out[pos] = self.successors[state, np.minimum(slot, m - 1)]
            pos = pos + 1
            live = pos < end
            pos, end = pos[live], end[live]
        return out


def _draw(p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` independent draws from the distribution `p` (inverse CDF)."""
    cum = np.cumsum(p)
    return np.minimum(np.searchsorted(cum, rng.random(n) * cum[-1], side="right"),
                      len(p) - 1).astype(np.int32)


def check_zipf(vocab_size: int, zipf_exponent: float, successors: int,
               smoothing: float) -> None:
    """One DataError for the first parameter of the zipf chain out of range."""
    if vocab_size < 2:
        raise DataError(f"the synthetic corpus needs vocab_size >= 2, got {vocab_size}")
    if not zipf_exponent > 0 or not np.isfinite(zipf_exponent):
        raise DataError(f"data.synthetic.zipf_exponent must be a number > 0 (about 1 for "
                        f"natural text), got {zipf_exponent}")
    if not 1 <= successors <= vocab_size:
        raise DataError(f"data.synthetic.successors must be in [1, vocab_size = "
                        f"{vocab_size}], got {successors}")
    if not 0.0 <= smoothing <= 1.0:
        raise DataError(f"data.synthetic.smoothing must be in [0, 1], got {smoothing}")


def make_zipf_chain(vocab_size: int, zipf_exponent: float = 1.0, successors: int = 32,
                    smoothing: float = 0.1, peakedness: float = 1.0, seed: int = 0,
                    tol: float = 1e-13, max_iter: int = 10_000) -> ZipfChain:
    """A random sparse chain with roughly Zipfian stationary frequencies, in O(V m).

    u_j = (j + 1)^-s / sum_k (k + 1)^-s. Each word i draws m successor words
    independently from u (so a word's expected in-links grow with its frequency, and
    E[sum_i pi_i S[i, j]] = u_j: the stationary distribution is close to u) and weights
    softmax(peakedness * z_i) over its m slots, z_i ~ N(0, I). P = (1 - eps) S + eps u:
    S has V independent random sparse rows, so log P has high rank (a softmax with
    hidden size d << V cannot represent it). Then:

    - pi: power iteration pi <- (1 - eps) pi S + eps u (one bincount over the V m
      slots per step; from u; until the L1 change is below `tol`; lazy steps
      (pi + pi P) / 2 when eps = 0, where the chain may be periodic);
    - H(P_i) = -sum_{j in A_i} q_ij log q_ij - (T - sum_{j in A_i} eps u_j log(eps u_j))
      with A_i the distinct successors of i, q_ij = (1 - eps) S_ij + eps u_j and
      T = sum_j eps u_j log(eps u_j) over all V words (computed once), so the
      entropy rate sum_i pi_i H(P_i) is exact in O(V m);
    - the words are renumbered by decreasing pi (stable), so id 0 is the most frequent.
    """
    check_zipf(vocab_size, zipf_exponent, successors, smoothing)
    v, m, eps = int(vocab_size), int(successors), float(smoothing)
    rng = np.random.default_rng([seed, 2])
    u = np.arange(1, v + 1, dtype=np.float64) ** -float(zipf_exponent)
    u /= u.sum()
    cols = _draw(u, v * m, rng).reshape(v, m)
    logits = peakedness * rng.standard_normal((v, m))
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)

    # Stationary distribution.
    flat_cols = cols.ravel()
    pi = u.copy()
    for _ in range(max_iter):
        nxt = (1.0 - eps) * np.bincount(flat_cols, weights=(pi[:, None] * w).ravel(),
                                        minlength=v) + eps * u
        if eps == 0.0:
            nxt = 0.5 * (pi + nxt)
        nxt /= nxt.sum()
        change = np.abs(nxt - pi).sum()
        pi = nxt
        if change < tol:
            break
    else:
        warnings.warn(f"the zipf chain's stationary distribution moved by {change:.1e} "
                      f"(L1) in its last power step of {max_iter}")

    # Renumber by decreasing stationary probability.
    order = np.argsort(-pi, kind="stable")
    new_id = np.empty(v, dtype=np.int64)
    new_id[order] = np.arange(v)
    u, pi = u[order], pi[order]
    cols = new_id[cols[order]].astype(np.int32)
    w = w[order]

    # Entropy rate: merge repeated successors of a row (sort each row by word).
    perm = np.argsort(cols, axis=1, kind="stable")
    sc = np.take_along_axis(cols, perm, axis=1)
    sw = np.take_along_axis(w, perm, axis=1)
    first = np.ones((v, m), dtype=bool)
    first[:, 1:] = sc[:, 1:] != sc[:, :-1]
    group = np.cumsum(first.ravel()) - 1  # distinct (row, word) pairs, in order
    merged = np.bincount(group, weights=sw.ravel())
    words = sc.ravel()[first.ravel()]
    rows = np.repeat(np.arange(v), first.sum(axis=1))
    smooth = eps * u
    q = (1.0 - eps) * merged + smooth[words]
    with np.errstate(divide="ignore", invalid="ignore"):
        s_log_s = np.where(smooth > 0, smooth * np.log(smooth), 0.0)
        q_log_q = np.where(q > 0, q * np.log(q), 0.0)
    total = s_log_s.sum()
    row_h = -(np.bincount(rows, weights=q_log_q, minlength=v)
              + total - np.bincount(rows, weights=s_log_s[words], minlength=v))
    entropy = float(pi @ row_h)
    return ZipfChain(unigram=u, successors=cols, weights=w, smoothing=eps,
                     stationary=pi, entropy_rate=entropy)


def synthetic_corpus(vocab_size: int = 500, train_tokens: int = 200_000,
                     valid_tokens: int = 20_000, test_tokens: int = 20_000,
                     peakedness: float = 2.0, seed: int = 0, structure: str = "dense",
                     zipf_exponent: float = 1.0, successors: int = 32,
                     smoothing: float = 0.1, successor_peakedness: float = 1.0) -> Corpus:
    """The built-in high-rank corpus: three runs of one random Markov chain.

    `structure` picks the chain: `dense` (`make_markov_chain`: V x V Gaussian logits,
    up to `DENSE_MAX_VOCAB` words) or `zipf` (`make_zipf_chain`: sparse, Zipfian,
    O(V m), hundreds of thousands of words; its ids are frequency-ordered). Words are
    named `w0`, `w1`, ...; `Corpus.entropy_rate` holds the chain's true entropy
    rate, so `exp(entropy_rate)` is the best perplexity any model can reach (in
    expectation). The same arguments always give the same corpus.
    """
    sizes = dict(zip(SPLITS, (train_tokens, valid_tokens, test_tokens)))
    for s, n in sizes.items():
        if n < 2:
            raise DataError(f"the synthetic {s} split needs at least 2 tokens, got {n}")
    chain = synthetic_chain(vocab_size, peakedness, seed, structure, zipf_exponent,
                            successors, smoothing, successor_peakedness)
    rng = np.random.default_rng([seed, 1])
    streams = {s: chain.sample(n, rng) for s, n in sizes.items()}
    vocab = tuple(f"w{i}" for i in range(vocab_size))
    label = "" if structure == "dense" else f"{structure}, "
    return Corpus(name=f"synthetic({label}V={vocab_size}, seed={seed})", vocab=vocab,
                  entropy_rate=chain.entropy_rate, **streams)


def synthetic_chain(vocab_size: int, peakedness: float = 2.0, seed: int = 0,
                    structure: str = "dense", zipf_exponent: float = 1.0,
                    successors: int = 32, smoothing: float = 0.1,
                    successor_peakedness: float = 1.0, **_unused
                    ) -> MarkovChain | ZipfChain:
    """The chain of `synthetic_corpus` with these parameters (others are ignored, so
    `synthetic_chain(**config.data.synthetic)` works)."""
    if structure == "zipf":
        return make_zipf_chain(vocab_size, zipf_exponent, successors, smoothing,
                               successor_peakedness, seed)
    if structure != "dense":
        raise DataError(f"data.synthetic.structure={structure!r}: choose one of "
                        f"{', '.join(STRUCTURES)}")
    if vocab_size > DENSE_MAX_VOCAB:
        raise DataError(
            f"the dense synthetic chain holds V x V matrices and cannot have "
            f"{vocab_size:,} words (at most {DENSE_MAX_VOCAB:,}): use "
            "--config.data.synthetic.structure=zipf for a large vocabulary")
    return make_markov_chain(vocab_size, peakedness, seed)
