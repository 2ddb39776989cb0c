"""Output layers behind one interface.

A head maps the encoder's output `hidden` [T, B, H] and the tied embedding [V, D] to
log-probabilities. Every head is a linen module called as

    head(hidden, embedding, targets, deterministic=..., return_logprobs=...)

and returns a `HeadOutput`: `target_logprobs` [T, B] (log p of each target; None when
`targets` is None) and, when `return_logprobs` is set, `logprobs` [T, B, V]. The
decoder bias `decoder_bias` [V] (zeros at init) belongs to the head. Heads are looked
up by name in `HEADS`; `register_head` adds one.

Every head subclasses `Head`, which holds the attributes the model builds it with and
the facts the rest of the code asks of it, instead of knowing heads by name: `tied`
(the decoder is the embedding applied to `hidden`, so nhidlast must equal emsize),
`flops_per_token(model_config)`, `rank_bound(model_config)` and `fuses_loss` (its
`__call__` takes `target_weights`). `Head.output_with_nll` is how the model calls a
head: the weighted NLL fused by the head where it declares so, else computed from the
target log-probabilities. A head's own hyperparameters are declared in `Head.options`
(`HeadOption`s: config keys `model.heads.<name>.<key>`, module attributes). The
adaptive softmax heads (`adaptive`, `adaptive_mos`) are in `mos_jax.adaptive`, loaded
by the registry (`BUILTIN_HEAD_MODULES`).

All log-space arithmetic is float32; `dtype` only sets the operand type of matmuls.
`vocab_chunk` (0, a chunk size, or "auto"; `mos_jax.streaming.resolve_chunk`) selects
the streaming path for target log-probabilities: per-row log-normalisers accumulated
over vocabulary chunks, so no [rows, V] logits are materialised forward or backward.
Full distributions (`return_logprobs`) always take the plain path. The softmax, MoS
and MoC heads also take `target_weights` [T, B] (the model passes them for a training
loss): with `vocab_chunk` "auto" or "fused" they then return the weighted NLL with its
gradients computed in the same pass over row chunks (`mos_jax.fused`), as `nll`.

A padded vocabulary (`model.vocab_multiple` > 1): the embedding and every
vocabulary-sized head parameter have V_pad >= V rows (V rounded up to the multiple),
the head attribute `vocab_size` is V, and the rows past V are never a word. The heads
that split the vocabulary (`shards_vocab`) compute their logits on every row and then
set those of the padded rows to -inf (`collectives.valid_rows`, `mask_rows`), so they
carry no probability and get no gradient, on every path; full distributions are cut
to their first V columns. A head that does not split the vocabulary is handed the
embedding's first V rows (`Head.output_with_nll`) and never sees the padding.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mos_jax import collectives
from mos_jax.errors import ConfigError
from mos_jax.layers import dot, locked_dropout, uniform_init
from mos_jax.fused import mixture_nll
from mos_jax.streaming import chunked_logsumexp, fused_rows, resolve_chunk, transform_logits


class HeadOutput(NamedTuple):
    target_logprobs: jax.Array | None  # [T, B]
    logprobs: jax.Array | None  # [T, B, V]
    # -sum(target_weights * target_logprobs) from a fused loss (see `fused_output`),
    # when the head was given `target_weights` and took that path; else None.
    nll: jax.Array | None = None


class HeadOption(NamedTuple):
    """One option of a head, declared in `Head.options` and set as the config key
    `model.heads.<head name>.<name>` (config.declarations() reads these).

    `default` (also the module attribute's default), `allowed` (a phrase for messages
    and docs/config.md: "a number > 0"), `ok(value) -> bool` (the check run with every
    other config check, before any work) and `doc` (what it means)."""

    default: Any
    allowed: str
    ok: Callable[[Any], bool]
    doc: str


class Head(nn.Module):
    """Base class of every head: its build attributes and the facts it declares.

    Attributes (the model sets all five; a head may ignore any): `n_experts`
    (model.n_experts), `dropoutl` (dropout on the head's latent vectors), `dtype` (the
    matmul operand type), `vocab_chunk` (see the module docstring) and `vocab_size`
    (the words V; None: every row of the embedding is one; fewer than the embedding's
    rows (whole, over every shard) where the vocabulary is padded, see the module
    docstring).

    Facts, as class attributes and class methods (`mc` is a `mos_jax.model.ModelConfig`;
    H = mc.nhidlast, D = mc.emsize, V = mc.vocab_size, E = mc.n_experts). What a head
    that declares nothing gets:
      tied = False: True when the decoder is the embedding [V, D] applied to `hidden`
        itself, so that H must equal D (the model refuses other sizes; compare-heads
        sets nhidlast = emsize).
      fuses_loss = False: True when `__call__` takes `target_weights` and may return
        the weighted NLL in `HeadOutput.nll` (`fused_output`).
      flops_per_token(mc) = 2 D V: forward matmul FLOPs per token (2 per
        multiply-add), by default one decoder product of a D-vector, a tied softmax's
        cost; a head that does more adds its own (`mos-jax bench` reports this). V
        there is `vocab_rows(mc)`: the padded rows, which are computed, where
        `model.vocab_multiple` pads the vocabulary.
      rank_bound(mc) = None: an upper bound on the rank of the head's [N, V]
        log-probability matrix when the head has one (a softmax over a D-vector:
        D + 2), else None.
      options = {}: the head's own hyperparameters, name -> `HeadOption`; each is a
        module attribute of the same name (declared on the class with that default)
        and the config key `model.heads.<head name>.<name>`. The model passes the
        selected head's section (`ModelConfig.head_options`) as attributes.
        `check_options(mc)` raises a one-line ConfigError for what needs the
        vocabulary (called when the ModelConfig is built, before any compile).
      wants_frequency_order = False: True when the head works best with word ids in
        order of training frequency (the adaptive heads' shortlist and clusters).
      shards_vocab = False: True when the head computes on a vocabulary split by rows
        over a mesh axis (`mos_jax.collectives`: each device holds `[V / M, D]` of
        the embedding and its block of every vocabulary-sized parameter, combining
        log-normalisers and target logits with collectives). A head that does not
        runs only where `parallel.mesh.model` is 1 (refused in one line otherwise).
        A head that does must also mask the padded rows of a padded vocabulary
        (`vocab_size`; the module docstring).
      reference_layout = None: the reference's (PyTorch AWD-LSTM) head weights this
        head's parameters are, so that `mos-jax import` can read them into it:
        "softmax" (decoder.bias) or "mixture" (prior, latent and decoder.bias, in
        `mos_jax.convert`); None: not importable. `importable_heads` lists them.
    """

    n_experts: int = 1
    dropoutl: float = 0.0
    dtype: Any = jnp.float32
    vocab_chunk: int | str = 0
    vocab_size: int | None = None

    tied = False
    fuses_loss = False
    options = {}  # name -> HeadOption (a class attribute, not a module field)
    wants_frequency_order = False
    reference_layout = None  # "softmax", "mixture" (a class attribute, not a field)
    shards_vocab = False

    @classmethod
    def flops_per_token(cls, mc) -> int:
        return 2 * mc.emsize * vocab_rows(mc)

    @classmethod
    def option_values(cls, mc) -> dict[str, Any]:
        """The head's options for model config `mc`: its declared defaults, updated
        with `mc.head_options`."""
        values = {name: opt.default for name, opt in cls.options.items()}
        values.update(dict(getattr(mc, "head_options", ()) or ()))
        return values

    @classmethod
    def check_options(cls, name: str, mc) -> None:
        """ConfigError (one line) for an option this head does not declare or whose
        value its check refuses; heads add the checks that need the vocabulary size."""
        for key, value in dict(mc.head_options).items():
            if key not in cls.options:
                known = ", ".join(sorted(cls.options)) or "none"
                raise ConfigError(f"the {name} head has no option {key!r} (its options: "
                                  f"{known}): remove model.heads.{name}.{key}")
            if not cls.options[key].ok(value):
                raise ConfigError(f"model.heads.{name}.{key}={value!r} is out of range: "
                                  f"it must be {cls.options[key].allowed} "
                                  f"({cls.options[key].doc})")

    @classmethod
    def rank_bound(cls, mc) -> int | None:
        return None

    @classmethod
    def width_problem(cls, name: str, width: int, emsize: int,
                      key: str = "nhidlast") -> str | None:
        """The rule of a tied head, written only here: the width of its input (the
        encoder's output, set by the model key `key`) must equal emsize. A one-line
        message naming the key and the fix when `width` breaks it, else None
        (`mos_jax.model.tied_width_problem` asks it of a model config)."""
        if cls.tied and width != emsize:
            return (f"the {name} head ties its decoder to the embedding, so the "
                    f"encoder's output width ({key}={width}) must equal emsize "
                    f"({emsize}): set model.{key} = model.emsize")
        return None

    def output_with_nll(self, hidden, embedding, targets=None, *, deterministic=True,
                        return_logprobs=False, target_weights=None) -> "HeadOutput":
        """`self(...)`, and with `target_weights` [T, B] `nll` = -sum(target_weights *
        target_logprobs): fused by the head when it declares `fuses_loss` (and took
        that path), else computed here from its target log-probabilities."""
        problem = self.width_problem(type(self).__name__, hidden.shape[-1],
                                     embedding.shape[-1])
        if problem:
            raise ConfigError(problem)
        if collectives.vocab_axis() and not self.shards_vocab:
            raise ConfigError(sharding_refusal(type(self).__name__))
        if (not self.shards_vocab and self.vocab_size is not None
                and self.vocab_size < embedding.shape[0]):
            embedding = embedding[:self.vocab_size]  # a padded vocabulary's words only
        extra = {}
        if target_weights is not None and self.fuses_loss:
            extra["target_weights"] = target_weights
        out = self(hidden, embedding, targets, deterministic=deterministic,
                   return_logprobs=return_logprobs, **extra)
        if out.nll is None and target_weights is not None and \
                out.target_logprobs is not None:
            out = out._replace(nll=-jnp.sum(out.target_logprobs * target_weights))
        return out


def vocab_rows(mc) -> int:
    """The rows of the vocabulary-sized parameters of model config `mc`: its padded
    size where it has one (`ModelConfig.padded_vocab_size`), else V. What a head
    computes on, so what its FLOPs and memory count."""
    return int(getattr(mc, "padded_vocab_size", mc.vocab_size))


HEADS: dict[str, type[Head]] = {}
# The vocabulary-sized parameter every built-in head has (its rows split with the
# embedding's when the vocabulary is split over devices).
collectives.declare_param_axes("decoder_bias", ("vocab",))


def sharding_refusal(name: str) -> str:
    """The one-line refusal of a head that cannot split the vocabulary."""
    able = ", ".join(n for n, c in HEADS.items() if c.shards_vocab)
    return (f"the {name} head cannot split its vocabulary over devices: use "
            f"--config.parallel.mesh.model=1, or one of the heads that can ({able})")


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    """Class decorator: make a head selectable as `config.model.head = name`."""
    def register(cls):
        if name in HEADS:
            raise ValueError(f"a head named {name!r} is already registered")
        if not (isinstance(cls, type) and issubclass(cls, Head)):
            raise ConfigError(f"head {name!r}: {getattr(cls, '__name__', cls)} must "
                              "subclass mos_jax.heads.Head (which declares its facts: "
                              "tied, flops_per_token, fuses_loss)")
        HEADS[name] = cls
        return cls
    return register


PLUGINS_ENV = "MOS_JAX_HEADS"
# Built-in heads in modules of their own (below this one in the layers, so imported
# when the registry is asked, as plugins are): importing one registers its heads.
BUILTIN_HEAD_MODULES = ("mos_jax.adaptive",)
_loaded_plugins: set[str] = set()


def load_plugins(spec: str | None = None) -> None:
    """Import the built-in head modules (`BUILTIN_HEAD_MODULES`), then the head modules
    named in `spec` (default: $MOS_JAX_HEADS).

    A comma-separated list of Python files (`my_heads.py`) or importable modules
    (`mypkg.heads`); importing one runs its `@register_head` decorators. Each loads once.
    """
    for module in BUILTIN_HEAD_MODULES:
        if module not in _loaded_plugins:
            importlib.import_module(module)
            _loaded_plugins.add(module)
    spec = os.environ.get(PLUGINS_ENV, "") if spec is None else spec
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item in _loaded_plugins:
            continue
        try:
            if item.endswith(".py"):
                path = Path(item)
                if not path.is_file():
                    raise ConfigError(f"{PLUGINS_ENV}: no head file at {item}")
                mod_spec = importlib.util.spec_from_file_location(
                    f"mos_jax_heads_plugin_{path.stem}", path)
                module = importlib.util.module_from_spec(mod_spec)
                mod_spec.loader.exec_module(module)
            else:
                importlib.import_module(item)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"{PLUGINS_ENV}: importing {item} failed: "
                              f"{type(e).__name__}: {e}") from e
        _loaded_plugins.add(item)


def get_head(name: str) -> type[Head]:
    if name not in HEADS:
        load_plugins()
    try:
        return HEADS[name]
    except KeyError:
        raise ConfigError(f"unknown head {name!r}: choose one of "
                          f"{', '.join(sorted(HEADS))} (a head of your own: register it "
                          f"with @register_head in a file named in ${PLUGINS_ENV})"
                          ) from None


def importable_heads(layout: str | None = None) -> list[str]:
    """The heads reference weights can be read into (those declaring a
    `reference_layout`; only `layout`'s when given), in the order they registered: the
    first of a layout is what `mos-jax import` reads weights of that layout as."""
    load_plugins()
    return [name for name, cls in HEADS.items() if cls.reference_layout is not None
            and layout in (None, cls.reference_layout)]


def logsumexp(x: jax.Array) -> jax.Array:
    """log(sum(exp(x))) over the last axis, shifted by its (constant) maximum.

    The same math as `jax.nn.logsumexp`; written out because XLA on CPU runs this form,
    on 2-D [rows, V] logits, markedly faster forward and backward (BENCHMARKS.md).
    """
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    return (m + jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def decoder_logits(context: jax.Array, embedding: jax.Array, bias: jax.Array,
                   dtype) -> jax.Array:
    """`context @ embedding^T + bias` as one 2-D matmul: [..., D] -> [..., V]."""
    flat = context.reshape(-1, context.shape[-1])
    logits = dot(flat, embedding.T, dtype) + bias
    return logits.reshape(*context.shape[:-1], embedding.shape[0])


def log_normalisers(context: jax.Array, embedding: jax.Array, bias: jax.Array,
                    dtype, vocab_chunk=0, valid=None) -> tuple[jax.Array, jax.Array | None]:
    """`(lse, logits)` of `context @ embedding^T + bias` for context [..., D].

    `lse` [...] float32 over the rows that are words (`valid`, `collectives.valid_rows`;
    None: all); `logits` [..., V] on the plain path (unmasked: mask what is made of
    them with `collectives.mask_rows`), None when streamed.
    """
    rows = int(np.prod(context.shape[:-1]))
    chunk = resolve_chunk(vocab_chunk, rows, embedding.shape[0])
    if chunk:
        flat = context.reshape(rows, context.shape[-1])
        lse = chunked_logsumexp(flat, embedding, bias, chunk, jnp.dtype(dtype),
                                "identity", valid)
        return lse.reshape(context.shape[:-1]), None
    logits = decoder_logits(context, embedding, bias, dtype)
    return logsumexp(collectives.mask_rows(logits, valid)), logits


def fused_output(latent: jax.Array, log_prior: jax.Array | None, embedding: jax.Array,
                 bias: jax.Array, targets: jax.Array | None,
                 target_weights: jax.Array | None, dtype, vocab_chunk,
                 words: int | None = None) -> HeadOutput | None:
    """The fused training loss of a mixture of tied softmaxes, or None where not asked.

    latent [..., E, D], log_prior [..., E] (None: one component), targets and
    target_weights [...]. Taken when `target_weights` is given (a training loss) and
    `vocab_chunk` is "auto" or "fused" (`mos_jax.fused`: loss and gradients in one
    pass over row chunks); returns target log-probabilities (gradient stopped) and
    `nll = -sum(target_weights * target_logprobs)`. `words`: the embedding's rows
    that are words (a padded vocabulary on one device; None: all).
    """
    if targets is None or target_weights is None:
        return None
    lead, (e, d), v = targets.shape, latent.shape[-2:], embedding.shape[0]
    n = int(np.prod(lead))
    rows = fused_rows(vocab_chunk, n, e, v, d)
    if not rows:
        return None
    if log_prior is None:
        log_prior = jnp.zeros((*lead, e), jnp.float32)
    nll, lp = mixture_nll(latent.reshape(n, e, d), log_prior.reshape(n, e), embedding,
                          bias, targets.reshape(n),
                          target_weights.reshape(n).astype(jnp.float32), rows,
                          jnp.dtype(dtype), words)
    return HeadOutput(lp.reshape(lead), None, nll)


def _softmax_output(context: jax.Array, embedding: jax.Array, bias: jax.Array,
                    targets: jax.Array | None, return_logprobs: bool,
                    dtype, vocab_chunk=0, target_weights=None,
                    words: int | None = None) -> HeadOutput:
    """log softmax(context @ embedding^T + bias) for context [..., D]; on a vocabulary
    split over devices (`collectives`), the embedding's and bias's block of rows;
    `words`: the words V of a padded vocabulary (None: every row is one)."""
    if not return_logprobs and not collectives.vocab_axis():  # split: streamed/plain
        fused = fused_output(context[..., None, :], None, embedding, bias, targets,
                             target_weights, dtype, vocab_chunk, words)
        if fused is not None:
            return fused
    valid = collectives.valid_rows(embedding.shape[0], words)
    context = collectives.enter(context)  # each vocabulary shard adds its gradient
    lse, logits = log_normalisers(context, embedding, bias, dtype,
                                  0 if return_logprobs else vocab_chunk, valid)
    lse = collectives.combine_lse(lse)
    target_lp = None
    if targets is not None:
        index, mask = collectives.local_ids(targets, embedding.shape[0])
        target_logit = jnp.einsum("...d,...d->...", context.astype(jnp.float32),
                                  jnp.take(embedding, index, axis=0))
        target_logit = collectives.shard_sum(
            collectives.masked(target_logit + jnp.take(bias, index), mask))
        target_lp = target_logit - lse
    return HeadOutput(target_lp, collectives.gather_vocab(
        collectives.mask_rows(logits - lse[..., None], valid), words)
        if return_logprobs else None)


@register_head("softmax")
class Softmax(Head):
    """The plain tied softmax: `log softmax(hidden @ E^T + b)`; needs H == D.

    2 D V FLOPs per token (the default); rank at most D + 2 (`mos_jax.rank`).
    """

    tied = True
    fuses_loss = True
    shards_vocab = True
    reference_layout = "softmax"

    @classmethod
    def rank_bound(cls, mc) -> int:
        return mc.emsize + 2

    @nn.compact
    def __call__(self, hidden, embedding, targets=None, *, deterministic=True,
                 return_logprobs=False, target_weights=None) -> HeadOutput:
        bias = self.param("decoder_bias", nn.initializers.zeros, (embedding.shape[0],))
        return _softmax_output(hidden, embedding, bias, targets, return_logprobs,
                               self.dtype, self.vocab_chunk, target_weights,
                               self.vocab_size)


class _Mixture(Head):
    """Shared parameters of the mixture heads: prior, latent projection, bias.

    FLOPs per token: prior 2 H E, latent 2 H E D, then one decoder product per
    component, 2 E D V (MoC overrides: one product of the mixed context).
    """

    n_experts: int = 15

    @classmethod
    def mixture_flops_per_token(cls, mc) -> int:
        """The prior and latent projections: 2 H E + 2 H E D."""
        h, d, e = mc.output_size, mc.emsize, mc.n_experts
        return 2 * h * e + 2 * h * e * d

    @classmethod
    def flops_per_token(cls, mc) -> int:
        return (cls.mixture_flops_per_token(mc)
                + 2 * mc.n_experts * mc.emsize * vocab_rows(mc))

    def mixture(self, hidden, embedding, deterministic):
        """Log prior [T, B, E], latent [T, B, E, D] (after dropout), decoder bias."""
        n_in, d = hidden.shape[-1], embedding.shape[-1]
        init = uniform_init(n_in ** -0.5)
        prior_kernel = self.param("prior_kernel", init, (n_in, self.n_experts))
        latent_kernel = self.param("latent_kernel", init, (n_in, self.n_experts * d))
        latent_bias = self.param("latent_bias", init, (self.n_experts * d,))
        bias = self.param("decoder_bias", nn.initializers.zeros, (embedding.shape[0],))
        log_prior = jax.nn.log_softmax(dot(hidden, prior_kernel, self.dtype), axis=-1)
        latent = jnp.tanh(dot(hidden, latent_kernel, self.dtype) + latent_bias)
        rng = None if deterministic or self.dropoutl == 0.0 else self.make_rng("dropout")
        latent = locked_dropout(latent, self.dropoutl, rng)
        return log_prior, latent.reshape(*latent.shape[:-1], self.n_experts, d), bias


@register_head("mos")
class MixtureOfSoftmaxes(_Mixture):
    """Mixture of softmaxes, in log space (docs/reference.md section 2, step 5).

    `log p(w) = logsumexp_e(log prior_e + log_softmax(latent_e @ E^T + b)_w)`. Target
    log-probabilities need only the per-expert log-normalisers and target logits, so no
    [T, B, E, V] log-softmax is kept beyond what the normalisers need.
    """

    fuses_loss = True
    shards_vocab = True
    reference_layout = "mixture"

    @nn.compact
    def __call__(self, hidden, embedding, targets=None, *, deterministic=True,
                 return_logprobs=False, target_weights=None) -> HeadOutput:
        log_prior, latent, bias = self.mixture(hidden, embedding, deterministic)
        if not return_logprobs and not collectives.vocab_axis():  # split: streamed/plain
            fused = fused_output(latent, log_prior, embedding, bias, targets,
                                 target_weights, self.dtype, self.vocab_chunk,
                                 self.vocab_size)
            if fused is not None:
                return fused
        valid = collectives.valid_rows(embedding.shape[0], self.vocab_size)
        latent = collectives.enter(latent)  # each vocabulary shard adds its gradient
        # [T, B, E] normalisers; logits [T, B, E, V] unless streamed
        lse, logits = log_normalisers(latent, embedding, bias, self.dtype,
                                      0 if return_logprobs else self.vocab_chunk, valid)
        lse = collectives.combine_lse(lse)
        target_lp = None
        if targets is not None:
            index, mask = collectives.local_ids(targets, embedding.shape[0])
            target_emb = jnp.take(embedding, index, axis=0)  # [T, B, D]
            target_logit = jnp.einsum("tbed,tbd->tbe", latent.astype(jnp.float32),
                                      target_emb) + jnp.take(bias, index)[..., None]
            target_logit = collectives.shard_sum(collectives.masked(target_logit, mask))
            target_lp = jax.nn.logsumexp(log_prior + target_logit - lse, axis=-1)
        logprobs = None
        if return_logprobs:
            logprobs = collectives.gather_vocab(collectives.mask_rows(jax.nn.logsumexp(
                (log_prior - lse)[..., None] + logits, axis=-2), valid), self.vocab_size)
        return HeadOutput(target_lp, logprobs)


@register_head("moc")
class MixtureOfContexts(_Mixture):
    """The paper's MoC baseline: `softmax((sum_e prior_e latent_e) @ E^T + b)`.

    FLOPs per token: the mixture's projections and one decoder product, 2 D V; rank at
    most D + 2, as a softmax over a D-vector.
    """

    fuses_loss = True
    shards_vocab = True
    reference_layout = "mixture"  # MoS's parameters, mixed before the decoder

    @classmethod
    def flops_per_token(cls, mc) -> int:
        return cls.mixture_flops_per_token(mc) + 2 * mc.emsize * vocab_rows(mc)

    @classmethod
    def rank_bound(cls, mc) -> int:
        return mc.emsize + 2

    @nn.compact
    def __call__(self, hidden, embedding, targets=None, *, deterministic=True,
                 return_logprobs=False, target_weights=None) -> HeadOutput:
        log_prior, latent, bias = self.mixture(hidden, embedding, deterministic)
        context = jnp.einsum("tbe,tbed->tbd", jnp.exp(log_prior), latent)
        return _softmax_output(context, embedding, bias, targets, return_logprobs,
                               self.dtype, self.vocab_chunk, target_weights,
                               self.vocab_size)


# Sigsoftmax (Kanai et al., NeurIPS 2018), mixture of sigsoftmaxes (same paper) and
# Mixtape (Yang et al., NeurIPS 2019).


def sig_log_normalisers(context: jax.Array, embedding: jax.Array, bias: jax.Array,
                        dtype, vocab_chunk=0, valid=None
                        ) -> tuple[jax.Array, jax.Array | None]:
    """`(lse, g)` of the sigsoftmax logits of context [..., D].

    `z = context @ embedding^T + bias`, `g = z + log_sigmoid(z)` (so `exp(g) = exp(z)
    sigmoid(z)`), `lse = logsumexp_v g_v` [...] float32; `g` [..., V] on the plain path,
    None when streamed (`chunked_logsumexp(..., transform="sigsoftmax")`). As
    `log_normalisers`: `lse` over the rows that are words (`valid`), `g` unmasked.
    """
    rows = int(np.prod(context.shape[:-1]))
    chunk = resolve_chunk(vocab_chunk, rows, embedding.shape[0])
    if chunk:
        flat = context.reshape(rows, context.shape[-1])
        lse = chunked_logsumexp(flat, embedding, bias, chunk, jnp.dtype(dtype),
                                "sigsoftmax", valid)
        return lse.reshape(context.shape[:-1]), None
    g = transform_logits(decoder_logits(context, embedding, bias, dtype), "sigsoftmax")
    return logsumexp(collectives.mask_rows(g, valid)), g


@register_head("sigsoftmax")
class Sigsoftmax(Head):
    """Tied sigsoftmax: `p(w) = exp(z_w) sigmoid(z_w) / sum_v exp(z_v) sigmoid(z_v)`.

    `z = hidden @ E^T + b`; in log space `log p(w) = g(z_w) - logsumexp_v g(z_v)` with
    `g(z) = z + log_sigmoid(z)`. Like the softmax head the decoder is the embedding, so
    nhidlast must equal emsize (no projection; a ConfigError otherwise). Parameters:
    `decoder_bias` [V] (V in all). Streams (`vocab_chunk`) like the softmax head.
    2 D V FLOPs per token (the default); the element-wise g(z) lifts the softmax's
    rank bound, so none is declared.
    """

    tied = True
    shards_vocab = True

    @nn.compact
    def __call__(self, hidden, embedding, targets=None, *, deterministic=True,
                 return_logprobs=False) -> HeadOutput:
        bias = self.param("decoder_bias", nn.initializers.zeros, (embedding.shape[0],))
        valid = collectives.valid_rows(embedding.shape[0], self.vocab_size)
        hidden = collectives.enter(hidden)  # each vocabulary shard adds its gradient
        lse, g = sig_log_normalisers(hidden, embedding, bias, self.dtype,
                                     0 if return_logprobs else self.vocab_chunk, valid)
        lse = collectives.combine_lse(lse)
        target_lp = None
        if targets is not None:
            index, mask = collectives.local_ids(targets, embedding.shape[0])
            z = jnp.einsum("...d,...d->...", hidden.astype(jnp.float32),
                           jnp.take(embedding, index, axis=0)) + jnp.take(bias, index)
            target_lp = collectives.shard_sum(collectives.masked(
                transform_logits(z, "sigsoftmax"), mask)) - lse
        return HeadOutput(target_lp, collectives.gather_vocab(
            collectives.mask_rows(g - lse[..., None], valid), self.vocab_size)
            if return_logprobs else None)


@register_head("moss")
class MixtureOfSigsoftmaxes(_Mixture):
    """Mixture of sigsoftmaxes: MoS with each component a sigsoftmax, in log space.

    With `_Mixture`'s prior and latent (`latent_e = dropoutl(tanh(hidden W_lat + b_lat))`
    [D] per expert e) and `z_e = latent_e @ E^T + b`:
    `log p(w) = logsumexp_e(log prior_e + g(z_e,w) - logsumexp_v g(z_e,v))`,
    `g(z) = z + log_sigmoid(z)`. Parameters as MoS: `prior_kernel` [H, E],
    `latent_kernel` [H, E*D], `latent_bias` [E*D], `decoder_bias` [V], i.e.
    `H*E + E*D*(H + 1) + V`. Target log-probabilities stream over the vocabulary.
    """

    shards_vocab = True

    @nn.compact
    def __call__(self, hidden, embedding, targets=None, *, deterministic=True,
                 return_logprobs=False) -> HeadOutput:
        log_prior, latent, bias = self.mixture(hidden, embedding, deterministic)
        valid = collectives.valid_rows(embedding.shape[0], self.vocab_size)
        latent = collectives.enter(latent)  # each vocabulary shard adds its gradient
        # [T, B, E] normalisers; g [T, B, E, V] unless streamed
        lse, g = sig_log_normalisers(latent, embedding, bias, self.dtype,
                                     0 if return_logprobs else self.vocab_chunk, valid)
        lse = collectives.combine_lse(lse)
        target_lp = None
        if targets is not None:
            index, mask = collectives.local_ids(targets, embedding.shape[0])
            target_emb = jnp.take(embedding, index, axis=0)  # [T, B, D]
            z = jnp.einsum("tbed,tbd->tbe", latent.astype(jnp.float32),
                           target_emb) + jnp.take(bias, index)[..., None]
            z = collectives.shard_sum(collectives.masked(
                transform_logits(z, "sigsoftmax"), mask))
            target_lp = jax.nn.logsumexp(log_prior + z - lse, axis=-1)
        logprobs = None
        if return_logprobs:
            logprobs = collectives.gather_vocab(collectives.mask_rows(
                jax.nn.logsumexp((log_prior - lse)[..., None] + g, axis=-2), valid),
                self.vocab_size)
        return HeadOutput(target_lp, logprobs)


def sigmoid_tree_paths(k: int) -> tuple[tuple[tuple[int, bool], ...], ...]:
    """Root-to-leaf paths of the sigmoid tree with `k` leaves: `((gate, left), ...)`.

    The tree is the full binary tree in heap order with internal nodes (gates)
    0..k-2 (children of node n: 2n+1 left, 2n+2 right) and leaf j at node k-1+j; for a
    power of two it is the balanced tree. For k=4: leaf 0 = (g0 left, g1 left),
    leaf 1 = (g0 left, g1 right), leaf 2 = (g0 right, g2 left), leaf 3 = (g0 right,
    g2 right).
    """
    paths = []
    for leaf in range(k):
        node, path = k - 1 + leaf, []
        while node > 0:
            parent = (node - 1) // 2
            path.append((parent, node == 2 * parent + 1))
            node = parent
        paths.append(tuple(reversed(path)))
    return tuple(paths)


def sigmoid_tree_log_priors(gate_logits: jax.Array, k: int, axis: int = -1) -> jax.Array:
    """`log pi` [.., k, ..] from pre-sigmoid gate logits [.., k-1, ..] along `axis`.

    `pi_j = prod over the path of leaf j of sigmoid(l_gate)` (left branch) or
    `1 - sigmoid(l_gate) = sigmoid(-l_gate)` (right branch), so `sum_j pi_j = 1`. For
    k=4 (s_i = sigmoid(l_i)): pi = (s0 s1, s0 (1-s1), (1-s0) s2, (1-s0) (1-s2)).
    Float32: `log pi = A log_sigmoid(l) + B log_sigmoid(-l)` with the 0/1 path matrices
    A, B [k, k-1] (left / right branches), contracted at full float32 precision.
    """
    axis = axis % gate_logits.ndim
    if k == 1:
        shape = list(gate_logits.shape)
        shape[axis] = 1
        return jnp.zeros(shape, jnp.float32)
    left_of, right_of = np.zeros((k, k - 1), np.float32), np.zeros((k, k - 1), np.float32)
    for leaf, path in enumerate(sigmoid_tree_paths(k)):
        for gate, is_left in path:
            (left_of if is_left else right_of)[leaf, gate] = 1.0
    gates = gate_logits.astype(jnp.float32)
    log_pi = sum(jnp.tensordot(m, jax.nn.log_sigmoid(sign * gates), axes=([1], [axis]),
                               precision=jax.lax.Precision.HIGHEST)
                 for m, sign in ((left_of, 1.0), (right_of, -1.0)))
    return jnp.moveaxis(log_pi, 0, axis)


def default_gate_shared_from(vocab_size: int) -> int:
    """Mixtape's gate-sharing threshold S: word ids >= S share one gate vector.

    `ceil(V / 4)`: the first quarter of the ids get their own gates. mos-jax numbers
    words in order of first occurrence in the training text, which tracks frequency
    (frequent words appear early), so this is a config-free stand-in for the paper's
    "frequent words" (exact for a frequency-sorted vocabulary).
    """
    return max(1, -(-vocab_size // 4))


@register_head("mixtape")
class Mixtape(Head):
    """Mixtape: K contexts gated per word in logit space, then ONE softmax.

    Equations (K = n_experts, g = hidden [H], E the tied embedding [V, D], w_x = E[x];
    S = gate_shared_from, default `default_gate_shared_from(V)`; r(x) = min(x, S) the
    gate row of word x, so every word with id >= S uses the one shared row S):

        h_k       = dropoutl(tanh(g W_k + c_k))                    k = 1..K, in R^D
        l_{x,j}   = v_{r(x)} . tanh(g U_j) + u_j . g + b_{r(x),j}  j = 1..K-1 (gates)
        pi_{x,.}  = sigmoid tree over l_{x,.} (`sigmoid_tree_log_priors`; for K=4:
                    s1 s2, s1 (1-s2), (1-s1) s3, (1-s1)(1-s3), s_j = sigmoid(l_{x,j}))
        f_x       = sum_k pi_{x,k} h_k . w_x + b_x
        log p(x)  = f_x - logsumexp_x' f_x'

    These are the paper's logit-space vector gating (its l_{c,x,k} = v_x^T tanh(U_k g_c)
    + u_k^T g_c + b_{x,k}), sigmoid tree decomposition (generalised to any K with a
    heap-ordered full binary tree; the paper uses K = 4) and gate sharing. h_k are MoS's
    latent contexts (same parameter names and init, locked dropout p = dropoutl).

    Gate sharing also makes the head cheap: for the V-S shared words pi is the same, so
    their logits are `(sum_k pibar_k h_k) @ E[S:]^T + b[S:]`, one matmul; only the S
    gated words need the [rows, K, S] per-context logits (and gate logits [rows, K-1,
    S+1], the shared row included). A target's logit is a gather from the gated block
    (id < S) or `context . w_t + b_t` (id >= S), so no gates are recomputed for targets.

    Streaming: only the shared block streams over vocabulary chunks (`vocab_chunk`,
    through `chunked_logsumexp`; lse = logaddexp(lse_gated, lse_shared)). The gated block
    [rows, K, S] is always computed whole: its logits are a word-dependent non-linear
    mix of K matmuls, not one `x @ E^T + b`, so the streaming primitive does not apply
    (streaming it would need its own chunked custom VJP). Full distributions
    (`return_logprobs`) take the plain path.

    Parameters (d2 = gate_dim, the option `model.heads.mixtape.gate_dim`, default D;
    S' = S + 1 if S < V else S):
        latent_kernel [H, K*D] (W_k), latent_bias [K*D] (c_k), decoder_bias [V] (b_x),
        and for K > 1: gate_kernel [H, (K-1)*d2] (U_j), gate_context_kernel [H, K-1]
        (u_j), gate_embedding [S', d2] (v), gate_bias [S', K-1] (b_{.,j});
    in all K*D*(H + 1) + V + (K-1)*(H*d2 + H + S') + S'*d2 (the last two terms only
    for K > 1). Matmul operands in `dtype`, all gating and log-space math in float32.
    """

    n_experts: int = 4
    gate_dim: int | None = 0  # d2; 0 (or None): the embedding size D
    gate_shared_from: int | None = None  # S; None: default_gate_shared_from(V)

    options = {"gate_dim": HeadOption(
        0, "a whole number >= 0",
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "the width d2 of the gate vectors; 0: emsize")}

    @classmethod
    def flops_per_token(cls, mc) -> int:
        """As the model builds it (d2 = gate_dim, default D; the default S): latent
        2 H K D; gates 2 H (K-1) d2 + 2 H (K-1) and 2 (K-1) d2 per gate row (S, plus
        the shared one when S < V), for K > 1; the K contexts on the S gated words,
        2 K D S; one mixed context on the V - S others, 2 D (V - S)."""
        h, d, v, k = mc.output_size, mc.emsize, mc.vocab_size, mc.n_experts
        d2 = cls.option_values(mc)["gate_dim"] or d
        s = default_gate_shared_from(v)
        gates = (2 * h * (k - 1) * d2 + 2 * h * (k - 1)
                 + 2 * (k - 1) * d2 * (s + (s < v))) if k > 1 else 0
        return 2 * h * k * d + gates + 2 * k * d * s + 2 * d * (v - s)

    @nn.compact
    def __call__(self, hidden, embedding, targets=None, *, deterministic=True,
                 return_logprobs=False) -> HeadOutput:
        lead, n_in = hidden.shape[:-1], hidden.shape[-1]
        v, d = embedding.shape
        k = self.n_experts
        s = (default_gate_shared_from(v) if self.gate_shared_from is None
             else int(self.gate_shared_from))
        if not 1 <= s <= v:
            raise ConfigError(f"mixtape: gate_shared_from={s} must be in [1, V={v}]")
        d2 = int(self.gate_dim or d)
        shared = s < v
        rows = int(np.prod(lead))
        init = uniform_init(n_in ** -0.5)
        latent_kernel = self.param("latent_kernel", init, (n_in, k * d))
        latent_bias = self.param("latent_bias", init, (k * d,))
        bias = self.param("decoder_bias", nn.initializers.zeros, (v,))
        latent = jnp.tanh(dot(hidden, latent_kernel, self.dtype) + latent_bias)
        rng = None if deterministic or self.dropoutl == 0.0 else self.make_rng("dropout")
        latent = locked_dropout(latent, self.dropoutl, rng)
        h = latent.reshape(rows, k, d)  # [rows, K, D]
        g = hidden.reshape(rows, n_in)

        n_gate_rows = s + 1 if shared else s  # row S: the one shared by ids >= S
        if k > 1:
            gate_kernel = self.param("gate_kernel", init, (n_in, (k - 1) * d2))
            gate_context_kernel = self.param("gate_context_kernel", init, (n_in, k - 1))
            gate_embedding = self.param("gate_embedding", uniform_init(0.1),
                                        (n_gate_rows, d2))
            gate_bias = self.param("gate_bias", nn.initializers.zeros,
                                   (n_gate_rows, k - 1))
            q = jnp.tanh(dot(g, gate_kernel, self.dtype))  # [rows, (K-1)*d2]
            qu = dot(g, gate_context_kernel, self.dtype)  # [rows, K-1]
            # l for every gate row: [rows, K-1, S']
            gates = (dot(q.reshape(rows * (k - 1), d2), gate_embedding.T, self.dtype)
                     .reshape(rows, k - 1, n_gate_rows) + qu[..., None] + gate_bias.T)
        else:
            gates = jnp.zeros((rows, 0, n_gate_rows), jnp.float32)
        pi = jnp.exp(sigmoid_tree_log_priors(gates, k, axis=1))  # [rows, K, S']

        # Gated block: f_x for x < S, [rows, S].
        context_logits = dot(h.reshape(rows * k, d), embedding[:s].T,
                             self.dtype).reshape(rows, k, s)
        gated = jnp.sum(pi[..., :s] * context_logits, axis=1) + bias[:s]
        lse = logsumexp(gated)
        logits = gated
        if shared:  # one mixed context for the words S..V-1
            context = jnp.einsum("nk,nkd->nd", pi[..., s], h.astype(jnp.float32))
            chunk = resolve_chunk(0 if return_logprobs else self.vocab_chunk, rows, v - s)
            if chunk:
                lse_shared = chunked_logsumexp(context, embedding[s:], bias[s:], chunk,
                                               jnp.dtype(self.dtype))
                lse = jnp.logaddexp(lse, lse_shared)
            else:
                logits = jnp.concatenate(
                    [gated, dot(context, embedding[s:].T, self.dtype) + bias[s:]], axis=-1)
                lse = logsumexp(logits)

        target_lp = None
        if targets is not None:  # f_t: a gather from the gated block, or context . w_t
            t = targets.reshape(rows)
            f_t = jnp.take_along_axis(gated, jnp.minimum(t, s - 1)[:, None], axis=-1)[:, 0]
            if shared:
                f_shared = jnp.einsum("nd,nd->n", context, jnp.take(embedding, t, axis=0))
                f_t = jnp.where(t < s, f_t, f_shared + jnp.take(bias, t))
            target_lp = (f_t - lse).reshape(lead)
        logprobs = None
        if return_logprobs:
            logprobs = (logits - lse[:, None]).reshape(*lead, v)
        return HeadOutput(target_lp, logprobs)


def parse_names(text: str | Sequence[str]) -> list[str]:
    """Head names from "softmax,mos" (or a list); unknown names raise ConfigError."""
    names = [h.strip() for h in (text.split(",") if isinstance(text, str) else text)]
    names = [h for h in names if h]
    if not names:
        raise ConfigError("give at least one head, e.g. --heads softmax,mos "
                          f"(registered: {', '.join(sorted(HEADS))})")
    for name in names:
        get_head(name)  # ConfigError listing the registered heads
    dupes = sorted({h for h in names if names.count(h) > 1})
    if dupes:
        raise ConfigError(f"head {', '.join(dupes)} given twice: list each head once")
    return names
