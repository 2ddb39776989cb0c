"""Experiment configs: Python files whose `get_config()` returns a ConfigDict.

`load_config(path, overrides)` runs the file and applies command-line overrides of the
form `--config.optim.lr=10` or `--config.optim.lr 10`. A key that does not exist is an
error listing the close matches; values are parsed to the type of the key's default.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

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
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if default is None:
            return text
        raise ConfigError(f"--config.{key}: cannot read {text!r} as a "
                          f"{type(default).__name__}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    if default is not None and not isinstance(value, type(default)):
        raise ConfigError(f"--config.{key} is a {type(default).__name__}, got {text!r}")
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
    config = load_config_file(path)
    apply_overrides(config, overrides)
    config.lock()
    return config


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ConfigDict:
    config = ConfigDict(json.loads(text))
    config.lock()
    return config


def default_config() -> ConfigDict:
    """Every key there is, with the paper's PTB values (docs/reference.md section 5).

    Config files start from this and change what differs, so a typo in an override or a
    config file is caught against one complete list of keys.
    """
    c = ConfigDict()
    c.data = ConfigDict(dict(
        dir="data/ptb",  # a corpus directory, "synthetic", or "tfds:NAME[:FEATURE]"
        batch_size=12,
        small_batch_size=-1,  # columns per gradient-accumulation group; -1: batch_size
        eval_batch_size=10,
        test_batch_size=1,
        bptt=70,
        max_seq_len_delta=40,  # random lengths are capped at bptt + this
        synthetic=ConfigDict(dict(vocab_size=500, train_tokens=200_000,
                                  valid_tokens=20_000, test_tokens=20_000,
                                  peakedness=2.0, seed=0)),
        tfds_data_dir="",  # TFDS data_dir ("" = TFDS's default)
        tfds_manual_dir="",  # for tfds:mos_jax_ptb / tfds:mos_jax_wikitext2
    ))
    c.model = ConfigDict(dict(
        emsize=280, nhid=960, nhidlast=620, nlayers=3, head="mos", n_experts=15,
        dropout=0.4, dropouth=0.225, dropouti=0.4, dropoute=0.1, dropoutl=0.29,
        wdrop=0.5,
        compute_dtype="auto",  # matmul operands; auto: float32 on CPU, bfloat16 on GPU/TPU
        vocab_chunk="auto",  # head: 0 whole logits, N stream over N-word chunks, auto
        # the encoder: "lstm" (AWD-LSTM, the keys above) or "transformer" (these keys,
        # with nlayers, emsize and dropoute; mos_jax.transformer)
        encoder="lstm", n_heads=4, d_model=0, d_ff=0, attn_dropout=0.1, resid_dropout=0.1,
        eval_stride=0,  # Transformer evaluation: sliding-window stride; 0: bptt // 2
    ))
    c.optim = ConfigDict(dict(
        lr=20.0, clip=0.25, wdecay=1.2e-6, alpha=2.0, beta=1.0, nonmono=5,
        asgd=True,  # switch to averaged SGD by the non-monotone trigger
        name="sgd",  # sgd (the paper's), momentum, adam, adamw (mos_jax.optim.OPTIMIZERS)
        momentum=0.9, nesterov=False,  # momentum
        b1=0.9, b2=0.999, eps=1e-8,  # adam, adamw
        # lr schedule, a per-step multiplier: linear warm-up, then cosine decay to
        # min_lr_ratio over decay_steps (0: none; mos_jax.optim.Optimizer.lr_multiplier)
        warmup_steps=0, decay_steps=0, min_lr_ratio=0.0,
    ))
    c.train = ConfigDict(dict(
        seed=28,
        max_epochs=1000,
        time_budget_s=0.0,  # stop (with a checkpoint) after this much wall time; 0: none
        stop_at_step=0,  # stop (with a checkpoint) at this global step; 0: never
        steps_per_epoch=0,  # cap on the windows of an epoch (short epochs); 0: all
        checkpoint_every_s=600.0,  # mid-epoch checkpoints
        log_every_steps=20,
        eval_max_tokens=0,  # validate on only the first N tokens; 0: all
        test=True,  # final test on the best weights
    ))
    c.finetune = ConfigDict(dict(
        init_from="",  # the training work directory whose best weights start finetuning
        lr=25.0,
        max_epochs=500,
    ))
    c.parallel = ConfigDict(dict(  # data parallelism (mos_jax.parallel)
        strategy="mesh",  # "mesh" (jit + shard_map on a Mesh), "pmap", or "none"
        num_devices=0,  # devices per process; 0: all local devices (one: no parallelism)
        # Multi-host launch settings (not kept in a run's config.json):
        coordinator_address="",  # process 0's host:port; "": from
        # JAX_COORDINATOR_ADDRESS, else one process; "auto": JAX's cluster detection
        num_processes=0,  # 0: from JAX_NUM_PROCESSES or cluster detection
        process_id=-1,  # -1: from JAX_PROCESS_ID or cluster detection
    ))
    return c
