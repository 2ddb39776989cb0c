"""Experiment configs: Python files whose `get_config()` returns a ConfigDict.

`load_config(path, overrides)` runs the file and applies command-line overrides of the
form `--config.optim.lr=10` or `--config.optim.lr 10`. A key that does not exist is an
error listing the close matches; values are parsed to the type of the key's default.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_collections

from mos_jax.errors import ConfigError

ConfigDict = ml_collections.ConfigDict


def _all_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ConfigDict):
            keys.extend(_all_keys(v, f"{prefix}{k}."))
    return keys


def load_config_file(path: str | Path) -> ConfigDict:
    """Run `path` and return its `get_config()`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file at {path}: pass a Python file with "
                          "get_config(), e.g. configs/ptb.py")
    spec = importlib.util.spec_from_file_location(f"_mos_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"config file {path} failed to run: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    config = module.get_config()
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"get_config() in {path} must return an ml_collections.ConfigDict")
    return config


def _parse_value(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key} takes true or false, got {text!r}")
    if isinstance(default, str):
        return text
    declared = schema().get(key)
    expected = (f"{key} must be {declared.check}" if declared is not None
                else f"it is a {type(default).__name__}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if default is None:
            return text
        if isinstance(default, float):
            try:  # nan, inf: read, then refused by the range check with the key's range
                return float(text)
            except ValueError:
                pass
        raise ConfigError(f"--config.{key}={text}: cannot read {text!r} as a "
                          f"{type(default).__name__}: {expected}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    if default is not None and not isinstance(value, type(default)):
        raise ConfigError(f"--config.{key}={text} is not a {type(default).__name__}: "
                          f"{expected}")
    return value


def set_value(config: ConfigDict, key: str, text: str) -> None:
    """Set dotted `key` from its string form; unknown keys raise ConfigError."""
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            known = _all_keys(config)
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = (f" Close matches: {', '.join('--config.' + c for c in close)}."
                    if close else "")
            raise ConfigError(f"unknown config key --config.{key}.{hint}")
        if depth < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    if isinstance(node[leaf], ConfigDict):
        raise ConfigError(f"--config.{key} is a section; set one of its keys, e.g. "
                          f"--config.{key}.{next(iter(node[leaf].keys()), '...')}")
    with node.unlocked():
        node[leaf] = _parse_value(key, text, node[leaf])


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """`--config.a.b=v` and `--config.a.b v` pairs from a list of arguments."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like "
                              "--config.optim.lr=10")
        body = arg[len("--config."):]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            key, value = body, args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def apply_overrides(config: ConfigDict, overrides: Sequence[tuple[str, str]]) -> ConfigDict:
    for key, value in overrides:
        set_value(config, key, value)
    return config


def load_config(path: str | Path, overrides: Sequence[tuple[str, str]] = ()) -> ConfigDict:
    """The config of file `path` with `overrides`, every value checked (`validate`)."""
    config = load_config_file(path)
    apply_overrides(config, overrides)
    validate(config)
    config.lock()
    return config


def encoder_switch_note(path: str | Path, config: ConfigDict,
                        encoder: str | None = None, flag: str = "--config") -> str | None:
    """One line for stderr when `encoder` (default: `config.model.encoder`) is not the
    encoder the config file `path` was written for, else None.

    `config` is the file's config with the command's overrides; its optimiser settings
    come from the file, tuned (if at all) for the file's own encoder, and an override
    of `model.encoder` changes nothing else. The note says so and names the config
    written for `encoder` beside `path` when there is one (`tiny.py` <->
    `tiny_transformer.py`, `ptb_study_lstm.py` -> `ptb_study_transformer.py`: see
    `sibling_config`), as the command's option `flag` that gives `encoder` its config
    (`mos-jax study`: `--transformer-config` for the Transformer).
    """
    path = Path(path)
    written = str(load_config_file(path).model.encoder)
    encoder = str(config.model.encoder if encoder is None else encoder)
    if encoder == written:
        return None
    o = config.optim
    settings = f"optim.name={o.name}, optim.lr={o.lr:g}"
    if o.warmup_steps or o.decay_steps:
        settings += f", optim.warmup_steps={o.warmup_steps}, optim.decay_steps={o.decay_steps}"
    other = sibling_config(path, encoder)
    advice = (f"use {flag} {other}, written for the {encoder} encoder" if other else
              f"no config for the {encoder} encoder sits beside it, so set optim.* for it")
    return (f"note: {path} is written for the {written} encoder; with "
            f"model.encoder={encoder} its optimiser settings ({settings}) are kept "
            f"from the file unchanged: {advice}")


def sibling_config(path: str | Path, encoder: str) -> Path | None:
    """The config file beside `path` written for `encoder`, by name: of `path`'s stem
    `BASE[_finetune]`, with any encoder's name dropped from the end of BASE,
    `BASE_{encoder}[_finetune].py` or else `BASE[_finetune].py`, if it exists and
    sets `model.encoder` to `encoder`."""
    path = Path(path)
    stem, suffix = path.stem, ""
    if stem.endswith("_finetune"):
        stem, suffix = stem[:-len("_finetune")], "_finetune"
    for name in _encoders():
        if stem.endswith(f"_{name}"):
            stem = stem[:-len(name) - 1]
            break
    for candidate in (path.with_name(f"{stem}_{encoder}{suffix}.py"),
                      path.with_name(f"{stem}{suffix}.py")):
        if candidate.resolve() == path.resolve() or not candidate.is_file():
            continue
        try:
            if str(load_config_file(candidate).model.encoder) == encoder:
                return candidate
        except ConfigError:  # a broken neighbour is not this command's concern
            continue
    return None


def parse_int_list(text: str | Sequence[int], what: str, example: str, minimum: int,
                   too_small: str = "", skip_empty: bool = True) -> list[int]:
    """Whole numbers from "8,16" (or a list), distinct and at least `minimum`, in the
    given order; anything else is one ConfigError naming `what` (e.g. "width") and
    showing `example` (e.g. "--widths 8,16,32"). `too_small` says why the minimum;
    empty items ("8,,16") are skipped, or refused without `skip_empty`."""
    items = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for item in items:
        item = str(item).strip()
        if not item:
            if skip_empty:
                continue
            raise ConfigError(f"an empty item in {text!r}: give {what}s like {example}")
        try:
            n = int(item)
        except ValueError:
            raise ConfigError(f"{what} {item!r} is not a whole number: give {what}s like "
                              f"{example}") from None
        if n < minimum:
            raise ConfigError(f"{what} {n} is too small: {too_small or what + 's'} must "
                              f"be at least {minimum} ({example})")
        if n in values:
            raise ConfigError(f"{what} {n} given twice: list each {what} once ({example})")
        values.append(n)
    if not values:
        raise ConfigError(f"give at least one {what}, e.g. {example}")
    return values


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ConfigDict:
    config = ConfigDict(json.loads(text))
    config.lock()
    return config


# --------------------------------------------------------------------------------------
# Every key: its default, what it may hold and what it means, declared once. The default
# config, the checks run before any work and the reference (`docs/config.md`, printed by
# `mos-jax config --reference`) are all read from these declarations.

class Check:
    """What a key may hold: `ok(value)` and a phrase for messages ("an integer >= 1")."""

    text = ""

    def ok(self, value) -> bool:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.text


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


class Int(Check):
    """An integer in [lo, hi] (None: unbounded), or one of `also` (special values)."""

    def __init__(self, lo: int | None = None, hi: int | None = None, also: tuple = (),
                 meaning: str = ""):
        self.lo, self.hi, self.also = lo, hi, also
        parts = ["an integer"]
        if lo is not None and hi is not None:
            parts = [f"an integer in [{lo}, {hi}]"]
        elif lo is not None:
            parts.append(f">= {lo}")
        elif hi is not None:
            parts.append(f"<= {hi}")
        text = " ".join(parts)
        if also:
            text += ", or " + " or ".join(str(a) for a in also) + (f" ({meaning})"
                                                                   if meaning else "")
        self.text = text

    def ok(self, value) -> bool:
        if not _is_int(value):
            return False
        if value in self.also:
            return True
        return ((self.lo is None or value >= self.lo)
                and (self.hi is None or value <= self.hi))


class Real(Check):
    """A finite number in a range; `open_lo` / `open_hi` exclude the bound."""

    def __init__(self, lo: float | None = None, hi: float | None = None,
                 open_lo: bool = False, open_hi: bool = False):
        self.lo, self.hi, self.open_lo, self.open_hi = lo, hi, open_lo, open_hi
        if lo is not None and hi is not None:
            self.text = (f"a number in {'(' if open_lo else '['}{lo:g}, "
                         f"{hi:g}{')' if open_hi else ']'}")
        elif lo is not None:
            self.text = f"a number {'>' if open_lo else '>='} {lo:g}"
        elif hi is not None:
            self.text = f"a number {'<' if open_hi else '<='} {hi:g}"
        else:
            self.text = "a finite number"

    def ok(self, value) -> bool:
        if not _is_number(value):
            return False
        if self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.open_hi else value > self.hi):
            return False
        return True


class Bool(Check):
    text = "true or false"

    def ok(self, value) -> bool:
        return isinstance(value, bool)


class Text(Check):
    """A string; `nonempty` refuses ""."""

    def __init__(self, nonempty: bool = False):
        self.nonempty = nonempty
        self.text = "a non-empty string" if nonempty else "a string"

    def ok(self, value) -> bool:
        return isinstance(value, str) and (bool(value.strip()) or not self.nonempty)


class OneOf(Check):
    """One of a fixed list of strings, or of a registry's names (`names`, a callable
    asked at check time, so heads and optimisers registered later count too)."""

    def __init__(self, *choices: str, names: Callable[[], Sequence[str]] | None = None,
                 what: str = "", listed: bool = False):
        self.choices, self.names, self.listed = choices, names, listed
        self.text = (self.describe_now() if choices else f"a name of {what}")

    def allowed(self) -> list[str]:
        return list(self.choices) if self.names is None else sorted(self.names())

    def ok(self, value) -> bool:
        return isinstance(value, str) and value in self.allowed()

    def describe_now(self) -> str:
        return "one of " + ", ".join(c or '""' for c in self.allowed())


class VocabChunk(Check):
    text = "auto, fused, 0 (whole logits) or a chunk size >= 1 (words)"

    def ok(self, value) -> bool:
        if _is_int(value):
            return value >= 0
        if not isinstance(value, str):
            return False
        value = value.strip().lower()
        return value in ("auto", "fused") or (value.isdigit())


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: its default, its `Check`, and what it means."""

    default: Any
    check: Check
    doc: str


def _heads() -> list[str]:
    from mos_jax import heads
    heads.load_plugins()
    return list(heads.HEADS)


def _rule(logical: str) -> OneOf:
    """The check of `parallel.rules.<logical>`: the mesh axes are `mos_jax.parallel`'s
    (asked at check time, so this schema names none of its own)."""
    def names() -> list[str]:
        from mos_jax import parallel
        return list(parallel.rule_axes(logical))
    return OneOf(names=names, what=f"the mesh axes a {logical} rule may name", listed=True)


class _HeadOptionCheck(Check):
    """The check a head declares for one of its options (`mos_jax.heads.HeadOption`)."""

    def __init__(self, option):
        self.option, self.text = option, option.allowed

    def ok(self, value) -> bool:
        return bool(self.option.ok(value))


def _head_option_keys() -> dict:
    """`model.heads`: one section per head that declares options (`Head.options`)."""
    from mos_jax import heads
    heads.load_plugins()
    return {name: {key: Key(opt.default, _HeadOptionCheck(opt), opt.doc)
                   for key, opt in cls.options.items()}
            for name, cls in heads.HEADS.items() if cls.options}


def _section_doc(name: str) -> str:
    if name == "model.heads":
        return ("each head's own options, `model.heads.HEAD.KEY` (declared by the head "
                "class, `Head.options`); only the selected head's section is read")
    if name.startswith("model.heads."):
        from mos_jax import heads
        head = name.split(".")[-1]
        return f"options of the `{head}` head ({heads.HEADS[head].__module__})"
    return _SECTION_DOCS[name]


def _encoders() -> list[str]:
    from mos_jax import model
    return list(model.ENCODERS)


def _optimizers() -> list[str]:
    from mos_jax import optim
    return list(optim.OPTIMIZERS)


def _strategies() -> list[str]:
    from mos_jax import parallel
    return list(parallel.STRATEGIES)


_RATE = Real(0.0, 1.0, open_hi=True)  # a dropout rate, [0, 1)
_COUNT = Int(1)
_SECTION_DOCS = {
    "data": "the corpus and how it is cut into batches and windows",
    "data.synthetic": "the built-in synthetic corpus (data.dir = synthetic): a random "
                      "first-order Markov chain with a high-rank log-transition matrix "
                      "(dense: full rank; zipf: sparse rows, Zipfian frequencies)",
    "model": "the architecture: encoder, head, sizes, dropout rates, numerics",
    "optim": "the optimiser, its learning rate and the NT-ASGD switch",
    "train": "the training loop: seed, epochs, stops, checkpoints, logging",
    "finetune": "the finetune stage (`mos-jax finetune`)",
    "parallel": "placement over devices and hosts (mos_jax.parallel)",
    "parallel.mesh": "the device mesh: its `data` axis splits batch columns, its `model` "
                     "axis the vocabulary (data x model = the devices)",
    "parallel.rules": "logical axis -> mesh axis: where each named axis of the "
                      "parameters and batches is split (\"\": replicated)",
}


def declarations() -> dict:
    """Every key of the config, as nested dicts of `Key`s (sections are dicts)."""
    return {
        "data": {
            "dir": Key("data/ptb", Text(nonempty=True),
                       "a corpus directory (train.txt, valid.txt, test.txt), "
                       "`synthetic`, or `tfds:NAME[:FEATURE]`"),
            "batch_size": Key(12, _COUNT, "training columns (the batch)"),
            "small_batch_size": Key(-1, Int(1, also=(-1, 0), meaning="no accumulation"),
                                    "columns per gradient-accumulation group; it must "
                                    "divide each device's columns"),
            "eval_batch_size": Key(10, _COUNT, "validation columns"),
            "test_batch_size": Key(1, _COUNT, "test columns"),
            "bptt": Key(70, _COUNT, "the mean training window length, and the "
                        "evaluation window length"),
            "max_seq_len_delta": Key(40, Int(0), "random window lengths are capped at "
                                     "bptt + this"),
            "tokenizer": Key("word", OneOf("word", "bpe", "unigram"),
                             "word: whitespace words and <eos>; bpe or unigram: "
                             "data.vocab_size subword pieces trained on the training "
                             "split of a corpus directory (docs/training.md)"),
            "vocab_size": Key(0, Int(0), "subword pieces of a bpe or unigram tokenizer; "
                              "0 (and only 0) with the word tokenizer, whose vocabulary "
                              "is the corpus's words"),
            "min_count": Key(0, Int(0), "word vocabulary of a corpus directory: words "
                             "seen fewer times in train.txt become <unk> (the One Billion "
                             "Word benchmark's vocabulary: 3); 0: every word"),
            "vocab_order": Key("auto", OneOf("auto", "first", "frequency"),
                               "ids in order of first occurrence (subwords: the "
                               "tokenizer's), or by training-split frequency; auto: "
                               "frequency when the head asks for it "
                               "(wants_frequency_order), else first"),
            "synthetic": {
                "vocab_size": Key(500, Int(2), "words of the chain"),
                "train_tokens": Key(200_000, Int(2), "tokens of the train split"),
                "valid_tokens": Key(20_000, Int(2), "tokens of the valid split"),
                "test_tokens": Key(20_000, Int(2), "tokens of the test split"),
                "peakedness": Key(2.0, Real(0.0), "standard deviation of the transition "
                                  "logits: larger is sharper"),
                "seed": Key(0, Int(0), "the chain and its samples"),
                "structure": Key("dense", OneOf("dense", "zipf"),
                                 "dense: V x V Gaussian logits (V <= 10,000); zipf: "
                                 "sparse, Zipfian frequencies, O(V successors) (V up to "
                                 "hundreds of thousands; ids in decreasing frequency)"),
                "zipf_exponent": Key(1.0, Real(0.0, open_lo=True),
                                     "zipf: s of the unigram u_j ~ (j + 1)^-s"),
                "successors": Key(32, _COUNT, "zipf: successor words drawn from u for "
                                  "each word (at most vocab_size)"),
                "smoothing": Key(0.1, Real(0.0, 1.0), "zipf: eps of P = (1 - eps) S + "
                                 "eps u (the chance the next word is drawn from u)"),
                "successor_peakedness": Key(1.0, Real(0.0), "zipf: standard deviation "
                                            "of the logits over a word's successors"),
            },
            "tfds_data_dir": Key("", Text(), "TFDS data_dir (empty: TFDS's default)"),
            "tfds_manual_dir": Key("", Text(), "the manual_dir of tfds:mos_jax_ptb and "
                                   "tfds:mos_jax_wikitext2"),
        },
        "model": {
            "emsize": Key(280, _COUNT, "embedding width"),
            "nhid": Key(960, _COUNT, "LSTM width of the layers below the last"),
            "nhidlast": Key(620, _COUNT, "LSTM width of the last layer (the head's input)"),
            "nlayers": Key(3, _COUNT, "encoder layers"),
            "head": Key("mos", OneOf(names=_heads, what="a registered head "
                                     "(mos_jax.heads.HEADS)"),
                        "the output head"),
            "n_experts": Key(15, _COUNT, "mixture components of the mos and moc heads"),
            "dropout": Key(0.4, _RATE, "locked dropout on the last layer's output"),
            "dropouth": Key(0.225, _RATE, "locked dropout between LSTM layers"),
            "dropouti": Key(0.4, _RATE, "locked dropout on the embedding output"),
            "dropoute": Key(0.1, _RATE, "embedding dropout (whole words)"),
            "dropoutl": Key(0.29, _RATE, "dropout on the MoS latent vectors"),
            "wdrop": Key(0.5, _RATE, "DropConnect on the recurrent matrices"),
            "compute_dtype": Key("auto", OneOf("auto", "float32", "bfloat16", "float16"),
                                 "matmul operands; auto: float32 on CPU, bfloat16 on "
                                 "GPU/TPU"),
            "vocab_chunk": Key("auto", VocabChunk(),
                               "the head's path: 0 whole logits, N streamed over N-word "
                               "chunks, fused, or auto (by size)"),
            "vocab_multiple": Key(1, _COUNT,
                                  "pad the vocabulary-sized parameters to V rounded up "
                                  "to a multiple of this (the padded rows are never a "
                                  "word), so any model size dividing it can split them: "
                                  "e.g. parallel.mesh.model or 128; 1: none"),
            "encoder": Key("lstm", OneOf(names=_encoders, what="an encoder "
                                         "(mos_jax.model.ENCODERS)"),
                           "`lstm` (AWD-LSTM) or `transformer` (the keys below, with "
                           "nlayers, emsize and dropoute)"),
            "n_heads": Key(4, _COUNT, "Transformer attention heads"),
            "d_model": Key(0, Int(0), "Transformer width; 0: emsize"),
            "d_ff": Key(0, Int(0), "Transformer feed-forward width; 0: 4 d_model"),
            "attn_dropout": Key(0.1, _RATE, "Transformer attention dropout"),
            "resid_dropout": Key(0.1, _RATE, "Transformer residual dropout"),
            "eval_stride": Key(0, Int(0), "Transformer evaluation: sliding-window "
                               "stride; 0: bptt // 2"),
            "heads": _head_option_keys(),
        },
        "optim": {
            "lr": Key(20.0, Real(0.0), "learning rate (scaled by seq_len / bptt)"),
            "clip": Key(0.25, Real(0.0), "global-norm gradient clipping; 0: none"),
            "wdecay": Key(1.2e-6, Real(0.0), "weight decay"),
            "alpha": Key(2.0, Real(0.0), "activation regularisation (AR)"),
            "beta": Key(1.0, Real(0.0), "temporal activation regularisation (TAR)"),
            "nonmono": Key(5, _COUNT, "the non-monotone trigger's window (NT-ASGD, and "
                           "finetune's stop)"),
            "asgd": Key(True, Bool(), "switch to averaged SGD by the non-monotone "
                        "trigger"),
            "name": Key("sgd", OneOf(names=_optimizers, what="an optimiser "
                                     "(mos_jax.optim.OPTIMIZERS)"),
                        "sgd (the paper's), momentum, adam, adamw"),
            "momentum": Key(0.9, Real(0.0, 1.0, open_hi=True), "momentum"),
            "nesterov": Key(False, Bool(), "Nesterov momentum"),
            "b1": Key(0.9, Real(0.0, 1.0, open_hi=True), "Adam's b1"),
            "b2": Key(0.999, Real(0.0, 1.0, open_hi=True), "Adam's b2"),
            "eps": Key(1e-8, Real(0.0, open_lo=True), "Adam's eps"),
            "warmup_steps": Key(0, Int(0), "linear learning-rate warm-up steps"),
            "decay_steps": Key(0, Int(0), "cosine decay steps after the warm-up; 0: none"),
            "min_lr_ratio": Key(0.0, Real(0.0, 1.0), "the learning rate at the end of "
                                "the decay, as a fraction"),
        },
        "train": {
            "seed": Key(28, Int(0), "the one root of all randomness"),
            "max_epochs": Key(1000, _COUNT, "training epochs"),
            "time_budget_s": Key(0.0, Real(0.0), "stop (with a checkpoint) after this "
                                 "much wall time; 0: none"),
            "stop_at_step": Key(0, Int(0), "stop (with a checkpoint) at this global "
                                "step; 0: never"),
            "steps_per_epoch": Key(0, Int(0), "cap on the windows of an epoch; 0: all"),
            "checkpoint_every_s": Key(600.0, Real(0.0), "mid-epoch checkpoint "
                                      "cadence; 0: after every step"),
            "log_every_steps": Key(20, _COUNT, "steps between progress lines"),
            "eval_max_tokens": Key(0, Int(2, also=(0,), meaning="all"),
                                   "validate on only the first N tokens"),
            "test": Key(True, Bool(), "a final test of the best weights"),
            "min_improvement": Key(0.0, Real(0.0), "early stopping: end training when "
                                   "the best validation perplexity improved by less "
                                   "than this fraction (0.01: 1%) per epoch over the "
                                   "last `patience` epochs; 0: off"),
            "patience": Key(1, _COUNT, "early stopping: the epochs that "
                            "`min_improvement` looks back over"),
        },
        "finetune": {
            "init_from": Key("", Text(), "the training work directory whose best weights "
                             "start finetuning"),
            "lr": Key(25.0, Real(0.0), "finetune learning rate"),
            "max_epochs": Key(500, _COUNT, "finetune epochs"),
        },
        "parallel": {
            "strategy": Key("mesh", OneOf(names=_strategies, what="a strategy "
                                          "(mos_jax.parallel.STRATEGIES)"),
                            "mesh (jit + shard_map over the [data, model] mesh) or none "
                            "(one device); pmap was removed: mesh computes its numbers"),
            "num_devices": Key(0, Int(0), "devices per process; 0: all local devices"),
            "coordinator_address": Key("", Text(), "multi-host: process 0's host:port; "
                                       "empty: JAX_COORDINATOR_ADDRESS, else one process; "
                                       "auto: JAX's cluster detection"),
            "num_processes": Key(0, Int(0), "multi-host: 0 from JAX_NUM_PROCESSES or "
                                 "detection"),
            "process_id": Key(-1, Int(-1), "multi-host: -1 from JAX_PROCESS_ID or "
                              "detection"),
            "mesh": {
                "data": Key(-1, Int(1, also=(-1,)), "devices along the data axis (batch "
                            "columns); -1: the devices the model axis leaves"),
                "model": Key(1, Int(1), "devices along the model axis, splitting the "
                             "vocabulary (the tied embedding and the head's "
                             "vocabulary-sized parameters) into blocks of rows"),
            },
            "rules": {
                "batch": Key("data", _rule("batch"), "mesh axis of batch columns"),
                "vocab": Key("model", _rule("vocab"), "mesh axis of vocabulary rows "
                             "(the embedding's, the head's decoder bias); \"\": "
                             "replicated"),
            },
        },
    }


@functools.lru_cache(maxsize=1)
def schema() -> dict[str, Key]:
    """Every key by its dotted name ("data.bptt"); built once (do not modify it)."""
    out: dict[str, Key] = {}

    def walk(tree: dict, prefix: str) -> None:
        for name, node in tree.items():
            if isinstance(node, dict):
                walk(node, f"{prefix}{name}.")
            else:
                out[prefix + name] = node
    walk(declarations(), "")
    return out


def _defaults(tree: dict) -> ConfigDict:
    return ConfigDict({name: _defaults(node) if isinstance(node, dict) else node.default
                       for name, node in tree.items()})


def default_config() -> ConfigDict:
    """Every key there is, at its declared default (the paper's PTB values;
    docs/reference.md section 5).

    Config files start from this and change what differs, so a typo in an override or a
    config file is caught against one complete list of keys.
    """
    return _defaults(declarations())


def flat_values(config, prefix: str = "") -> dict[str, Any]:
    """`{"section.key": value}` of a config (a ConfigDict or a plain nested dict, such
    as a `config.json`), every nested section flattened into dotted keys."""
    out = {}
    for name, value in config.items():
        if isinstance(value, (ConfigDict, dict)):
            out.update(flat_values(value, f"{prefix}{name}."))
        else:
            out[prefix + name] = value
    return out


def problems(config, unknown_ok: bool = False) -> list[str]:
    """One line per key of `config` whose value its declaration does not allow (and per
    key no declaration knows, unless `unknown_ok`)."""
    keys = schema()
    found = []
    for name, value in flat_values(config).items():
        key = keys.get(name)
        if key is None:
            if not unknown_ok:
                close = difflib.get_close_matches(name, list(keys), n=1, cutoff=0.6)
                found.append(f"unknown config key {name}" + (
                    f" (did you mean {close[0]}?)" if close else "") +
                    ": remove it from the config file")
            continue
        if not key.check.ok(value):
            if isinstance(key.check, OneOf):
                found.append(f"--config.{name}={value!r} is not allowed: {name} must be "
                             f"{key.check.describe_now()} ({key.doc})")
            else:
                found.append(f"--config.{name}={value!r} is out of range: {name} must "
                             f"be {key.check} ({key.doc})")
    if not found:
        found.extend(data_problems(config))
    return found


def data_problems(config) -> list[str]:
    """The data keys that only make sense together (tokenizer, vocab_size, source)."""
    data = config.get("data") if hasattr(config, "get") else None
    if data is None or "tokenizer" not in data:
        return []
    kind, size = data.get("tokenizer"), data.get("vocab_size", 0)
    source = str(data.get("dir", ""))
    min_count = int(data.get("min_count", 0))
    if min_count > 1 and (kind != "word" or source == "synthetic"
                          or source.startswith("tfds:")):
        what = (f"data.tokenizer={kind}" if kind != "word" else
                "the synthetic corpus" if source == "synthetic" else source)
        return [f"--config.data.min_count={min_count} applies to the word vocabulary of a "
                f"corpus directory, not to {what}: drop it (0)"]
    if kind == "word" and size:
        return [f"--config.data.vocab_size={size} is ignored by data.tokenizer=word (its "
                "vocabulary is the corpus's words): drop it, or choose a subword "
                "tokenizer with --config.data.tokenizer=bpe or unigram"]
    if kind in ("bpe", "unigram"):
        if source == "synthetic" or source.startswith("tfds:"):
            what = "the synthetic corpus" if source == "synthetic" else source
            return [f"--config.data.tokenizer={kind} cannot read {what}: subword "
                    "vocabularies are trained on a corpus directory's text "
                    "(train.txt, ...); use --config.data.tokenizer=word with it"]
        if not size:
            return [f"--config.data.tokenizer={kind} needs the number of subword pieces: "
                    "add --config.data.vocab_size=N (e.g. 8000)"]
    return []


def validate(config, unknown_ok: bool = False) -> None:
    """Raise one ConfigError naming the first key out of its declared range (the key,
    the value, the range and what the key means), before any corpus or compile."""
    found = problems(config, unknown_ok)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ConfigError(found[0] + more)


def reference_markdown() -> str:
    """The reference of every config key (docs/config.md), from the declarations."""
    lines = ["# Config keys", "",
             "Generated from the declarations in `mos_jax/config.py` by "
             "`mos-jax config --reference`; a test keeps this file equal to it. Set any "
             "key on the command line with `--config.SECTION.KEY=VALUE`; every value is "
             "checked against its range before a corpus loads or anything compiles. "
             "`mos-jax config --config FILE [overrides]` prints a resolved config.", ""]

    def table(tree: dict, prefix: str) -> None:
        rows = [(n, k) for n, k in tree.items() if not isinstance(k, dict)]
        lines.extend([f"## `{prefix.rstrip('.')}`: {_section_doc(prefix.rstrip('.'))}",
                      ""])
        if rows:
            lines.extend(["| key | default | allowed | meaning |", "|---|---|---|---|"])
        for name, key in rows:
            allowed = str(key.check)
            if isinstance(key.check, OneOf) and key.check.listed:
                allowed = key.check.describe_now()  # names fixed by code, not plugins
            default = json.dumps(key.default)
            lines.append(f"| `{prefix}{name}` | `{default}` | {allowed} | "
                         f"{key.doc.replace('|', '/')} |")
        if rows:
            lines.append("")
        for name, node in tree.items():
            if isinstance(node, dict):
                table(node, f"{prefix}{name}.")

    for section, tree in declarations().items():
        table(tree, f"{section}.")
    return "\n".join(lines).rstrip() + "\n"
