"""The language model: an encoder with a pluggable output head, and its training loss.

`LanguageModel` = tied embedding -> encoder -> head. The encoder is an axis of its own
(`model.encoder`, looked up in `ENCODERS`, each a subclass of `Encoder`, defined in
`mos_jax.layers`): the AWD-LSTM (`lstm`, the default: embedding dropout -> locked
dropout -> L weight-dropped LSTM layers, locked dropout between them -> locked
dropout) or a causal Transformer (`transformer`, `mos_jax.transformer`). Parameters (Flax names; docs/reference.md section 2 gives the
reference's):

    embedding            [V, D]    U(-0.1, 0.1), also the decoder weight (V_pad rows:
                                   V rounded up to `vocab_multiple`, see ModelConfig)
    lstm_{l}/ih_kernel   [I_l, 4H_l], hh_kernel [H_l, 4H_l], ih_bias, hh_bias [4H_l]
                         (the LSTM; the Transformer's are in mos_jax.transformer)
    head/...             see `mos_jax.heads`

The functional entry points are `init_params`, `init_carry`, `apply` and
`regularized_loss`; `ModelConfig` is hashable, so it can be a static jit argument.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mos_jax import collectives
from mos_jax import heads as heads_lib
from mos_jax import transformer as transformer_lib
from mos_jax.errors import ConfigError
from mos_jax.layers import (Carry, Encoder, WeightDropLSTM, embedding_dropout,
                            locked_dropout, uniform_init)

Params = Any  # a pytree of arrays
ModelCarry = tuple[Carry, ...]  # one (h, c) per LSTM layer; () for the Transformer


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and dropout rates. Defaults are the paper's PTB model."""

    vocab_size: int
    emsize: int = 280
    nhid: int = 960
    nhidlast: int = 620
    nlayers: int = 3
    head: str = "mos"
    n_experts: int = 15
    dropout: float = 0.4
    dropouth: float = 0.225
    dropouti: float = 0.4
    dropoute: float = 0.1
    dropoutl: float = 0.29
    wdrop: float = 0.5
    compute_dtype: str = "auto"  # matmul operands: float32, bfloat16, or auto
    # head path: 0 whole logits, n stream over n-word chunks, "fused" (training losses
    # with gradients in the forward pass, mos_jax.fused), or "auto" (fused for training,
    # streamed or whole logits for scoring, by size)
    vocab_chunk: int | str = "auto"
    # The encoder (ENCODERS): "lstm" (AWD-LSTM) or "transformer"; the keys below are the
    # Transformer's (mos_jax.transformer; it uses nlayers and dropoute too).
    encoder: str = "lstm"
    n_heads: int = 4
    d_model: int = 0  # 0: emsize
    d_ff: int = 0  # 0: 4 d_model
    attn_dropout: float = 0.1
    resid_dropout: float = 0.1
    eval_stride: int = 0  # sliding-window evaluation stride; 0: half the window (bptt)
    # The selected head's options (config `model.heads.<head>`, `Head.options`) as
    # sorted (name, value) pairs, passed to the head module as attributes.
    head_options: tuple[tuple[str, Any], ...] = ()
    # The vocabulary-sized parameters (the embedding, each head's [V, ...] ones) get
    # V rounded up to a multiple of this many rows (`padded_vocab_size`), so that any
    # model size dividing it can split them; the padded rows are never a word (the
    # heads mask them: `mos_jax.heads`). 1: no padding.
    vocab_multiple: int = 1

    def __post_init__(self):
        head_cls = heads_lib.get_head(self.head)  # raises on an unknown name
        object.__setattr__(self, "head_options", _hashable_options(self.head_options))
        if self.encoder not in ENCODERS:
            raise ConfigError(f"unknown encoder model.encoder={self.encoder!r}: use one "
                              f"of {', '.join(sorted(ENCODERS))}")
        problems = ENCODERS[self.encoder].check(self)
        if problems:
            raise ConfigError("; ".join(problems))
        if self.eval_stride < 0:
            raise ConfigError(f"model.eval_stride must be >= 0 (0: half the window), "
                              f"got {self.eval_stride}")
        for f in ("vocab_size", "emsize", "nhid", "nhidlast", "nlayers", "n_experts"):
            if getattr(self, f) < 1:
                raise ConfigError(f"model.{f} must be at least 1, got {getattr(self, f)}")
        for f in ("dropout", "dropouth", "dropouti", "dropoute", "dropoutl", "wdrop"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ConfigError(f"model.{f} is a dropout rate in [0, 1), got "
                                  f"{getattr(self, f)}")
        if (not isinstance(self.vocab_multiple, int) or isinstance(self.vocab_multiple, bool)
                or self.vocab_multiple < 1):
            raise ConfigError(f"model.vocab_multiple must be a whole number >= 1 (1: no "
                              f"padding), got {self.vocab_multiple!r}")
        problem = tied_width_problem(self)
        if problem:
            raise ConfigError(problem)
        head_cls.check_options(self.head, self)  # its options, with the vocabulary
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"model.compute_dtype {self.compute_dtype!r}: use float32, "
                              "bfloat16, or auto (float32 on CPU, bfloat16 on GPU/TPU)")
        chunk = self.vocab_chunk
        if isinstance(chunk, str) and chunk.strip().lower() in ("auto", "fused"):
            chunk = chunk.strip().lower()
        else:
            try:
                chunk = int(chunk)
                if chunk < 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(
                    f"model.vocab_chunk {self.vocab_chunk!r}: use 0 (whole logits), a "
                    "positive chunk size in words, fused, or auto") from None
        object.__setattr__(self, "vocab_chunk", chunk)

    @property
    def padded_vocab_size(self) -> int:
        """V_pad: the rows of the vocabulary-sized parameters, V rounded up to a
        multiple of `vocab_multiple` (V itself for 1). Fixed by the config, not by
        the mesh, so a checkpoint's shapes do not depend on where it was written."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_vocab_size(self) -> int | None:
        """The head attribute `vocab_size`: V where the vocabulary is padded, else None
        (every row is a word)."""
        return self.vocab_size if self.padded_vocab_size != self.vocab_size else None

    @property
    def dtype(self) -> jnp.dtype:
        """The matmul operand dtype; `auto` is float32 on CPU, bfloat16 elsewhere."""
        name = self.compute_dtype
        if name == "auto":
            name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        return jnp.dtype(name)

    @property
    def encoder_cls(self) -> type:
        """The encoder (`ENCODERS[self.encoder]`): what the model asks about it."""
        return ENCODERS[self.encoder]

    @property
    def output_size(self) -> int:
        """The width of the encoder's output, the head's input (nhidlast for the LSTM,
        d_model for the Transformer)."""
        return self.encoder_cls.output_size(self)

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(self.nhid if l < self.nlayers - 1 else self.nhidlast
                     for l in range(self.nlayers))

    @property
    def input_sizes(self) -> tuple[int, ...]:
        return tuple(self.emsize if l == 0 else self.nhid for l in range(self.nlayers))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a mapping (e.g. a ConfigDict); unknown keys are errors.

        A `heads` entry (the config's `model.heads` section: head name -> options)
        gives `head_options` the selected head's section."""
        d = dict(d)
        sections = d.pop("heads", None)
        if sections is not None and "head_options" not in d:
            head = d.get("head", cls.head)
            d["head_options"] = dict(sections).get(head, {})
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown model config key {key!r}.{hint}")
        return cls(**dict(d))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _hashable_options(options) -> tuple[tuple[str, Any], ...]:
    """Sorted (name, value) pairs from a mapping or pairs; lists become tuples."""
    if hasattr(options, "items"):
        options = options.items()
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v)
                        for k, v in options))


class ModelOutput(NamedTuple):
    target_logprobs: jax.Array | None  # [T, B]
    logprobs: jax.Array | None  # [T, B, V] when asked for
    output: jax.Array  # [T, B, nhidlast], last layer after its dropout (AR)
    raw_output: jax.Array  # [T, B, nhidlast], last layer before dropout (TAR)
    carry: ModelCarry
    # -sum(target_weights * target_logprobs) when `target_weights` were given (None
    # otherwise). Heads that can fuse it with its gradients do (target_logprobs then
    # carry no gradient): differentiate this, not target_logprobs.
    nll: jax.Array | None = None


class AWDLSTM(Encoder):
    """The AWD-LSTM encoder (docs/reference.md section 2): its parameters sit at the model's top
    level (`lstm_{l}`), as they always have."""

    width_key = "nhidlast"

    @staticmethod
    def check(cfg) -> list[str]:
        return []

    @staticmethod
    def output_size(cfg) -> int:
        return cfg.nhidlast

    @staticmethod
    def flops_per_token(cfg, context: int) -> int:
        """Forward matmul FLOPs per token: 2 * 4 H (I + H) per layer (any context)."""
        return sum(2 * 4 * h * (i + h) for i, h in zip(cfg.input_sizes, cfg.hidden_sizes))

    @staticmethod
    def init_carry(cfg, batch_size: int) -> ModelCarry:
        """Zero `(h, c)` for every layer, each [batch_size, H_l] float32."""
        return tuple((jnp.zeros((batch_size, h), jnp.float32),
                      jnp.zeros((batch_size, h), jnp.float32))
                     for h in cfg.hidden_sizes)

    @staticmethod
    def generation_state(cfg, batch_size: int, max_len: int) -> ModelCarry:
        return AWDLSTM.init_carry(cfg, batch_size)

    @staticmethod
    def encode(module, cfg, embedding, inputs, carry, *, rng, deterministic, valid):
        x = embedding_dropout(embedding, inputs, cfg.dropoute, rng())
        x = locked_dropout(x, cfg.dropouti, rng())
        new_carry = []
        for l, size in enumerate(cfg.hidden_sizes):
            x, c = WeightDropLSTM(size, cfg.wdrop, cfg.dtype, name=f"lstm_{l}")(
                x, carry[l], deterministic=deterministic, valid=valid)
            new_carry.append(c)
            if l < cfg.nlayers - 1:
                x = locked_dropout(x, cfg.dropouth, rng())
        return locked_dropout(x, cfg.dropout, rng()), x, tuple(new_carry)


ENCODERS: dict[str, type[Encoder]] = {"lstm": AWDLSTM,
                                      "transformer": transformer_lib.Transformer}


def tied_width_problem(m) -> str | None:
    """What is wrong with model section `m` (a ModelConfig, or a config's `model`
    ConfigDict) under the rule of a tied head (`Head.width_problem`: the encoder's
    output width, model key `width_key`, must equal emsize), or None. ModelConfig
    refuses a config with a problem; compare-heads, bench and the demo ask here too."""
    encoder = ENCODERS.get(getattr(m, "encoder", "lstm"))
    if encoder is None:  # an unknown encoder: ModelConfig says so
        return None
    return heads_lib.get_head(m.head).width_problem(m.head, encoder.output_size(m),
                                                    m.emsize, encoder.width_key)


def set_tied_width(m) -> str | None:
    """Make a config's model section `m` (a ConfigDict) obey the tied-width rule: the
    encoder's width key (nhidlast for the LSTM, d_model for the Transformer) set to
    emsize where the head needs it. A note saying what changed, or None."""
    if tied_width_problem(m) is None:
        return None
    key = ENCODERS[getattr(m, "encoder", "lstm")].width_key
    old, m[key] = m[key], m.emsize
    return f"{key} set to emsize = {m.emsize} (config: {old}); the {m.head} head needs " \
           f"{key} == emsize"


collectives.declare_param_axes("embedding", ("vocab", "embed"))


class LanguageModel(nn.Module):
    """Encoder (`config.encoder`) + head with tied weights. Time-major inputs [T, B]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, inputs: jax.Array, carry: ModelCarry,
                 targets: jax.Array | None = None, *, deterministic: bool = True,
                 length: jax.Array | int | None = None,
                 return_logprobs: bool = False,
                 target_weights: jax.Array | None = None) -> ModelOutput:
        cfg = self.config
        dtype = cfg.dtype

        def rng():
            return None if deterministic else self.make_rng("dropout")

        # [V_pad, D] (V_pad = V unless vocab_multiple pads it); [V_pad / M, D] rows on
        # each of M shards where placement splits the vocabulary
        embedding = self.param("embedding", uniform_init(0.1),
                               (cfg.padded_vocab_size // collectives.shard_count(),
                                cfg.emsize))
        valid = None
        if length is not None:
            valid = jnp.arange(inputs.shape[0]) < length
        output, raw_output, new_carry = cfg.encoder_cls.encode(
            self, cfg, embedding, inputs, carry, rng=rng, deterministic=deterministic,
            valid=valid)
        head = heads_lib.get_head(cfg.head)(
            n_experts=cfg.n_experts, dropoutl=cfg.dropoutl, dtype=dtype,
            vocab_chunk=cfg.vocab_chunk, vocab_size=cfg.head_vocab_size, name="head",
            **dict(cfg.head_options))
        out = head.output_with_nll(output, embedding, targets, deterministic=deterministic,
                                   return_logprobs=return_logprobs,
                                   target_weights=target_weights)
        return ModelOutput(out.target_logprobs, out.logprobs, output, raw_output,
                           new_carry, out.nll)


def init_carry(config: ModelConfig, batch_size: int) -> ModelCarry:
    """The encoder's zero carry: for the LSTM `(h, c)` per layer, each [batch_size,
    H_l] float32; for the Transformer `()`."""
    return config.encoder_cls.init_carry(config, batch_size)


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Fresh parameters with the reference's initialisation (docs/reference.md section 2)."""
    dummy = jnp.zeros((2, 1), jnp.int32)
    return LanguageModel(config).init(rng, dummy, init_carry(config, 1), dummy)["params"]


def param_count(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def apply(config: ModelConfig, params: Params, inputs: jax.Array, carry: ModelCarry,
          targets: jax.Array | None = None, *, rng: jax.Array | None = None,
          length: jax.Array | int | None = None,
          return_logprobs: bool = False,
          target_weights: jax.Array | None = None) -> ModelOutput:
    """One forward pass; dropout is on exactly when `rng` is given.

    With `target_weights` [T, B], `ModelOutput.nll` is the weighted NLL; a head that
    can fuses it with its gradients (`mos_jax.fused`).
    """
    rngs = None if rng is None else {"dropout": rng}
    return LanguageModel(config).apply(
        {"params": params}, inputs, carry, targets, deterministic=rng is None,
        length=length, return_logprobs=return_logprobs, target_weights=target_weights,
        rngs=rngs)


def token_weights(shape: tuple[int, int], length: jax.Array | int | None = None,
                  mean: bool = True) -> jax.Array:
    """Weights [T, B] of a window's targets: 1 on the first `length` steps (all steps
    when None) and 0 on the padding after them; with `mean`, divided by the number of
    real targets (at least 1), so `-sum(weights * logprobs)` is their mean NLL. Heads
    that can fuse that weighted NLL do so when given these as `target_weights`."""
    steps, batch = shape
    n = steps if length is None else length
    w = (jnp.arange(steps) < n).astype(jnp.float32)[:, None]
    if mean:
        w = w / (jnp.maximum(n, 1) * batch)
    return jnp.broadcast_to(w, shape)


def regularized_loss(model_config: ModelConfig, params: Params, inputs: jax.Array,
                     targets: jax.Array, carry: ModelCarry, alpha: float, beta: float,
                     rng: jax.Array | None = None,
                     length: jax.Array | int | None = None
                     ) -> tuple[jax.Array, dict[str, Any]]:
    """The training loss of one window (docs/reference.md section 2, item 6).

    `NLL + alpha * mean(output^2) + beta * mean((raw_{t+1} - raw_t)^2)`, NLL the mean
    over the window's targets. `inputs`, `targets`: [T, B] int. With `length`, only the
    first `length` steps are real (the rest is bucket padding): they alone are scored
    and averaged, and the carry stops there. No dropout when `rng` is None.

    Returns `(loss, aux)` with aux keys `nll`, `ar`, `tar` (unweighted means) and
    `carry` (the new carry; stop its gradient before the next window).
    """
    steps, batch = targets.shape
    n = steps if length is None else length
    valid = (jnp.arange(steps) < n).astype(jnp.float32)
    weights = token_weights(targets.shape, length)
    out = apply(model_config, params, inputs, carry, targets, rng=rng, length=length,
                target_weights=weights)
    nll = out.nll
    width = out.output.shape[-1]
    ar = jnp.sum(jnp.square(out.output) * valid[:, None, None]) / (n * batch * width)
    diff = out.raw_output[1:] - out.raw_output[:-1]
    pairs = valid[1:]  # both steps of the pair are real
    tar = (jnp.sum(jnp.square(diff) * pairs[:, None, None])
           / (jnp.maximum(n - 1, 1) * batch * width))
    loss = nll + alpha * ar + beta * tar
    return loss, {"nll": nll, "ar": ar, "tar": tar, "carry": out.carry}
