"""The registry of corpus sources and the one path from a config to a corpus.

A source string (`data.dir` in a config, `--data` on the command line) names where a
corpus comes from. The registry maps each name or prefix to a reader:

- `synthetic`: the built-in Markov chain (`mos_jax.data.synthetic_corpus`), with the
  parameters of `data.synthetic`;
- `tfds:NAME[:FEATURE]`: a TensorFlow Datasets text dataset (`mos_jax.tfds_corpus`,
  imported only for such a source, since it imports `tensorflow_datasets`; its ids
  cached memory-mapped, in `data.vocab_order`), with `data.tfds_data_dir` and
  `data.tfds_manual_dir`;
- anything else: a directory with train.txt, valid.txt and test.txt
  (`mos_jax.data.read_corpus`, its ids cached in a memory-mapped file), with
  `data.tokenizer`, `data.vocab_size` and `data.vocab_order`. `mos-jax download`
  fills one (PTB, WikiText-2, WikiText-103, the One Billion Word benchmark).

`load_corpus_from(config)` is the path every command takes from a config to a corpus
(training, finetuning, bench, study, and a run's corpus in evaluate, rank, generate);
`corpus_of(source, config)` reads another source (`--data`) with a run's options.
`load_corpus(source, **kwargs)` calls a source's reader with the reader's own
arguments. A new source is one `register_source` call.

The module sits below `config` and `heads` (it reads the data keys and asks the head
whether it wants frequency-ordered ids), above `data` and `tfds_corpus`, so that
neither of them imports the other.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

from mos_jax import config as config_lib, data, heads
from mos_jax.data import Corpus
from mos_jax.errors import ConfigError, DataError

DIRECTORY = "DIR"  # the registry's name of the text-directory source (the fallback)


@dataclasses.dataclass(frozen=True)
class Source:
    """One kind of corpus source.

    Attributes:
      name: an exact source string (`synthetic`), a prefix ending in `:` (`tfds:`,
        the rest of the string goes to the reader), or `DIRECTORY` (any other string).
      description: one line, for help texts and error messages.
      load: the reader: `load(rest, **kwargs) -> Corpus`, `rest` the source string
        without the prefix.
      options: the reader's keyword arguments from a config's data section and the
        resolved vocabulary order: `options(data_section, order) -> dict`.
      orders: whether the reader numbers the vocabulary in `order` itself (given in
        `options`); otherwise the corpus is renumbered after reading.
    """

    name: str
    description: str
    load: Callable[..., Corpus]
    options: Callable[[Any, str], dict]
    orders: bool = False

    @property
    def is_prefix(self) -> bool:
        return self.name.endswith(":")


SOURCES: dict[str, Source] = {}


def register_source(name: str, description: str, load: Callable[..., Corpus],
                    options: Callable[[Any, str], dict] = lambda d, order: {},
                    orders: bool = False) -> Source:
    """Add a source to the registry (see `Source`) and return it."""
    if name in SOURCES:
        raise ValueError(f"corpus source {name!r} is registered twice")
    if "\n" in description:
        raise ValueError(f"the description of source {name!r} must be one line")
    SOURCES[name] = source = Source(name, description, load, options, orders)
    return source


def describe_sources() -> str:
    """One line per registered source: `NAME  description`."""
    width = max(len(s.name) for s in SOURCES.values())
    return "\n".join(f"{s.name:<{width}}  {s.description}" for s in SOURCES.values())


def find_source(source: str) -> tuple[Source, str]:
    """The registered source of the string `source`, and the string its reader gets.

    An exact name wins, then a registered prefix (`tfds:...`); anything else is a
    text directory. A string with an unknown prefix (`tfsd:lm1b`) that is no existing
    path is refused, naming the registered sources.
    """
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"empty corpus source {source!r}: name one of\n"
                        f"{describe_sources()}")
    if source in SOURCES and not SOURCES[source].is_prefix:
        return SOURCES[source], source
    head, colon, rest = source.partition(":")
    if colon and f"{head}:" in SOURCES:
        return SOURCES[f"{head}:"], rest
    if (colon and len(head) > 1 and "/" not in head and "\\" not in head
            and not Path(source).exists()):
        raise DataError(f"unknown corpus source prefix {head + ':'!r} in {source!r} "
                        "(and no such directory): the sources are\n"
                        f"{describe_sources()}")
    return SOURCES[DIRECTORY], source


def load_corpus(source: str, **kwargs) -> Corpus:
    """The corpus of `source`; keyword arguments go to the source's reader
    (`data.synthetic_corpus`, `tfds_corpus.load_tfds_corpus`, `data.read_corpus`)."""
    entry, rest = find_source(source)
    return entry.load(rest, **kwargs)


# ----------------------------------------------------------------------- the config path

def vocab_order(config) -> str:
    """`data.vocab_order` resolved: `auto` is `frequency` when the head class declares
    `wants_frequency_order`, else `first` (the ids of every earlier version)."""
    order = config.data.get("vocab_order", "first")
    if order != "auto":
        return order
    head = heads.get_head(config.model.head)
    return "frequency" if getattr(head, "wants_frequency_order", False) else "first"


def tokenizer_of(config) -> tuple[str, int]:
    """`(data.tokenizer, data.vocab_size)` (`("word", 0)` for configs written before
    them)."""
    return config.data.get("tokenizer", "word"), int(config.data.get("vocab_size", 0))


def load_corpus_from(config) -> Corpus:
    """The corpus of a config: `data.dir` through the registry, with the reader's
    options from the config's data section, its vocabulary in `vocab_order(config)`."""
    problems = config_lib.data_problems(config)  # before anything loads
    if problems:
        raise ConfigError(problems[0])
    entry, rest = find_source(config.data.dir)
    order = vocab_order(config)
    corpus = entry.load(rest, **entry.options(config.data, order))
    return corpus if entry.orders else data.order_vocab(corpus, order)


def corpus_of(source: str, config=None) -> Corpus:
    """The corpus of `source` (a `--data` string) read with the source options of
    `config` (a run's config: its synthetic chain, its TFDS directories; None: the
    defaults), word by word with ids in order of first occurrence (the commands map
    its words into a run's vocabulary by string). Every word is kept: the run's
    `data.min_count` made its own vocabulary, and is not applied to another corpus
    (its rare words are mapped to the run's `<unk>` only if the run lacks them)."""
    config = (config_lib.default_config() if config is None
              else copy.deepcopy(config))
    with config.unlocked():  # a run's config from before the tokenizer keys lacks them
        config.data.dir = source
        config.data.tokenizer, config.data.vocab_size = "word", 0
        config.data.vocab_order = "first"
        config.data.min_count = 0
    return load_corpus_from(config)


# ------------------------------------------------------------------ the built-in sources

def _plain(section) -> dict:
    if section is None:
        return {}
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def _tfds_options(d: Mapping, order: str) -> dict:
    kwargs = {} if order == "first" else {"order": order}
    if d.get("tfds_data_dir"):
        kwargs["data_dir"] = d.get("tfds_data_dir")
    if d.get("tfds_manual_dir"):
        kwargs["manual_dir"] = d.get("tfds_manual_dir")
    return kwargs


def _load_tfds(spec: str, **kwargs) -> Corpus:
    from mos_jax import tfds_corpus  # lazy: imports tensorflow_datasets
    return tfds_corpus.load_tfds_corpus(spec, **kwargs)


def _directory_options(d: Mapping, order: str) -> dict:
    kind, size = d.get("tokenizer", "word"), int(d.get("vocab_size", 0))
    min_count = int(d.get("min_count", 0))
    if kind == "word" and order == "first" and min_count <= 1:
        return {}  # as every earlier version read it
    options = {"tokenizer": kind, "vocab_size": size, "order": order}
    if min_count > 1:
        options["min_count"] = min_count
    return options


register_source(
    "synthetic", "the built-in high-rank Markov corpus (keys data.synthetic.*)",
    lambda _, **kwargs: data.synthetic_corpus(**kwargs),
    lambda d, order: _plain(d.get("synthetic")))
register_source(
    "tfds:", "tfds:NAME[:FEATURE], a prepared TensorFlow Datasets text dataset "
    "(data.tfds_data_dir, data.tfds_manual_dir)", _load_tfds, _tfds_options, orders=True)
register_source(
    DIRECTORY, "a directory holding train.txt, valid.txt, test.txt (`mos-jax download` "
    "fills one), ids cached memory-mapped", data.read_corpus, _directory_options,
    orders=True)
