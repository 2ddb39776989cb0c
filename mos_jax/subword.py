"""Subword vocabularies: BPE and Unigram tokenizers trained on a corpus's training split.

`data.tokenizer = bpe | unigram` with `data.vocab_size = N` replaces the whitespace words
of a corpus directory by N subword pieces. The tokenizers are Hugging Face `tokenizers`
models: one library trains both kinds from an in-memory iterator, writes the whole
tokenizer (pre-tokenizer, model, decoder, special tokens) as one reviewable JSON text
that is cached beside the ids and recorded in a run's work directory, and encodes fast.
It is imported only when a subword tokenizer is used: a word-level corpus needs nothing
beyond NumPy.

Conventions (docs/training.md, "Subword vocabularies"):

- trained on the words of the training split only (`<unk>` and `<eos>` removed from
  the text it learns from), deterministically: the same text, kind and N give the same
  JSON byte for byte (the Unigram trainer's scores, which vary in their last bits from
  one training to the next, are rounded and its pieces sorted by them);
- `<eos>` and `<unk>` are atomic special tokens, ids 0 and 1 of the tokenizer;
- each line is split on whitespace (as the word tokenizer reads it), each word encoded
  with a leading `▁` (the Metaspace convention), and `<eos>` appended, so the pieces of
  a line decode back to its words (`decode_words`);
- a character the training split lacks becomes `<unk>`.

The corpus's vocabulary is the pieces; their order (first: the tokenizer's own ids, or
frequency) is the corpus's business (`mos_jax.data`), and text is mapped into a run's
vocabulary by piece string (`Subwords.encode`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Iterable, Iterator, Sequence

import numpy as np

from mos_jax.errors import ConfigError, DataError

KINDS = ("bpe", "unigram")
EOS, UNK = "<eos>", "<unk>"
SPECIALS = (EOS, UNK)
MARK = "\u2581"  # the word-start mark of Metaspace pre-tokenisation
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "mos-jax-tokenizer-v1"


def _library():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            "data.tokenizer bpe and unigram need the Hugging Face `tokenizers` package: "
            "pip install tokenizers (or use --config.data.tokenizer=word)") from None
    return tokenizers


@dataclasses.dataclass(frozen=True, eq=False)
class Subwords:
    """A trained subword tokenizer: its kind, the N it was trained for and its JSON."""

    kind: str
    size: int
    spec: str  # the Hugging Face tokenizer's JSON text

    def describe(self) -> str:
        return f"{self.kind} {self.size}"

    def to_json(self) -> str:
        """The file written beside the ids and in a run's work directory."""
        return json.dumps({"format": FORMAT, "kind": self.kind, "vocab_size": self.size,
                           "tokenizer": json.loads(self.spec)}, ensure_ascii=False,
                          indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Subwords":
        try:
            record = json.loads(text)
            if record["format"] != FORMAT or record["kind"] not in KINDS:
                raise ValueError(f"format {record['format']!r}, kind {record['kind']!r}")
            return cls(record["kind"], int(record["vocab_size"]),
                       json.dumps(record["tokenizer"], ensure_ascii=False))
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where} is damaged or of another version ({e}): the "
                            "tokenizer cannot be read; delete it to train it "
                            "again") from None

    @functools.cached_property
    def tokenizer(self):
        return _library().Tokenizer.from_str(self.spec)

    @functools.cached_property
    def pieces(self) -> tuple[str, ...]:
        """The pieces by tokenizer id."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        pieces = [""] * len(vocab)
        for piece, i in vocab.items():
            pieces[i] = piece
        return tuple(pieces)

    def _distinct(self, runs: Iterable[tuple[list[str], bool]]):
        """The distinct words of `runs` (`<eos>` first), each one's tokenizer ids, and
        the stream as indices into them (each run's words, then `<eos>` where the run
        ends a line).

        Every word is encoded on its own (pre-tokenised input: the tokenizer never
        looks across words), so each distinct word is encoded once, and a line may
        come in several runs (a line read in parts) with the same ids."""
        index: dict[str, int] = {EOS: 0}
        stream: list[int] = []
        for words, ends in runs:
            stream.extend(index.setdefault(w, len(index)) for w in words)
            if ends:
                stream.append(0)
        encoded = self.tokenizer.encode_batch([[w] for w in index], is_pretokenized=True,
                                              add_special_tokens=False)
        return list(index), [e.ids for e in encoded], np.asarray(stream, dtype=np.int64)

    def encode_lines(self, lines: Iterable[str]) -> np.ndarray:
        """int32 tokenizer ids of `lines`: each line's whitespace words, then `<eos>`
        (each distinct word encoded once, the stream gathered from those pieces)."""
        return self.encode_runs(_line_runs(lines))

    def encode_runs(self, runs: Iterable[tuple[list[str], bool]]) -> np.ndarray:
        """`encode_lines` of lines given as `(words, ends_line)` runs
        (`mos_jax.data.file_word_runs`)."""
        _, ids, words = self._distinct(runs)
        lengths = np.asarray([len(i) for i in ids], dtype=np.int64)
        flat = np.asarray([i for word in ids for i in word], dtype=np.int32)
        starts = np.cumsum(lengths) - lengths
        n = lengths[words]
        first = np.repeat(starts[words], n)
        within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        return flat[first + within]

    def unknown(self, lines: Iterable[str]) -> tuple[int, int, tuple[str, ...]]:
        """`(tokens, total, words)`: the `<unk>` pieces of `lines` that stand for
        characters the tokenizer lacks (a `<unk>` word of the text aside), of `total`
        pieces, and the distinct words that hold them, in order of first appearance."""
        words, ids, stream = self._distinct(_line_runs(lines))
        unk = SPECIALS.index(UNK)
        per_word = np.asarray([0 if w in SPECIALS else i.count(unk)
                               for w, i in zip(words, ids)], dtype=np.int64)
        counts = np.bincount(stream, minlength=len(words))
        total = int((np.asarray([len(i) for i in ids]) * counts).sum())
        return (int((per_word * counts).sum()), total,
                tuple(w for w, n in zip(words, per_word) if n))

    def encode(self, lines: Iterable[str], vocab: Sequence[str], what: str) -> np.ndarray:
        """`lines` as ids into `vocab` (a run's pieces, in its order), by piece string."""
        index = {p: i for i, p in enumerate(vocab)}
        missing = [p for p in self.pieces if p not in index]
        if missing:
            raise DataError(
                f"the tokenizer does not match the vocabulary {what} is read with: "
                f"{len(missing)} of its pieces are not in it (e.g. {missing[:3]}). Use "
                "the tokenizer.json recorded beside that vocabulary")
        table = np.asarray([index[p] for p in self.pieces], dtype=np.int32)
        return table[self.encode_lines(lines)]


def _line_runs(lines: Iterable[str]) -> Iterator[tuple[list[str], bool]]:
    return ((line.split(), True) for line in lines)


def decode_words(pieces: Iterable[str]) -> list[str]:
    """The words of a sequence of pieces: a piece that starts with `▁` starts a word,
    other pieces continue the last one, `<eos>` and `<unk>` are words of their own."""
    words: list[str] = []
    open_word = False
    for p in pieces:
        if p in SPECIALS:
            words.append(p)
            open_word = False
        elif p.startswith(MARK) or not open_word:
            text = p[len(MARK):] if p.startswith(MARK) else p
            words.append(text)
            open_word = True
        else:
            words[-1] += p
    return [w for w in words if w]


def count_words(lines: Iterable[str]) -> int:
    """Words of `lines` as the word tokenizer counts them: whitespace tokens + `<eos>`."""
    return sum(len(line.split()) + 1 for line in lines)


def _training_text(lines: Iterable[str]) -> Iterator[str]:
    """The text the tokenizer learns from, a line at a time (`<eos>`, `<unk>` removed)."""
    return (" ".join(w for w in line.split() if w not in SPECIALS) for line in lines)


def smallest_size(lines: Iterable[str]) -> int:
    """The smallest N a tokenizer of `lines` can have: the two special tokens, `▁` and
    every distinct character of the words."""
    chars = set()
    for line in _training_text(lines):
        chars.update(line)
    chars.discard(" ")
    chars.add(MARK)
    return len(SPECIALS) + len(chars)


def train(kind: str, size: int, train_lines: Iterable[str], name: str) -> Subwords:
    """Train a `kind` tokenizer of `size` pieces on `train_lines` (the training split:
    a list, or any iterable that can be read twice, e.g. the lines of a file read
    again on each pass; the trainer takes it a line at a time, never all in memory).

    Raises a ConfigError when `size` is below `smallest_size` or above what the text
    allows (the trainer's result, named in the message)."""
    if kind not in KINDS:
        raise ConfigError(f"data.tokenizer={kind!r} is not a subword tokenizer: choose "
                          f"one of {', '.join(KINDS)}")
    least = smallest_size(train_lines)
    if size < least:
        raise ConfigError(
            f"--config.data.vocab_size={size} is too small for the training split of "
            f"{name}: a {kind} vocabulary needs at least {least} pieces (2 special "
            f"tokens, {MARK} and {least - 3} distinct characters); use at least {least}")
    lib = _library()
    from tokenizers import decoders, models, pre_tokenizers, trainers
    if kind == "bpe":
        tok = lib.Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=list(SPECIALS),
                                      show_progress=False)
    else:
        tok = lib.Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=size, special_tokens=list(SPECIALS),
                                          unk_token=UNK, show_progress=False)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    tok.train_from_iterator(_training_text(train_lines), trainer)
    spec = json.loads(tok.to_str())
    if kind == "unigram":
        spec = _canonical_unigram(spec)
    got = len(spec["model"]["vocab"])
    if got < size and kind == "bpe":
        raise ConfigError(
            f"--config.data.vocab_size={size} is more than the training split of {name} "
            f"allows: its bpe vocabulary stops at {got} pieces; use at most {got}")
    if got < size:  # Unigram's pruning can stop short of N (not monotonically in N)
        raise ConfigError(
            f"--config.data.vocab_size={size} is more than the unigram trainer reaches on "
            f"the training split of {name}: it stops at {got} pieces; use "
            f"--config.data.vocab_size={got} (or bpe, which gives exactly N up to its "
            "limit)")
    if got > size:  # Unigram, at N close to the alphabet: it keeps more than N
        raise ConfigError(
            f"--config.data.vocab_size={size} is too small for the unigram trainer on the "
            f"training split of {name}: it keeps {got} pieces (the special tokens, {MARK}, "
            f"the characters and more); use a larger N")
    for i, special in enumerate(SPECIALS):  # what the tokenizer's order relies on
        added = spec["added_tokens"][i]
        if added["content"] != special or added["id"] != i:
            raise DataError(f"the {kind} trainer numbered the special tokens "
                            f"{spec['added_tokens']}, not {SPECIALS}")
    text = lib.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False)).to_str()
    return Subwords(kind, size, json.dumps(json.loads(text), ensure_ascii=False))


# The Unigram trainer gives the characters its model lacks the scores min, min - step,
# ... (then the last one again), in the order of a hash set: another on each training.
_ADDED_STEP = 1e-4
# Its scores differ in their last bits from one training to the next: rounded to 9
# decimals, about one training in 30 of WikiText-2 (N = 8000) still moved one piece
# across a rounding boundary; at 6 the chance is a thousand times smaller.
_DECIMALS = 6


def _canonical_unigram(spec: dict) -> dict:
    """The Unigram model with its scores rounded (to `_DECIMALS`) and its pieces after
    the special tokens sorted by score (descending), then by piece: the trainer's
    scores differ in their last bits from one training to the next. The pieces at the
    bottom whose scores are 0 or `_ADDED_STEP` apart (the characters it adds, and any
    piece tied with them) keep those scores but take them in the order of the pieces:
    which pieces these are depends on the scores alone, not on the hash order."""
    model = spec["model"]
    vocab = [(p, round(float(s), _DECIMALS)) for p, s in model["vocab"]]
    head = [v for v in vocab if v[0] in SPECIALS]
    head.sort(key=lambda v: SPECIALS.index(v[0]))
    rest = sorted((v for v in vocab if v[0] not in SPECIALS), key=lambda v: (-v[1], v[0]))
    k = len(rest)  # rest[k:]: the added characters
    while k > 0 and (k == len(rest) or min(abs(rest[k - 1][1] - rest[k][1] - gap)
                                           for gap in (0.0, _ADDED_STEP)) < 2e-6):
        k -= 1
    added = rest[k:]
    rest[k:] = zip(sorted(p for p, _ in added), (s for _, s in added))
    model["vocab"] = [list(v) for v in head + rest]
    model["unk_id"] = SPECIALS.index(UNK)
    return spec
