"""Corpora: vocabulary, reading a corpus directory, the id cache, the synthetic corpus.

Conventions follow docs/reference.md section 1: each line is split on whitespace and `<eos>` is
appended (a blank line yields just `<eos>`); one vocabulary for all splits, ids in order
of first occurrence scanning train, then valid, then test.

Other corpus sources live beside this module and return the same `Corpus`:
`mos_jax.download` (public mirrors) and `mos_jax.tfds_corpus` (TensorFlow Datasets).
`load_corpus` dispatches on a source string.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from mos_jax.errors import DataError

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
# Bumped whenever the cached layout or the tokenisation changes.
_CACHE_FORMAT = "mos-jax-ids-v1"


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenised corpus: the vocabulary and one int32 id stream per split.

    Attributes:
      name: a label for logs (the directory, TFDS name or "synthetic").
      vocab: id -> word, a tuple of length V.
      train, valid, test: int32 arrays of token ids, `<eos>` included.
      entropy_rate: for synthetic corpora, the true entropy rate in nats per token (the
        log of the best achievable perplexity); None for natural text.
    """

    name: str
    vocab: tuple[str, ...]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    entropy_rate: float | None = None

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
                "PTB or WikiText-2 into one with `mos-jax download ptb --dest DIR`")


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
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8 text: byte {e.start} (line {line}) is "
            f"{raw[e.start:e.start + 1]!r}. Convert it first, e.g. "
            f"`iconv -f latin1 -t utf-8`.") from None
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


def encode_text_file(path: str | os.PathLike, vocab: Sequence[str]
                     ) -> tuple[np.ndarray, Unknown | None]:
    """The words of a plain text file (lines split on whitespace, `<eos>` after each,
    as a corpus's splits are read) as ids into `vocab`, by string; unknown words as in
    `map_to_vocab`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--text {path}: no such file; give a UTF-8 text file to score")
    return encode_words(tokenize_lines(read_lines(path)), vocab, str(path))


def default_cache_dir() -> Path:
    """`$MOS_JAX_CACHE`, else `$XDG_CACHE_HOME/mos_jax`, else `~/.cache/mos_jax`."""
    if os.environ.get("MOS_JAX_CACHE"):
        return Path(os.environ["MOS_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mos_jax"


def sha256_files(paths: Sequence[str | os.PathLike], prefix: bytes = b"",
                 separator: bytes = b"") -> str:
    """Hex SHA-256 of `prefix`, then of each file's bytes (in order, read in 1 MiB
    chunks) followed by `separator`. One file with no prefix or separator: the digest
    `sha256sum` prints. The one file-hashing helper of the package (the id cache,
    `mos_jax.download`, `mos_jax.tfds_corpus`)."""
    h = hashlib.sha256(prefix)
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(separator)
    return h.hexdigest()


def files_digest(paths: Sequence[Path]) -> str:
    """SHA-256 over the contents of `paths` (in order) and the cache format."""
    return sha256_files(paths, _CACHE_FORMAT.encode(), b"\0")


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


def _save_cache(path: Path, corpus: Corpus) -> None:
    import io
    buf = io.BytesIO()
    np.savez(buf, vocab=np.asarray(corpus.vocab, dtype=str), train=corpus.train,
             valid=corpus.valid, test=corpus.test)
    atomic_write_bytes(path, buf.getvalue())


def _load_cache(path: Path, name: str) -> Corpus | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return Corpus(name=name, vocab=tuple(z["vocab"].tolist()),
                          **{s: z[s].astype(np.int32) for s in SPLITS})
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None


def read_corpus(directory: str | os.PathLike, *, vocab: Sequence[str] | None = None,
                cache: bool = True, cache_dir: str | os.PathLike | None = None) -> Corpus:
    """Read `train.txt`, `valid.txt`, `test.txt` from `directory` (docs/reference.md section 1).

    The encoded ids are cached as `.npz` under `cache_dir` (default
    `default_cache_dir()`), keyed by a SHA-256 of the three files, so a second load
    skips tokenisation. A fixed `vocab` bypasses the cache.
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
    cache_path = None
    if cache and vocab is None:
        cache_path = Path(cache_dir or default_cache_dir()) / f"{files_digest(paths)}.npz"
        if cache_path.is_file():
            cached = _load_cache(cache_path, name)
            if cached is not None:
                return cached
    corpus = build_corpus({s: read_lines(p) for s, p in zip(SPLITS, paths)}, name, vocab)
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


def synthetic_corpus(vocab_size: int = 500, train_tokens: int = 200_000,
                     valid_tokens: int = 20_000, test_tokens: int = 20_000,
                     peakedness: float = 2.0, seed: int = 0) -> Corpus:
    """The built-in high-rank corpus: three runs of one random Markov chain.

    Words are named `w0`, `w1`, ...; `Corpus.entropy_rate` holds the chain's true entropy
    rate, so `exp(entropy_rate)` is the best perplexity any model can reach (in
    expectation). The same arguments always give the same corpus.
    """
    sizes = dict(zip(SPLITS, (train_tokens, valid_tokens, test_tokens)))
    for s, n in sizes.items():
        if n < 2:
            raise DataError(f"the synthetic {s} split needs at least 2 tokens, got {n}")
    chain = make_markov_chain(vocab_size, peakedness, seed)
    rng = np.random.default_rng([seed, 1])
    streams = {s: chain.sample(n, rng) for s, n in sizes.items()}
    vocab = tuple(f"w{i}" for i in range(vocab_size))
    return Corpus(name=f"synthetic(V={vocab_size}, seed={seed})", vocab=vocab,
                  entropy_rate=chain.entropy_rate, **streams)


def load_corpus(source: str, **kwargs) -> Corpus:
    """A corpus from a source string.

    - `synthetic` (keyword arguments go to `synthetic_corpus`);
    - `tfds:NAME[:FEATURE]`: a TensorFlow Datasets text dataset (see `mos_jax.tfds_corpus`);
    - anything else: a directory with train.txt, valid.txt, test.txt.
    """
    if source == "synthetic":
        return synthetic_corpus(**kwargs)
    if source.startswith("tfds:"):
        from mos_jax import tfds_corpus  # lazy: imports tensorflow_datasets
        return tfds_corpus.load_tfds_corpus(source[len("tfds:"):], **kwargs)
    return read_corpus(source, **kwargs)
