"""Work-directory compatibility: whether a config may continue the run in a directory.

Before a run starts or resumes, its config is held against what the work directory (and,
for a finetune, the training run it starts from) recorded: `config_changes` against the
`config.json` beside checkpoints (a change of the model, the data layout or the
optimiser is refused, any other change reported), `check_vocabulary` against the
recorded `vocab.json`, `check_finetune_source` against the source run's model, and
`finetune_data` takes the data section of the run a finetune continues. `saved_config`
is what `config.json` keeps of a config. Nothing here trains: `mos_jax.train` asks these
in its set-up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import jax

from mos_jax import config as config_lib
from mos_jax import data as data_lib
from mos_jax import model as model_lib
from mos_jax import parallel
from mos_jax.errors import CheckpointError, ConfigError, DataError, MosJaxError
from mos_jax.sources import tokenizer_of

# Keys that belong to one launch, not to the run: config.json keeps them at their
# defaults, and a resume neither compares them nor re-applies an earlier launch's value
# (a stop step kept there would stop every continuation one step later).
LAUNCH_KEYS = {"train.stop_at_step": 0,
               **{f"parallel.{k}": v for k, v in parallel.CLUSTER_DEFAULTS.items()}}
# The data keys that fix the vocabulary, the batch layout or the carry's shape.
LAYOUT_DATA = ("dir", "batch_size", "bptt", "small_batch_size", "synthetic")


def has_work(workdir: Path, subdirs: tuple = ("checkpoints", "best")) -> bool:
    """Whether `workdir` holds a checkpoint (a step directory in one of `subdirs`)."""
    return any(p.is_dir() and p.name.isdigit()
               for sub in subdirs if (workdir / sub).is_dir()
               for p in (workdir / sub).iterdir())


def saved_data(data: dict) -> dict:
    """The data section of a `config.json` with the synthetic-corpus keys added later
    (data.synthetic.structure, ...) at their defaults: a run started before them used
    what those defaults describe."""
    if not isinstance(data.get("synthetic"), dict):
        return data
    declared = config_lib.default_config().data.synthetic.to_dict()
    return {**data, "synthetic": {**declared, **data["synthetic"]}}


def saved_config(config) -> dict:
    """What `config.json` keeps of `config`: the run's keys, launch keys at defaults."""
    saved = json.loads(config_lib.to_json(config))
    for key, default in LAUNCH_KEYS.items():
        section, name = key.split(".")
        if name in saved.get(section, {}):
            saved[section][name] = default
    return saved


def finetune_data(config, workdir: Path, data_given: Sequence[str],
                  log: Callable[[str], None]):
    """`config` with the data section of the run this finetune continues.

    The corpus and its layout belong to the training run: a finetune takes every data
    key from the `config.json` of `finetune.init_from` (of its own work directory when
    resuming its checkpoints), except the keys in `data_given` (`dir`, `bptt`, ...: those
    the caller set, e.g. the command's --config.data.* overrides). So a finetune config
    whose `data.dir` is its file's placeholder finetunes on the corpus the run was
    trained on. Says so in one line when a key changes; without such a file (weights
    copied without it) the config is kept as given.
    """
    own = workdir / "config.json"
    if own.is_file() and has_work(workdir, ("checkpoints",)):
        path = own
    elif config.finetune.init_from:
        path = Path(config.finetune.init_from) / "config.json"
    else:
        return config  # check_finetune_source says what is missing
    try:
        theirs = json.loads(path.read_text()).get("data")
    except (OSError, ValueError):
        return config
    if not isinstance(theirs, dict):
        return config
    theirs = saved_data(theirs)
    ours = config.data.to_dict()
    given = {key.split(".")[0] for key in data_given}
    taken = {key: value for key, value in theirs.items()
             if key in ours and key not in given and ours[key] != value}
    if not taken:
        return config
    whole = config.to_dict()
    whole["data"].update(taken)
    new = config_lib.ConfigDict(whole)
    new.lock()
    log(f"finetune: the data of the run, from {path}: " + "; ".join(
        f"data.{key} {value!r} (this config: {ours[key]!r})"
        for key, value in taken.items())
        + "; give --config.data.dir (Python: data_given=('dir',)) to finetune on "
        "another corpus")
    return new


# Model keys added after runs were saved: what a config.json without them ran with.
_SINCE = {("model", "vocab_multiple"): 1}  # no padding


def config_changes(config, workdir: Path, log: Callable[[str], None]) -> dict:
    """Check `config` against the `config.json` of a run that has checkpoints.

    A change of the model, of the data layout (`LAYOUT_DATA`) or of `optim.name` is
    refused (the checkpoints could not continue); any other change is returned as
    `{key: (old, new)}` (launch keys aside) for the run to report when it starts. A
    `config.json` beside no checkpoint (a start that failed before saving anything)
    binds nothing.
    """
    path = workdir / "config.json"
    if not path.is_file():
        return {}
    if not has_work(workdir):
        log(f"{path} is from a start that saved no checkpoint: it will be replaced")
        return {}
    old = json.loads(path.read_text())
    new = config.to_dict()
    old_data = old.get("data", {})
    was = (old_data.get("tokenizer", "word"), old_data.get("vocab_size", 0))
    if was != tokenizer_of(config):
        def name(kind, size):
            return f"{kind} {size}" if kind != "word" else "word"
        raise ConfigError(
            f"this run was trained with tokenizer {name(*was)}; "
            f"--config.data.tokenizer={config.data.tokenizer} "
            f"--config.data.vocab_size={config.data.vocab_size} gives other ids: resume "
            f"it with its own config (omit --config), or use a new --workdir ({workdir})")
    # The optimiser's state is in the checkpoints (runs from before optim.name: sgd).
    old_name = old.get("optim", {}).get("name", "sgd")
    if old_name != new.get("optim", {}).get("name", "sgd"):
        raise ConfigError(
            f"{workdir} was started with optim.name={old_name!r}, not "
            f"{new['optim']['name']!r}, and its checkpoints hold that optimiser's "
            "state: resume it with its own config (omit --config), or use a new "
            "--workdir")
    if isinstance(old.get("data"), dict):
        old["data"] = saved_data(old["data"])
    for section in ("model", "data"):
        for key, value in new.get(section, {}).items():
            if section == "data" and key not in LAYOUT_DATA:
                continue
            if section == "model" and key == "heads":
                # only the selected head's options; a run from before model.heads
                # could not select a head that has any
                head = new["model"].get("head")
                theirs = old["model"].get("heads", {}).get(head, value.get(head))
                if theirs != value.get(head):
                    raise ConfigError(
                        f"{workdir} was started with model.heads.{head}={theirs!r}, not "
                        f"{value.get(head)!r}: resume it with its own config (omit "
                        "--config), or use a new --workdir")
                continue
            was = old.get(section, {}).get(key, _SINCE.get((section, key)))
            if was != value:
                raise ConfigError(
                    f"{workdir} was started with {section}.{key}="
                    f"{was!r}, not {value!r}: resume it "
                    "with its own config (omit --config), or use a new --workdir")
    old_flat = config_lib.flat_values(old)
    new_flat = config_lib.flat_values(saved_config(config))
    return {key: (old_flat[key], value) for key, value in new_flat.items()
            if key in old_flat and key not in LAUNCH_KEYS and old_flat[key] != value}


def check_vocabulary(config, workdir: Path, mode: str, corpus: data_lib.Corpus) -> None:
    """The corpus must have the vocabulary, in the same order, that the run in `workdir`
    recorded (a resume) and, for a finetune, that its `init_from` run recorded: the
    weights were trained on those ids."""
    sources = [(workdir, "this run")]
    if mode == "finetune" and config.finetune.init_from:
        sources.append((Path(config.finetune.init_from), "the run it finetunes"))
    for directory, who in sources:
        if directory == workdir and not has_work(workdir):
            continue  # a start that saved nothing binds nothing (see config_changes)
        recorded = data_lib.load_vocab(directory)
        if recorded is None or recorded == corpus.vocab:
            continue
        same_words = set(recorded) == set(corpus.vocab)
        raise DataError(
            f"{corpus.name} does not give the word ids {directory} ({who}) was trained "
            f"with: its vocabulary ({corpus.vocab_size:,} words) "
            + ("holds the same words in another order (the training text or "
               "data.vocab_order changed)"
               if same_words else f"differs from the recorded {len(recorded):,} words")
            + f" ({directory / data_lib.VOCAB_FILE}). Train on the corpus the run used "
            "(--config.data.dir), or use a new --workdir")


def describe_model(model: dict) -> str:
    return ", ".join(f"{k}={model.get(k)}" for k in
                     ("head", "nlayers", "emsize", "nhid", "nhidlast", "n_experts"))


def matching_configs(model: dict, pattern: str = "*_finetune.py") -> list[str]:
    """The config files of the repository's `configs/` (matching `pattern`) whose
    model section equals `model` (a config's `model` as a dict)."""
    directory = Path(__file__).resolve().parents[1] / "configs"
    names = []
    for path in sorted(directory.glob(pattern)):
        try:
            if config_lib.load_config_file(path).model.to_dict() == model:
                names.append(f"configs/{path.name}")
        except MosJaxError:
            continue
    return names


def param_shapes(model: dict, vocab_size: int = 7):
    """The parameter shapes of a model section (by default a small vocabulary: only the
    shapes that do not depend on the corpus decide; give the run's own size where
    `model.vocab_multiple` may pad it)."""
    try:
        mc = model_lib.ModelConfig.from_dict({**model, "vocab_size": vocab_size})
    except (MosJaxError, TypeError, ValueError):
        return None
    return jax.tree_util.tree_map(lambda x: x.shape, jax.eval_shape(
        lambda: model_lib.init_params(mc, jax.random.key(0))))


def check_finetune_source(config) -> None:
    """Before any work: `finetune.init_from` is a training run with best weights, of
    the model `config` describes (else say which finetune config matches it)."""
    source = config.finetune.init_from
    if not source:
        raise ConfigError("finetuning starts from a training run: set "
                          "--config.finetune.init_from to its work directory")
    if not (Path(source) / "best").is_dir():
        raise CheckpointError(f"{source} has no best weights (best/): is it the work "
                              "directory of a `mos-jax train` run that finished an epoch?")
    path = Path(source) / "config.json"
    if not path.is_file():
        return  # the checkpoint's shapes are checked when it is restored
    trained = json.loads(path.read_text()).get("model", {})
    trained.setdefault("vocab_multiple", 1)  # a run from before the key: unpadded
    wanted = config.model.to_dict()
    # the run's own vocabulary size where it recorded one, so that a padding the two
    # configs do differently shows in the embedding's rows
    recorded = data_lib.load_vocab(source)
    size = len(recorded) if recorded else 7
    theirs = param_shapes({**wanted, **trained}, size)
    ours = param_shapes(wanted, size)
    if theirs is None or ours is None or theirs == ours:
        return  # the same weights (other rates, perhaps), or for the restore to check
    differ = [k for k in wanted if k in trained and trained[k] != wanted[k]
              and "drop" not in k]
    matches = matching_configs(trained)
    hint = (f"finetune it with {' or '.join('--config ' + m for m in matches)}"
            if matches else "no file in configs/ matches: give the run's model keys as "
            "--config.model.KEY=VALUE")
    raise ConfigError(
        f"{source} was trained with another model than this config describes, so the "
        f"shapes of its weights differ: the run has {describe_model(trained)}; this "
        f"config has {describe_model(wanted)} (differing: "
        + ", ".join(f"model.{k} {trained[k]!r} vs {wanted[k]!r}" for k in differ)
        + f"). {hint} (keeping --config.finetune.init_from {source})")
