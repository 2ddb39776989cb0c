"""Weights in the reference's layout: import (`.npz`, `.pt`) and export.

The reference names and layouts are those of docs/reference.md section 2 (`encoder.weight` [V, D],
`rnns.{l}.weight_ih` [4H, I], ...). The names the reference code actually saves are
accepted too: `rnns.{l}.module.weight_hh_l0_raw` (weight-dropped LSTM),
`rnns.{l}.weight_ih_l0`, `latent.0.weight` (a Sequential), a leading `module.`
(DataParallel), and `decoder.weight` (tied, so ignored). PyTorch weights are the
transposes of Flax kernels; gate blocks are in the same order (i, f, g, o).

A padded vocabulary (`model.vocab_multiple`, passed as a config override): the
reference's weights are over the V words; importing them into a padded model appends
zero rows to the embedding and the decoder bias (the heads mask those rows, so any
value would do), and exporting keeps only the first V rows. The vocabulary size
recorded (ModelConfig.vocab_size) is always V.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mos_jax import heads
from mos_jax.errors import CheckpointError, ConfigError
from mos_jax.model import ModelConfig, Params

_ALIASES = [  # (pattern on a reference name, its docs/reference.md name)
    (re.compile(r"^rnns\.(\d+)\.(?:module\.)?weight_hh(?:_l0)?_raw$"), r"rnns.\1.weight_hh"),
    (re.compile(r"^rnns\.(\d+)\.(?:module\.)?(weight_ih|weight_hh|bias_ih|bias_hh)(?:_l0)?$"),
     r"rnns.\1.\2"),
    (re.compile(r"^latent\.0\.(weight|bias)$"), r"latent.\1"),
]
_SPEC_NAME = re.compile(r"^(encoder\.weight|rnns\.\d+\.(weight_ih|weight_hh|bias_ih|bias_hh)"
                        r"|prior\.weight|latent\.(weight|bias)|decoder\.(weight|bias))$")
_LSTM_PARTS = {"weight_ih": "ih_kernel", "weight_hh": "hh_kernel",
               "bias_ih": "ih_bias", "bias_hh": "hh_bias"}


def normalize_state(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Map a reference state dict to docs/reference.md names as float32 NumPy arrays.

    Unknown keys are ignored whatever they hold (metadata such as a JSON string, an
    optimizer's step count); a weight name with a non-numeric value is an error. A raw
    (un-dropped) recurrent weight wins over a derived `weight_hh_l0` saved beside it.
    """
    out: dict[str, np.ndarray] = {}
    raw_seen: set[str] = set()
    for key, value in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        is_raw = name.endswith("_raw")
        for pattern, repl in _ALIASES:
            if pattern.match(name):
                name = pattern.sub(repl, name)
                break
        if name in raw_seen and not is_raw:
            continue
        if is_raw:
            raw_seen.add(name)
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":
            if _SPEC_NAME.match(name):
                raise CheckpointError(f"{key} holds {value.dtype} values, not numbers: "
                                      "is this a weight file?")
            continue  # metadata, not a weight
        out[name] = value.astype(np.float32)
    return out


def _require(state: Mapping[str, np.ndarray], name: str, shape=None) -> np.ndarray:
    if name not in state:
        raise CheckpointError(f"the weights lack {name!r}: is this an AWD-LSTM(-MoS) "
                              f"state dict? Keys found: {', '.join(sorted(state)[:12])}")
    value = state[name]
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{name} has shape {tuple(value.shape)}, expected "
                              f"{tuple(shape)} from the other weights")
    return value


def from_reference_state(state: Mapping[str, Any], head: str | None = None,
                         **config_overrides) -> tuple[ModelConfig, Params]:
    """Infer the architecture from the shapes and return `(ModelConfig, params)`.

    `head` picks between the heads that read these weights' layout
    (`Head.reference_layout`: "mixture" with `prior.weight`, else "softmax"; the first
    registered head of the layout by default, `heads.importable_heads`). Dropout rates
    are not stored in weights: they keep `ModelConfig`'s defaults unless overridden.
    """
    state = normalize_state(state)
    emb = _require(state, "encoder.weight")
    if emb.ndim != 2:
        raise CheckpointError(f"encoder.weight must be [V, D], got shape {emb.shape}")
    vocab_size, emsize = emb.shape
    nlayers = 0
    while f"rnns.{nlayers}.weight_hh" in state:
        nlayers += 1
    if nlayers == 0:
        raise CheckpointError("the weights hold no LSTM layer (rnns.0.weight_hh)")
    sizes = [state[f"rnns.{l}.weight_hh"].shape[1] for l in range(nlayers)]
    nhid, nhidlast = sizes[0] if nlayers > 1 else sizes[-1], sizes[-1]
    has_prior = "prior.weight" in state
    layout = "mixture" if has_prior else "softmax"
    readers = heads.importable_heads(layout)
    if head is None:
        head = readers[0]
    if import_layout(head) != layout:
        what = ("a mixture head (prior.weight)" if has_prior else
                "a softmax head (no prior.weight and latent.weight)")
        raise CheckpointError(
            f"these weights have {what}, which the {head} head cannot hold: import them "
            f"with one of the heads {', '.join(readers)} (`mos-jax import --head`, or "
            "head= in `convert`)")
    n_experts = state["prior.weight"].shape[0] if has_prior else 1
    config = ModelConfig(vocab_size=vocab_size, emsize=emsize, nhid=nhid,
                         nhidlast=nhidlast, nlayers=nlayers, head=head,
                         n_experts=n_experts, **config_overrides)
    params: dict[str, Any] = {"embedding": _pad_rows(emb, config.padded_vocab_size)}
    for l, (h, i) in enumerate(zip(config.hidden_sizes, config.input_sizes)):
        shapes = {"weight_ih": (4 * h, i), "weight_hh": (4 * h, h),
                  "bias_ih": (4 * h,), "bias_hh": (4 * h,)}
        layer = {}
        for ref, flax_name in _LSTM_PARTS.items():
            value = _require(state, f"rnns.{l}.{ref}", shapes[ref])
            layer[flax_name] = value.T if ref.startswith("weight") else value
        params[f"lstm_{l}"] = layer
    head_params = {"decoder_bias": _pad_rows(
        _require(state, "decoder.bias", (vocab_size,)), config.padded_vocab_size)}
    if has_prior:
        e, d = n_experts, emsize
        head_params["prior_kernel"] = _require(state, "prior.weight", (e, nhidlast)).T
        head_params["latent_kernel"] = _require(state, "latent.weight", (e * d, nhidlast)).T
        head_params["latent_bias"] = _require(state, "latent.bias", (e * d,))
    params["head"] = head_params
    return config, _to_jax(params)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """`x` [V, ...] with zero rows appended up to `rows` (a padded vocabulary's rows,
    never a word: the heads mask them)."""
    if x.shape[0] >= rows:
        return x
    return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])


def import_layout(head: str) -> str:
    """The reference layout head `head` reads (`Head.reference_layout`); a ConfigError
    naming the heads that can be imported when it declares none (or is unknown)."""
    layout = heads.get_head(head).reference_layout
    if layout is None:
        raise ConfigError(f"the {head} head cannot be read from reference weights: "
                          f"choose one of {', '.join(heads.importable_heads())}")
    return layout


def _to_jax(tree):
    import jax
    import jax.numpy as jnp
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.ascontiguousarray(x)), tree)


def to_reference_state(model_config: ModelConfig, params: Params,
                       style: str = "spec") -> dict[str, np.ndarray]:
    """Export params to the reference's names and layouts (inverse of the import).

    `style="spec"` uses docs/reference.md's names (`rnns.0.weight_hh`, `latent.weight`);
    `style="reference"` the names the reference code's `state_dict()` has
    (`rnns.0.module.weight_hh_l0_raw`, `latent.0.weight`, and `decoder.weight`).
    """
    if style not in ("spec", "reference"):
        raise ValueError(f"style must be 'spec' or 'reference', got {style!r}")
    p = params
    v = model_config.vocab_size  # the words: a padded vocabulary's padding is dropped
    out = {"encoder.weight": np.asarray(p["embedding"])[:v]}
    for l in range(model_config.nlayers):
        layer = p[f"lstm_{l}"]
        for ref, flax_name in _LSTM_PARTS.items():
            value = np.asarray(layer[flax_name])
            value = value.T if ref.startswith("weight") else value
            if style == "spec":
                out[f"rnns.{l}.{ref}"] = value
            else:
                raw = "_raw" if ref == "weight_hh" and model_config.wdrop > 0 else ""
                mod = "module." if model_config.wdrop > 0 else ""
                out[f"rnns.{l}.{mod}{ref}_l0{raw}"] = value
    head = p["head"]
    if "prior_kernel" in head:
        lat = "latent" if style == "spec" else "latent.0"
        out["prior.weight"] = np.asarray(head["prior_kernel"]).T
        out[f"{lat}.weight"] = np.asarray(head["latent_kernel"]).T
        out[f"{lat}.bias"] = np.asarray(head["latent_bias"])
    out["decoder.bias"] = np.asarray(head["decoder_bias"])[:v]
    if style == "reference":
        out["decoder.weight"] = out["encoder.weight"]
    return out


def load_reference_npz(path: str | os.PathLike, head: str | None = None,
                       **config_overrides) -> tuple[ModelConfig, Params]:
    """Read an `.npz` of reference-named weights; returns `(model_config, params)`.

    Entries that are not weights are ignored, whatever their dtype (a string holding a
    JSON config, a pickled object, which is never unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path} (no weight file there; check the path)")
    state = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for k in z.files:
                try:
                    state[k] = z[k]
                except ValueError:  # an object array: needs pickle, so not a weight
                    pass
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable .npz file ({e})") from None
    return from_reference_state(state, head=head, **config_overrides)


# --------------------------------------------------------------------------------------
# PyTorch checkpoints (torch is imported only here).

class _Stub:
    """Stands in for a class the pickle names but this process cannot import."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


class _TolerantUnpickler(pickle.Unpickler):
    """Resolves torch, NumPy and stdlib classes; stubs any other (the reference's own
    `model.RNNModel`, `weight_drop.WeightDrop`), so a pickled module loads without its
    source code."""

    _TRUSTED = ("torch", "collections", "numpy", "builtins", "copyreg", "_codecs")

    def find_class(self, module, name):
        if module.split(".")[0] in self._TRUSTED:
            try:
                return super().find_class(module, name)
            except (AttributeError, ImportError):
                if module.startswith("torch.nn"):
                    return type(name, (_Stub,), {})
                raise
        return type(name, (_Stub,), {})


class _TolerantPickle:
    Unpickler = _TolerantUnpickler
    load = staticmethod(pickle.load)
    __name__ = "mos_jax_tolerant_pickle"


def _module_state(obj, prefix="") -> dict[str, Any]:
    """The parameters of a (stubbed or real) torch module tree, by dotted name."""
    state = {}
    attrs = getattr(obj, "__dict__", {})
    for name, value in (attrs.get("_parameters") or {}).items():
        if value is not None:
            state[prefix + name] = value
    for name, value in (attrs.get("_buffers") or {}).items():
        if value is not None:
            state[prefix + name] = value
    for name, child in (attrs.get("_modules") or {}).items():
        if child is not None:
            state.update(_module_state(child, f"{prefix}{name}."))
    return state


def read_torch_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A reference checkpoint (a state dict or a pickled module) as NumPy arrays."""
    path = Path(path)
    if not path.is_file():  # before asking for PyTorch: a typo needs no install
        raise CheckpointError(f"no such file: {path} (no checkpoint there; check the path)")
    try:
        import torch
    except ImportError:
        raise CheckpointError("importing .pt files needs PyTorch: "
                              "pip install 'mos-jax[torch]' (or convert the weights to "
                              "an .npz of reference-named arrays, which needs no PyTorch)"
                              ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # A whole pickled model (the reference saves `torch.save(model)`): load it
        # with its classes stubbed. Only do this for files you trust.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False,
                             pickle_module=_TolerantPickle)
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {e}") from None
    if isinstance(obj, (list, tuple)) and obj and not isinstance(obj[0], torch.Tensor):
        obj = obj[0]  # finetune.py saves [model, criterion, optimizer]-like tuples
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict):
        state = obj
    else:
        state = _module_state(obj)
        if not state:
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a model "
                                  "or a state dict")
    return {k: v.detach().float().cpu().numpy() for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def read_weights(path: str | os.PathLike, head: str | None = None
                 ) -> tuple[ModelConfig, Params]:
    """Reference weights, a `.npz` of reference-named arrays or a PyTorch file (any
    other name), as a ModelConfig and params; nothing is written."""
    if Path(path).suffix.lower() == ".npz":
        return load_reference_npz(path, head=head)
    return from_reference_state(read_torch_state(path), head=head)


def save_weights(out_dir: str | os.PathLike, config: ModelConfig, params: Params) -> None:
    """`weights.npz` (docs/reference.md names) and `model.json` (the ModelConfig) in out_dir."""
    import dataclasses
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / "weights.npz", **to_reference_state(config, params))
    (out_dir / "model.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))


def load_weights(directory: str | os.PathLike) -> tuple[ModelConfig, Params]:
    """Read what `save_weights` wrote (dropout rates and head from model.json)."""
    directory = Path(directory)
    meta = directory / "model.json"
    if not meta.is_file():
        raise CheckpointError(f"{directory} has no model.json: is it an output of "
                              "`mos-jax import`?")
    config = ModelConfig.from_dict(json.loads(meta.read_text()))
    not_in_weights = {k: getattr(config, k) for k in (
        "dropout", "dropouth", "dropouti", "dropoute", "dropoutl", "wdrop", "compute_dtype",
        "vocab_multiple")}
    loaded, params = load_reference_npz(directory / "weights.npz", head=config.head,
                                        **not_in_weights)
    if loaded != config:
        raise CheckpointError(f"{directory}/weights.npz holds a {loaded} model, but "
                              f"model.json describes {config}")
    return config, params


def _adaptive_parts(state: Mapping[str, Any], prefix: str):
    state = {k[len(prefix):]: np.asarray(v, np.float32) for k, v in state.items()
             if k.startswith(prefix)}
    if "head.weight" not in state:
        raise CheckpointError(f"no {prefix}head.weight: is this the state dict of a "
                              "torch.nn.AdaptiveLogSoftmaxWithLoss (pass prefix= for one "
                              "inside a larger module)?")
    n = 0
    while f"tail.{n}.0.weight" in state:
        n += 1
    tails = []
    for i in range(n):
        proj, out = state[f"tail.{i}.0.weight"], state.get(f"tail.{i}.1.weight")
        if out is None or proj.ndim != 2 or out.ndim != 2 or out.shape[1] != proj.shape[0]:
            raise CheckpointError(f"{prefix}tail.{i}: expected 0.weight [hsz, in] and "
                                  "1.weight [osz, hsz]")
        tails.append((proj, out))
    return state, tails


def torch_adaptive_options(state: Mapping[str, Any], cutoffs=None,
                           div_value: float | None = None, prefix: str = "") -> dict:
    """The `adaptive` head's options (`model.heads.adaptive`) that reproduce a torch
    `AdaptiveLogSoftmaxWithLoss` state dict: `cutoffs`, `div_value`, `head_bias`.

    Inferred from the shapes: the number of clusters n (the `tail.{i}` entries), the
    shortlist S = rows of `head.weight` - n, each cluster's size (rows of
    `tail.{i}.1.weight`), hence the cutoffs and V = S + sum of the cluster sizes, and
    `head_bias` (whether `head.bias` is present). Not inferable: `div_value` itself,
    only the projection widths int(in // div ** (i + 1)) it produced; the one given,
    else 4.0 (torch's default) or in / hsz_0, whichever reproduces every width, else a
    CheckpointError asking for it. `cutoffs`, when given, must agree with the shapes.
    """
    state, tails = _adaptive_parts(state, prefix)
    head = state["head.weight"]
    width, s = head.shape[1], head.shape[0] - len(tails)
    inferred = [s]
    for _, out in tails[:-1]:
        inferred.append(inferred[-1] + out.shape[0])
    if cutoffs is not None and [int(c) for c in cutoffs] != inferred:
        raise CheckpointError(f"cutoffs {list(cutoffs)} disagree with the weights' shapes, "
                              f"which give {inferred}")
    widths = [proj.shape[0] for proj, _ in tails]

    def fits(div: float) -> bool:
        return div > 0 and all(int(width // div ** (i + 1)) == w
                               for i, w in enumerate(widths))

    candidates = ([div_value] if div_value is not None
                  else [4.0] + ([width / widths[0]] if widths and widths[0] else []))
    found = next((float(d) for d in candidates if fits(d)), None)
    if found is None:
        raise CheckpointError(f"no div_value in {candidates} gives the tail widths "
                              f"{widths} from in_features={width}: pass div_value=")
    return {"cutoffs": ",".join(str(c) for c in inferred), "div_value": found,
            "head_bias": "head.bias" in state}


def from_torch_adaptive(state: Mapping[str, Any], cutoffs=None,
                        div_value: float | None = None, prefix: str = "") -> dict:
    """The `adaptive` head's parameters (what goes under `params["head"]`) from the state
    dict of a `torch.nn.AdaptiveLogSoftmaxWithLoss` (NumPy arrays or tensors, under its
    own names, after `prefix`).

    `head.weight` [S + n, in] -> `head_weight`, `head.bias` -> `head_bias`,
    `tail.{i}.0.weight` [hsz_i, in] -> `tail_{i}_proj`, `tail.{i}.1.weight`
    [osz_i, hsz_i] -> `tail_{i}_out`: the same layouts (torch's [out, in]), float32.
    Build the model with `torch_adaptive_options(state)` as `head_options` (what can
    and cannot be inferred from the shapes is said there; `cutoffs` and `div_value`
    given here are checked against them).
    """
    torch_adaptive_options(state, cutoffs, div_value, prefix)  # checks the shapes
    state, tails = _adaptive_parts(state, prefix)
    params = {"head_weight": state["head.weight"]}
    if "head.bias" in state:
        params["head_bias"] = state["head.bias"]
    for i, (proj, out) in enumerate(tails):
        params[f"tail_{i}_proj"], params[f"tail_{i}_out"] = proj, out
    return params
