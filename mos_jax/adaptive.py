"""Adaptive softmax heads: `adaptive` and `adaptive_mos` (registered in `mos_jax.heads`).

**adaptive**: the adaptive softmax of Grave et al. (2017), with the semantics of
`torch.nn.AdaptiveLogSoftmaxWithLoss(H, V, cutoffs, div_value, head_bias)`. Word ids
are split by `cutoffs` c_0 < c_1 < ... < c_{n-1} (c_n = V): the shortlist is ids
< S = c_0, cluster i holds ids c_i .. c_{i+1}-1 (i = 0..n-1). With x = hidden [H]:

    head_lp   = log_softmax(W_head x + b_head)           [S + n]  (b_head: head_bias)
    log p(w)  = head_lp[w]                                for w < S
    log p(w)  = head_lp[S + i] + log_softmax(O_i P_i x)[w - c_i]   for w in cluster i

Parameters (every vocabulary-sized one has the words as its FIRST axis, so it can be
split by rows over a `model` mesh axis later):

    head_weight   [S + n, H]      (torch: head.weight)
    head_bias     [S + n]         only with head_bias (torch: head.bias)
    tail_{i}_proj [hsz_i, H]      P_i (torch: tail.{i}.0.weight)
    tail_{i}_out  [osz_i, hsz_i]  O_i (torch: tail.{i}.1.weight)

with hsz_i = int(H // div_value ** (i + 1)) and osz_i = c_{i+1} - c_i. The head is
untied: it reads `hidden` (H = the encoder's output width) and ignores the embedding.
Initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every matrix, zeros for the bias.

**adaptive_mos**: a mixture of K = n_experts adaptive softmaxes, in log space:

    log pi    = log_softmax(hidden W_pi)                  [K]   (prior_kernel [H, K])
    h_k       = dropoutl(tanh(hidden W_k + c_k))          [D]   (latent_kernel [H, K*D],
                                                                 latent_bias [K*D])
    log p(w)  = logsumexp_k(log pi_k + log p_k(w | h_k))

with D = model.emsize and each p_k an adaptive softmax whose head (the matrix
`head_weight` [S + n, D], and `head_bias`, shared by the components) reads h_k, so
every component has its own cluster logits (locked dropout on the latents, as MoS).
Its tails (option `tails`): `one` (default) one tail per cluster reading `hidden`, the
same for every component, so `log p(w) = log sum_k pi_k p_k(c(w)) + log p(w | c(w))`
with `tail_{i}_proj` [hsz_i, H]; `shared`: the tails read h_k through one projection
per cluster (`tail_{i}_proj` [hsz_i, D]); `separate`: one projection per component
([K, hsz_i, D]). The tail outputs `tail_{i}_out` [osz_i, hsz_i] are shared throughout.
hsz_i = int(Din // div_value ** (i + 1)), Din the width the tails read.

Paths. Full log-probabilities (`return_logprobs`) compute every tail for every row:
[T, B, V] exactly. Target log-probabilities otherwise (training and scoring) compute a
tail only for the rows whose target is in it: per cluster the rows are gathered
(members first, by a stable argsort of the membership mask) and processed in chunks of
`TAIL_CHUNK_ROWS` rows (`lax.map` over ceil(rows / C) chunks); a chunk holding no
member is skipped by `lax.cond`, so the tail work falls with the fraction of targets in
the tail (granularity C), forward and backward.

Cutoffs: `model.heads.<head>.cutoffs` is `auto` or comma-separated ids ("2000,10000").
`auto` is `auto_cutoffs(V)`: round(V / 20) and round(V / 5), each clipped to [1, V-1],
duplicates dropped. The heads declare `wants_frequency_order`: ids should be in order
of training frequency so that the shortlist holds the frequent words.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mos_jax import collectives
from mos_jax.errors import ConfigError
from mos_jax.heads import (Head, HeadOption, HeadOutput, fused_output, logsumexp,
                           register_head)
from mos_jax.layers import dot, locked_dropout, uniform_init

# Rows per tail chunk on the target path: a chunk with no row whose target is in the
# tail is skipped. (Fewer rows than this: one chunk of all rows.)
TAIL_CHUNK_ROWS = 64

# Test-only: when set (a callable of one int), every executed tail chunk of the target
# path calls it with its cluster index through `jax.debug.callback` (read at trace time).
TAIL_CHUNK_HOOK = None


def _parse_cutoffs(value) -> tuple[int, ...] | str:
    """`auto`, or the cutoffs as ints; raises ValueError on anything else."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        parts = [p.strip() for p in text.strip("()[]").split(",") if p.strip()]
        if not parts:
            raise ValueError("no cutoffs")
        return tuple(int(p) for p in parts)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(f"cannot read {value!r} as cutoffs")


def cutoffs_ok(value) -> bool:
    """`auto`, or cutoffs strictly increasing and >= 1 (the bound V is checked later)."""
    try:
        cut = _parse_cutoffs(value)
    except ValueError:
        return False
    return cut == "auto" or (cut[0] >= 1 and all(a < b for a, b in zip(cut, cut[1:])))


def auto_cutoffs(vocab_size: int) -> tuple[int, ...]:
    """round(V / 20) and round(V / 5), each clipped to [1, V - 1], deduplicated."""
    v = int(vocab_size)
    return tuple(sorted({min(max(1, round(v / f)), v - 1) for f in (20, 5)}))


def resolve_cutoffs(value, vocab_size: int, head: str = "adaptive") -> tuple[int, ...]:
    """The cutoffs for a vocabulary of `vocab_size` words; ConfigError (one line) when
    they are not strictly increasing ids in [1, V - 1]."""
    key = f"model.heads.{head}.cutoffs"
    if vocab_size < 2:
        raise ConfigError(f"the {head} head needs at least 2 words (V = {vocab_size})")
    try:
        cut = _parse_cutoffs(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r}: use auto or strictly increasing word ids, "
                          "e.g. 2000,10000") from None
    if cut == "auto":
        return auto_cutoffs(vocab_size)
    if any(b <= a for a, b in zip(cut, cut[1:])):
        raise ConfigError(f"{key}={value!r} must be strictly increasing: e.g. 2000,10000")
    if cut[0] < 1 or cut[-1] >= vocab_size:
        raise ConfigError(f"{key}={value!r}: each cutoff must be in [1, V - 1] = "
                          f"[1, {vocab_size - 1}] for this corpus's {vocab_size} words: "
                          "lower them, or use auto")
    return cut


def tail_sizes(width: int, div_value: float, cutoffs: Sequence[int], vocab_size: int,
               head: str = "adaptive") -> list[tuple[int, int]]:
    """`(hsz_i, osz_i)` per cluster: hsz_i = int(width // div_value ** (i + 1)),
    osz_i = c_{i+1} - c_i; ConfigError when a projection size is 0."""
    bounds = list(cutoffs) + [vocab_size]
    sizes = []
    for i in range(len(cutoffs)):
        hsz = int(width // (div_value ** (i + 1)))
        if hsz < 1:
            raise ConfigError(
                f"the {head} head's cluster {i} (ids {bounds[i]}..{bounds[i + 1] - 1}) "
                f"would project width {width} to int({width} // {div_value:g}^{i + 1}) = "
                f"0: lower model.heads.{head}.div_value, use fewer cutoffs, or widen the "
                "head's input")
        sizes.append((hsz, bounds[i + 1] - bounds[i]))
    return sizes


def zipf_fractions(cutoffs: Sequence[int], vocab_size: int) -> list[float]:
    """The fraction of tokens in each cluster if word id r-1 has frequency ~ 1 / r
    (Zipf over V words, ids in frequency order): (H(c_{i+1}) - H(c_i)) / H(V), H the
    harmonic numbers."""
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, vocab_size + 1))])
    bounds = list(cutoffs) + [vocab_size]
    return [float((harmonic[bounds[i + 1]] - harmonic[bounds[i]]) / harmonic[-1])
            for i in range(len(cutoffs))]


def _positive(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _bool(value) -> bool:
    return isinstance(value, bool)


_ADAPTIVE_OPTIONS = {
    "cutoffs": HeadOption("auto", "auto or strictly increasing word ids >= 1, e.g. "
                          "2000,10000", cutoffs_ok,
                          "the shortlist size, then the first id of each further "
                          "cluster; auto: round(V/20), round(V/5)"),
    "div_value": HeadOption(4.0, "a number > 0", _positive,
                            "cluster i projects to width // div_value^(i+1)"),
    "head_bias": HeadOption(False, "true or false", _bool,
                            "a bias on the shortlist + cluster logits"),
}


def _members_first(member: jax.Array) -> jax.Array:
    """Row order with the rows where `member` holds first (stable)."""
    return jnp.argsort(jnp.logical_not(member).astype(jnp.int32), stable=True)


def _tail_logits(x: jax.Array, proj: jax.Array, out: jax.Array, dtype) -> jax.Array:
    """O P x: x [N, (K,) Din], proj [hsz, Din] (shared) or [K, hsz, Din] -> [N, (K,) osz]."""
    if proj.ndim == 2:
        z = dot(x, proj.T, dtype)
    else:
        z = jnp.einsum("nkd,khd->nkh", x.astype(dtype), proj.astype(dtype),
                       preferred_element_type=jnp.float32)
    return dot(z, out.T, dtype)


def tail_target_logprobs(x: jax.Array, local: jax.Array, member: jax.Array,
                         proj: jax.Array, out: jax.Array, cluster: int, dtype,
                         chunk: int | None = None) -> jax.Array:
    """log_softmax(O P x)[local] for the rows where `member` holds, 0 elsewhere.

    x [N, (K,) Din], local [N] (the target's id within the cluster), member [N] bool.
    Only the chunks (of `chunk` or `TAIL_CHUNK_ROWS` rows, members gathered first)
    that hold a member compute anything. Returns [N, (K,)] float32.
    """
    n, osz = x.shape[0], out.shape[0]
    c = max(1, min(chunk or TAIL_CHUNK_ROWS, n))
    n_chunks = -(-n // c)
    order = _members_first(member)
    count = jnp.sum(member.astype(jnp.int32))
    order = jnp.concatenate([order, jnp.zeros(n_chunks * c - n, order.dtype)])
    valid = jnp.arange(n_chunks * c) < count
    local = jnp.clip(local, 0, osz - 1)
    hook = TAIL_CHUNK_HOOK
    zeros = jnp.zeros((c, *x.shape[1:-1]), jnp.float32)

    def one_chunk(args):
        rows, start = args

        def compute(_):
            if hook is not None:
                jax.debug.callback(hook, cluster)
            logits = _tail_logits(jnp.take(x, rows, axis=0), proj, out, dtype)
            target = jnp.take(local, rows)
            target = target.reshape(c, *([1] * (logits.ndim - 1)))
            target = jnp.broadcast_to(target, (*logits.shape[:-1], 1))
            picked = jnp.take_along_axis(logits, target, axis=-1)[..., 0]
            return picked - logsumexp(logits)

        return jax.lax.cond(start < count, compute, lambda _: zeros, None)

    values = jax.lax.map(one_chunk, (order.reshape(n_chunks, c),
                                     jnp.arange(n_chunks) * c))
    values = values.reshape(n_chunks * c, *x.shape[1:-1])
    mask = valid.reshape(-1, *([1] * (values.ndim - 1)))
    values = jnp.where(mask, values, 0.0)
    return jnp.zeros((n, *x.shape[1:-1]), jnp.float32).at[order].add(values)


def clusters_of(targets: jax.Array, cutoffs: Sequence[int]) -> jax.Array:
    """0 for a shortlist target, i + 1 for a target in cluster i."""
    return sum((targets >= c).astype(jnp.int32) for c in cutoffs)


def head_targets(targets: jax.Array, cutoffs: Sequence[int]) -> jax.Array:
    """The head's class of each target: the word below S, else S + its cluster."""
    cluster = clusters_of(targets, cutoffs)
    return jnp.where(cluster == 0, targets, cutoffs[0] + cluster - 1)


def tail_terms(x: jax.Array, targets: jax.Array, tails, cutoffs: Sequence[int],
               dtype) -> jax.Array:
    """log_softmax(O_i P_i x)[target - c_i] for the rows whose target is in a tail
    cluster i, 0 for the shortlist rows: [N] for x [N, Din] (tail-skipping path)."""
    cluster = clusters_of(targets, cutoffs)
    total = jnp.zeros(targets.shape, jnp.float32)
    for i, (proj, out) in enumerate(tails):
        member = cluster == i + 1
        total = total + jnp.where(member, tail_target_logprobs(
            x, targets - cutoffs[i], member, proj, out, i, dtype), 0.0)
    return total


def adaptive_output(x: jax.Array, head_lp: jax.Array, log_prior: jax.Array | None,
                    tails: Sequence[tuple[jax.Array, jax.Array]],
                    cutoffs: Sequence[int], targets: jax.Array | None,
                    return_logprobs: bool, dtype) -> tuple[Any, Any]:
    """Target log-probabilities [N] and full ones [N, V] (or None) of an adaptive
    softmax, or of a mixture of them.

    x [N, (K,) Din] the tails' inputs, head_lp [N, (K,) S + n] the head's log-softmax,
    log_prior [N, K] (a mixture) or None, tails [(proj, out)] per cluster, targets [N].
    """
    s = cutoffs[0]
    full = None
    if return_logprobs:
        parts = [head_lp[..., :s]]
        for i, (proj, out) in enumerate(tails):
            logits = _tail_logits(x, proj, out, dtype)
            parts.append(head_lp[..., s + i, None] + logits
                         - logsumexp(logits)[..., None])
        full = jnp.concatenate(parts, axis=-1)  # [N, (K,) V]
        if log_prior is not None:
            full = jax.nn.logsumexp(log_prior[..., None] + full, axis=-2)
    target_lp = None
    if targets is not None and full is not None:
        target_lp = jnp.take_along_axis(full, targets[:, None], axis=-1)[:, 0]
    elif targets is not None:
        extra = (1,) * (head_lp.ndim - 2)  # the K axis of a mixture
        cluster = clusters_of(targets, cutoffs)  # 0: shortlist
        in_short = jnp.minimum(targets, s - 1).reshape(-1, *extra, 1)
        in_short = jnp.broadcast_to(in_short, (*head_lp.shape[:-1], 1))
        lp = jnp.take_along_axis(head_lp, in_short, axis=-1)[..., 0]  # [N, (K,)]
        for i, (proj, out) in enumerate(tails):
            member = cluster == i + 1
            tail_lp = tail_target_logprobs(x, targets - cutoffs[i], member, proj, out,
                                           i, dtype)
            lp = jnp.where(member.reshape(-1, *extra), head_lp[..., s + i] + tail_lp, lp)
        target_lp = lp if log_prior is None else jax.nn.logsumexp(log_prior + lp, axis=-1)
    return target_lp, full


@register_head("adaptive")
class AdaptiveSoftmax(Head):
    """The adaptive softmax (untied): `torch.nn.AdaptiveLogSoftmaxWithLoss` semantics.

    Equations, parameter shapes and paths: the `mos_jax.adaptive` module docstring.
    Options (`model.heads.adaptive.KEY`): cutoffs, div_value, head_bias. FLOPs per
    token (`flops_per_token`): the head 2 H (S + n) plus, per cluster, its tail 2 hsz
    (H + osz) times the fraction of tokens in it, taken as Zipf (frequency ~ 1 / rank
    over V words, ids in frequency order: `zipf_fractions`), the expected cost of the
    target path. No rank bound is declared.
    """

    # The input embedding splits over `model` like every head's; this head's own
    # parameters (shortlist, clusters, tails: none of them [V, ...]) stay whole on each
    # device, which computes the head in full. With a padded vocabulary
    # (`model.vocab_multiple`) only the embedding has the padded rows (never looked up:
    # ids are words); the shortlist and the clusters are over the words V.
    shards_vocab = True

    cutoffs: Any = "auto"
    div_value: float = 4.0
    head_bias: bool = False

    options = _ADAPTIVE_OPTIONS
    wants_frequency_order = True

    @classmethod
    def head_input_width(cls, mc) -> int:
        return mc.output_size

    @classmethod
    def structure(cls, mc, name: str = "adaptive"):
        """(cutoffs, [(hsz_i, osz_i)]) for model config `mc`; ConfigError if bad."""
        opts = cls.option_values(mc)
        cut = resolve_cutoffs(opts["cutoffs"], mc.vocab_size, name)
        return cut, tail_sizes(cls.head_input_width(mc), float(opts["div_value"]), cut,
                               mc.vocab_size, name)

    @classmethod
    def check_options(cls, name, mc) -> None:
        super().check_options(name, mc)
        cls.structure(mc, name)

    @classmethod
    def flops_per_token(cls, mc) -> int:
        cut, sizes = cls.structure(mc)
        h = cls.head_input_width(mc)
        fractions = zipf_fractions(cut, mc.vocab_size)
        tails = sum(f * 2 * hsz * (h + osz) for f, (hsz, osz) in zip(fractions, sizes))
        return int(round(2 * h * (cut[0] + len(cut)) + tails))

    def words(self, embedding) -> int:
        """The words V: `vocab_size` when set (a padded vocabulary's embedding has
        more rows, which these heads never score), else the whole embedding's rows."""
        if self.vocab_size is not None:
            return int(self.vocab_size)
        return embedding.shape[0] * collectives.shard_count()

    def build_tails(self, width: int, cut, v: int, per_component: int = 0):
        sizes = tail_sizes(width, float(self.div_value), cut, v)
        tails = []
        for i, (hsz, osz) in enumerate(sizes):
            shape = (per_component, hsz, width) if per_component else (hsz, width)
            proj = self.param(f"tail_{i}_proj", uniform_init(width ** -0.5), shape)
            out = self.param(f"tail_{i}_out", uniform_init(hsz ** -0.5), (osz, hsz))
            tails.append((proj, out))
        return tails

    def head_params(self, cut, width: int) -> tuple[jax.Array, jax.Array | None]:
        """`head_weight` [S + n, width] and `head_bias` [S + n] (None without it)."""
        n_head = cut[0] + len(cut)
        weight = self.param("head_weight", uniform_init(width ** -0.5), (n_head, width))
        bias = (self.param("head_bias", nn.initializers.zeros, (n_head,))
                if self.head_bias else None)
        return weight, bias

    def head_logprobs(self, x: jax.Array, cut, width: int, params=None) -> jax.Array:
        """log_softmax of the shortlist + cluster logits of x [..., width] (`params`:
        `head_params`' result when the caller already has it)."""
        weight, bias = self.head_params(cut, width) if params is None else params
        logits = dot(x, weight.T, self.dtype)
        if bias is not None:
            logits = logits + bias
        return logits - logsumexp(logits)[..., None]

    @nn.compact
    def __call__(self, hidden, embedding, targets=None, *, deterministic=True,
                 return_logprobs=False) -> HeadOutput:
        # the words V: the whole (unused) embedding's rows, also where it is split,
        # less a padded vocabulary's padding (the clusters are over the words)
        lead, width = hidden.shape[:-1], hidden.shape[-1]
        v = self.words(embedding)
        cut = resolve_cutoffs(self.cutoffs, v)
        x = hidden.reshape(-1, width)
        head_lp = self.head_logprobs(x, cut, width)
        tails = self.build_tails(width, cut, v)
        flat_targets = None if targets is None else targets.reshape(-1)
        target_lp, full = adaptive_output(x, head_lp, None, tails, cut, flat_targets,
                                          return_logprobs, self.dtype)
        return HeadOutput(None if target_lp is None else target_lp.reshape(lead),
                          None if full is None else full.reshape(*lead, v))


TAIL_MODES = ("one", "shared", "separate")


@register_head("adaptive_mos")
class AdaptiveMixture(AdaptiveSoftmax):
    """A mixture of K = n_experts adaptive softmaxes (untied), in log space.

    Equations and parameter shapes: the `mos_jax.adaptive` module docstring. Options
    (`model.heads.adaptive_mos.KEY`): cutoffs, div_value, head_bias and `tails`, how
    the components share their tail clusters:

      one (default): one tail per cluster, reading the encoder's output (as the
        `adaptive` head's tails), the same for every component. Each component k is
        the adaptive softmax whose head reads its own latent h_k and whose tails read
        the hidden state, so `log p(w) = log sum_k pi_k p_k(c(w)) + log p(w | c(w))`:
        the mixture is over the head (the shortlist and the cluster logits), and a
        tail is computed once per row whose target is in it, not K times.
      shared: each component's tails read its own latent h_k through one projection
        per cluster shared by the components (`tail_{i}_proj` [hsz_i, D]).
      separate: as shared, with one projection per component ([K, hsz_i, D]).

    Why `one` by default: a tail over osz_i words costs K times as much per row when
    it reads K latents, and the large clusters make that the whole cost. Measured
    (`mos-jax bench --vocab-sizes`, BENCHMARKS.md "Cost against vocabulary size"): at
    V = 100,000, K = 15, D = 256 the head with per-component tails trained at 0.21x
    the whole softmax's tokens/s; `one` is what brings it near the softmax's cost.
    `shared` and `separate` gave the same PTB validation perplexity within seed noise
    (configs/ptb_small.py, emsize 64, K = 4, Adam lr 0.003, 300 steps: 646.7 and 654.1
    against 652.4 and 650.8 over seeds 28, 1); `one` is compared on quality in the
    README's vocabulary study.

    With `tails = one` the training loss takes the fused path of the mixture heads
    (`mos_jax.fused.mixture_nll` over the head's S + n classes, the tail terms added
    outside the mixture, where they factor out) when `model.vocab_chunk` is auto or
    fused. FLOPs per token: prior 2 H K, latents 2 H K D, the head 2 K D (S + n), and
    per cluster its tail(s), 2 hsz (Din + osz) (K times for shared / separate, Din = D;
    once for one, Din = H) times its Zipf fraction of tokens (`zipf_fractions`). No
    rank bound is declared.
    """

    n_experts: int = 15
    tails: str = "one"

    fuses_loss = True
    options = {**_ADAPTIVE_OPTIONS, "tails": HeadOption(
        "one", "one, shared or separate", lambda value: value in TAIL_MODES,
        "adaptive_mos: the components' tails: one (one tail per cluster on the encoder's "
        "output, common to all components), shared (per-component latents through one "
        "projection per cluster) or separate (one projection per component)")}

    @classmethod
    def head_input_width(cls, mc) -> int:
        return mc.emsize

    @classmethod
    def tail_width(cls, mc) -> int:
        """The width the tails read: the encoder's output (tails = one) or D."""
        one = cls.option_values(mc)["tails"] == "one"
        return mc.output_size if one else mc.emsize

    @classmethod
    def structure(cls, mc, name: str = "adaptive_mos"):
        opts = cls.option_values(mc)
        cut = resolve_cutoffs(opts["cutoffs"], mc.vocab_size, name)
        return cut, tail_sizes(cls.tail_width(mc), float(opts["div_value"]), cut,
                               mc.vocab_size, name)

    @classmethod
    def flops_per_token(cls, mc) -> int:
        cut, sizes = cls.structure(mc)
        h, d, k = mc.output_size, mc.emsize, mc.n_experts
        copies = 1 if cls.option_values(mc)["tails"] == "one" else k
        width = cls.tail_width(mc)
        fractions = zipf_fractions(cut, mc.vocab_size)
        tails = sum(f * 2 * copies * hsz * (width + osz)
                    for f, (hsz, osz) in zip(fractions, sizes))
        return int(round(2 * h * k + 2 * h * k * d + 2 * k * d * (cut[0] + len(cut))
                         + tails))

    @nn.compact
    def __call__(self, hidden, embedding, targets=None, *, deterministic=True,
                 return_logprobs=False, target_weights=None) -> HeadOutput:
        lead, n_in = hidden.shape[:-1], hidden.shape[-1]
        v, d = self.words(embedding), embedding.shape[1]
        k = self.n_experts
        if self.tails not in TAIL_MODES:
            raise ConfigError(f"model.heads.adaptive_mos.tails={self.tails!r}: use one "
                              "of " + ", ".join(TAIL_MODES))
        cut = resolve_cutoffs(self.cutoffs, v, "adaptive_mos")
        init = uniform_init(n_in ** -0.5)
        prior_kernel = self.param("prior_kernel", init, (n_in, k))
        latent_kernel = self.param("latent_kernel", init, (n_in, k * d))
        latent_bias = self.param("latent_bias", init, (k * d,))
        log_prior = jax.nn.log_softmax(dot(hidden, prior_kernel, self.dtype), axis=-1)
        latent = jnp.tanh(dot(hidden, latent_kernel, self.dtype) + latent_bias)
        rng = None if deterministic or self.dropoutl == 0.0 else self.make_rng("dropout")
        latent = locked_dropout(latent, self.dropoutl, rng)
        x = latent.reshape(-1, k, d)  # [N, K, D]
        log_prior = log_prior.reshape(-1, k)
        flat_targets = None if targets is None else targets.reshape(-1)

        def shaped(target_lp, full):
            return HeadOutput(None if target_lp is None else target_lp.reshape(lead),
                              None if full is None else full.reshape(*lead, v))

        if self.tails != "one":
            head_lp = self.head_logprobs(x, cut, d)  # [N, K, S + n]
            tails = self.build_tails(d, cut, v, k if self.tails == "separate" else 0)
            return shaped(*adaptive_output(x, head_lp, log_prior, tails, cut,
                                           flat_targets, return_logprobs, self.dtype))

        # tails = one: the mixture is over the head; the tails read the hidden state.
        g = hidden.reshape(-1, n_in)
        weight, bias = self.head_params(cut, d)
        tails = self.build_tails(n_in, cut, v)
        if target_weights is not None and flat_targets is not None and not return_logprobs:
            head_bias = jnp.zeros(weight.shape[0], jnp.float32) if bias is None else bias
            fused = fused_output(x, log_prior, weight, head_bias,
                                 head_targets(flat_targets, cut),
                                 target_weights.reshape(-1), self.dtype,
                                 self.vocab_chunk)
            if fused is not None:  # the head's loss and gradients in one pass
                tail_lp = tail_terms(g, flat_targets, tails, cut, self.dtype)
                w = target_weights.reshape(-1).astype(jnp.float32)
                target_lp = jax.lax.stop_gradient(fused.target_logprobs + tail_lp)
                return HeadOutput(target_lp.reshape(lead), None,
                                  fused.nll - jnp.sum(w * tail_lp))
        head_lp = self.head_logprobs(x, cut, d, (weight, bias))  # [N, K, S + n]
        mixed = jax.nn.logsumexp(log_prior[..., None] + head_lp, axis=1)  # [N, S + n]
        return shaped(*adaptive_output(g, mixed, None, tails, cut, flat_targets,
                                       return_logprobs, self.dtype))
