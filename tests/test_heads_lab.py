"""Sigsoftmax, mixture of sigsoftmaxes and Mixtape heads against float64 NumPy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import heads, model, streaming
from mos_jax.errors import ConfigError

T, B, H, D, V = 3, 2, 5, 4, 37  # 6 rows; V=37 is no multiple of the chunk of 8
CHUNK = 8


# ---- float64 NumPy references, written from the equations, not from the JAX code ----

def np_log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_logsumexp(x, axis=-1):
    m = x.max(axis, keepdims=True)
    return np.squeeze(m + np.log(np.exp(x - m).sum(axis, keepdims=True)), axis)


def np_log_sigsoftmax(z):
    """log(exp(z) sigmoid(z) / sum exp(z) sigmoid(z)) over the last axis."""
    g = z + np_log_sigmoid(z)
    return g - np_logsumexp(g)[..., None]


def np_sigsoftmax_head(p, hidden, emb):
    return np_log_sigsoftmax(hidden @ emb.T + p["decoder_bias"])


def np_moss_head(p, hidden, emb, n_experts):
    prior_logits = hidden @ p["prior_kernel"]
    log_prior = prior_logits - np_logsumexp(prior_logits)[..., None]  # [T, B, E]
    latent = np.tanh(hidden @ p["latent_kernel"] + p["latent_bias"])
    latent = latent.reshape(T, B, n_experts, D)
    per_expert = np_log_sigsoftmax(latent @ emb.T + p["decoder_bias"])  # [T, B, E, V]
    return np_logsumexp(log_prior[..., None] + per_expert, axis=2)


def np_mixtape_head(p, hidden, emb, shared_from):
    """K = 4 Mixtape with the sigmoid tree written out (the task's formula)."""
    k, s = 4, shared_from
    contexts = np.tanh(hidden @ p["latent_kernel"] + p["latent_bias"]).reshape(T, B, k, D)
    d2 = p["gate_embedding"].shape[1]
    q = np.tanh(hidden @ p["gate_kernel"]).reshape(T, B, k - 1, d2)  # tanh(U_j g)
    gate_row = np.minimum(np.arange(V), s)  # words >= S share row S
    v_x = p["gate_embedding"][gate_row]  # [V, d2]
    logits = (np.einsum("tbjd,xd->tbxj", q, v_x)
              + (hidden @ p["gate_context_kernel"])[:, :, None, :]
              + p["gate_bias"][gate_row][None, None])  # [T, B, V, 3]
    s1, s2, s3 = (np_sigmoid(logits[..., j]) for j in range(3))
    pi = np.stack([s1 * s2, s1 * (1 - s2), (1 - s1) * s3, (1 - s1) * (1 - s3)], -1)
    f = np.einsum("tbxk,tbkd,xd->tbx", pi, contexts, emb) + p["decoder_bias"]
    return f - np_logsumexp(f)[..., None]


# ---- set-up: a head alone, with random (non-zero) parameters ----

def make_head(name, n_experts=4, vocab_chunk=0, **kw):
    return heads.get_head(name)(n_experts=n_experts, dtype=jnp.float32,
                                vocab_chunk=vocab_chunk, **kw)


def random_inputs(seed):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(T, B, H)).astype(np.float32)
    emb = (rng.normal(size=(V, D)) * 0.8).astype(np.float32)
    targets = rng.integers(0, V, size=(T, B))
    targets[0, 0], targets[-1, -1] = 0, V - 1  # a gated and a shared word, at least
    return hidden, emb, targets  # NumPy: no eager JAX ops (each compiles) in the tests


def random_params(head, hidden, emb, targets, seed):
    """The head's parameter tree with every leaf redrawn ~ N(0, 0.7^2) (biases too)."""
    shapes = jax.eval_shape(head.init, jax.random.key(0), hidden, emb, targets)["params"]
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(size=x.shape) * 0.7, jnp.float32) for x in leaves]
    return jax.tree_util.tree_unflatten(tree, leaves)


def full_output(head, params, hidden, emb, targets):
    f = jax.jit(lambda p, h, e, t: head.apply({"params": p}, h, e, t,
                                              return_logprobs=True))
    return f(params, hidden, emb, targets)


def check_against_numpy(out, want, targets):
    assert out.logprobs.shape == (T, B, V)
    np.testing.assert_allclose(out.logprobs, want, atol=1e-5, rtol=0)
    want_t = np.take_along_axis(want, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.target_logprobs, want_t, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.exp(np.asarray(out.logprobs, np.float64)).sum(-1), 1.0,
                               atol=1e-5)


def as_np(params):
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


# Wide-hidden inputs for the mixture heads (H != D); the sigsoftmax head ties H = D.
def test_sigsoftmax_matches_numpy():
    hidden, emb, targets = random_inputs(1)
    hidden = hidden[..., :D] * 2.0  # H = D, and logits large enough to bend the sigmoid
    head = make_head("sigsoftmax", n_experts=1)
    params = random_params(head, hidden, emb, targets, 2)
    out = full_output(head, params, hidden, emb, targets)
    want = np_sigsoftmax_head(as_np(params), np.asarray(hidden, np.float64),
                              np.asarray(emb, np.float64))
    check_against_numpy(out, want, targets)
    # ... and it is not just the softmax
    z = np.asarray(hidden, np.float64) @ emb.T + np.asarray(params["decoder_bias"])
    assert np.abs(z - np_logsumexp(z)[..., None] - want).max() > 1e-2


def test_moss_matches_numpy():
    hidden, emb, targets = random_inputs(3)
    head = make_head("moss", n_experts=3)
    params = random_params(head, hidden, emb, targets, 4)
    assert set(params) == {"prior_kernel", "latent_kernel", "latent_bias", "decoder_bias"}
    out = full_output(head, params, hidden, emb, targets)
    want = np_moss_head(as_np(params), np.asarray(hidden, np.float64),
                        np.asarray(emb, np.float64), 3)
    check_against_numpy(out, want, targets)


@pytest.mark.parametrize("shared_from", [None, V])  # default ceil(V/4) = 10; no sharing
def test_mixtape_matches_numpy(shared_from):
    hidden, emb, targets = random_inputs(5)
    head = make_head("mixtape", n_experts=4, gate_dim=3, gate_shared_from=shared_from)
    params = random_params(head, hidden, emb, targets, 6)
    s = heads.default_gate_shared_from(V) if shared_from is None else shared_from
    assert s == (10 if shared_from is None else V)
    rows = s + 1 if s < V else s
    shapes = {k: v.shape for k, v in params.items()}
    assert shapes == {"latent_kernel": (H, 4 * D), "latent_bias": (4 * D,),
                      "decoder_bias": (V,), "gate_kernel": (H, 3 * 3),
                      "gate_context_kernel": (H, 3), "gate_embedding": (rows, 3),
                      "gate_bias": (rows, 3)}
    out = full_output(head, params, hidden, emb, targets)
    want = np_mixtape_head(as_np(params), np.asarray(hidden, np.float64),
                           np.asarray(emb, np.float64), s)
    check_against_numpy(out, want, targets)


def test_sigmoid_tree_priors_are_normalised_and_match_the_k4_formula():
    rng = np.random.default_rng(7)
    for k in (1, 2, 3, 4, 5, 8):
        logits = rng.normal(size=(5, k - 1, 3)) * 2
        log_pi = jax.jit(heads.sigmoid_tree_log_priors, static_argnums=(1, 2))(
            jnp.asarray(logits), k, 1)
        assert log_pi.shape == (5, k, 3)
        np.testing.assert_allclose(np.exp(log_pi).sum(1), 1.0, atol=1e-6)
        depths = [len(p) for p in heads.sigmoid_tree_paths(k)]
        assert max(depths) - min(depths) <= 1  # as balanced as k allows
    s = np_sigmoid(logits := rng.normal(size=(6, 3)))
    want = np.stack([s[:, 0] * s[:, 1], s[:, 0] * (1 - s[:, 1]),
                     (1 - s[:, 0]) * s[:, 2], (1 - s[:, 0]) * (1 - s[:, 2])], -1)
    got = np.exp(jax.jit(heads.sigmoid_tree_log_priors, static_argnums=1)(
        jnp.asarray(logits), 4))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_chunked_sigsoftmax_logsumexp_matches_numpy_forward_and_gradients():
    rng = np.random.default_rng(8)
    n, d, v, chunk = 9, 5, 28, 8
    x = (rng.normal(size=(n, d)) * 2).astype(np.float32)
    emb = rng.normal(size=(v, d)).astype(np.float32)
    bias = rng.normal(size=v).astype(np.float32)
    w = rng.normal(size=n).astype(np.float32)

    def f(x, emb, bias):
        return jnp.sum(streaming.chunked_logsumexp(x, emb, bias, chunk, jnp.float32,
                                                   "sigsoftmax") * w)

    loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, emb, bias)
    x64, emb64, bias64, w64 = (np.asarray(a, np.float64) for a in (x, emb, bias, w))
    z = x64 @ emb64.T + bias64
    g = z + np_log_sigmoid(z)
    lse = np_logsumexp(g)
    dz = np.exp(g - lse[:, None]) * (2 - np_sigmoid(z)) * w64[:, None]
    np.testing.assert_allclose(loss, (lse * w64).sum(), rtol=1e-6, atol=1e-5)
    for got, want in zip(grads, (dz @ emb64, dz.T @ x64, dz.sum(0))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="transform"):
        jax.eval_shape(lambda: streaming.chunked_logsumexp(x, emb, bias, chunk,
                                                           jnp.float32, "nope"))


@pytest.mark.parametrize("name,n_experts", [("sigsoftmax", 1), ("moss", 3),
                                            ("mixtape", 3)])  # K=3: an unbalanced tree
def test_streaming_equals_plain_forward_and_gradients(name, n_experts):
    hidden, emb, targets = random_inputs(9)
    if name == "sigsoftmax":
        hidden = hidden[..., :D]
    plain = make_head(name, n_experts=n_experts)
    streamed = make_head(name, n_experts=n_experts, vocab_chunk=CHUNK)
    params = random_params(plain, hidden, emb, targets, 10)
    w = jnp.asarray(np.random.default_rng(11).normal(size=(T, B)), jnp.float32)

    def grad_fn(head):
        def f(p, h, e):
            return jnp.sum(head.apply({"params": p}, h, e, targets).target_logprobs * w)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    (l0, g0), (l1, g1) = (grad_fn(head)(params, hidden, emb) for head in (plain, streamed))
    np.testing.assert_allclose(l1, l0, rtol=1e-6, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The streamed path really streams: no array of its compiled forward and backward
    # program holds T * B * V numbers (the plain path's logits do: the check can fail).
    assert largest_array(grad_fn(streamed), params, hidden, emb) < T * B * V
    assert largest_array(grad_fn(plain), params, hidden, emb) >= T * B * V


def largest_array(fn, *args) -> int:
    """Elements of the largest array in the optimised (compiled) program of `fn`."""
    text = fn.lower(*args).compile().as_text()
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
             for dims in re.findall(r"\b(?:pred|[subf]\d+)\[([\d,]*)\]", text)]
    assert sizes, "no array shapes found in the compiled program's text"
    return max(sizes)


@pytest.mark.parametrize("head", ["sigsoftmax", "moss", "mixtape"])
def test_tiny_model_trains_with_finite_gradients(head):
    # One layer and the plain path (what vocab_chunk=auto picks at this size) keep the
    # compile short; the streamed gradients are checked head by head above.
    cfg = model.ModelConfig(vocab_size=23, emsize=6, nhid=6, nhidlast=6, nlayers=1,
                            n_experts=4, head=head, compute_dtype="float32",
                            vocab_chunk=0, dropoutl=0.2, dropout=0.0, dropouth=0.0,
                            dropouti=0.0, dropoute=0.0, wdrop=0.0)  # only the head's
    shapes = jax.eval_shape(model.init_params, cfg, jax.random.key(0))  # no init compile
    rng = np.random.default_rng(14)
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.uniform(-0.3, 0.3, size=x.shape), jnp.float32), shapes)
    seq = jnp.asarray(np.random.default_rng(12).integers(0, 23, size=(7, 3)))
    carry = model.init_carry(cfg, 3)
    key = jax.random.key(1)  # fixed dropout masks: the same objective every step

    @jax.jit
    def step(params):
        loss, grads = jax.value_and_grad(lambda p: model.regularized_loss(
            cfg, p, seq[:-1], seq[1:], carry, 2.0, 1.0, rng=key)[0])(params)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g))
                                    for g in jax.tree_util.tree_leaves(grads)]))
        return loss, finite, jax.tree_util.tree_map(lambda p, g: p - 1.0 * g, params, grads)

    losses = []
    for _ in range(6):
        loss, finite, params = step(params)
        assert bool(finite)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, losses


def test_parameter_counts_follow_the_documented_formulas():
    def count(cfg):
        shapes = jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(0))
        return model.param_count(shapes["head"])
    v, d, h, k = 10000, 280, 620, 4
    s = heads.default_gate_shared_from(v) + 1  # S gated rows and the shared one
    mixtape = model.ModelConfig(vocab_size=v, head="mixtape", n_experts=k)
    assert count(mixtape) == k * d * (h + 1) + v + (k - 1) * (h * d + h + s) + s * d
    moss = model.ModelConfig(vocab_size=v, head="moss", n_experts=15)
    assert count(moss) == h * 15 + 15 * d * (h + 1) + v
    sig = model.ModelConfig(vocab_size=v, head="sigsoftmax", nhidlast=d)
    assert count(sig) == v


def test_config_errors():
    with pytest.raises(ConfigError, match="nhidlast"):
        cfg = model.ModelConfig(vocab_size=10, emsize=4, nhidlast=5, nhid=5, nlayers=1,
                                head="sigsoftmax")
        model.init_params(cfg, jax.random.key(0))
    hidden, emb, targets = random_inputs(13)
    with pytest.raises(ConfigError, match="gate_shared_from"):
        make_head("mixtape", gate_shared_from=V + 1).init(jax.random.key(0), hidden, emb,
                                                          targets)
    assert {"sigsoftmax", "moss", "mixtape"} <= set(heads.HEADS)


# ---- the facts each head declares (mos_jax.heads.Head) ----

def test_built_in_heads_declare_their_facts():
    built_in = ("softmax", "mos", "moc", "sigsoftmax", "moss", "mixtape")
    facts = {n: (heads.get_head(n).tied, heads.get_head(n).fuses_loss) for n in built_in}
    assert facts == {"softmax": (True, True), "mos": (False, True), "moc": (False, True),
                     "sigsoftmax": (True, False), "moss": (False, False),
                     "mixtape": (False, False)}
    mc = model.ModelConfig(vocab_size=10000)  # H 620, D 280, E 15
    bounds = {n: heads.get_head(n).rank_bound(mc) for n in built_in}
    assert bounds == {"softmax": 282, "moc": 282, "mos": None, "sigsoftmax": None,
                      "moss": None, "mixtape": None}


def test_flops_per_token_by_hand():
    mc = model.ModelConfig(vocab_size=10000)  # H 620, D 280, E 15
    flops = {n: heads.get_head(n).flops_per_token(mc) for n in ("mos", "moc", "moss")}
    # prior 620x15 and latent 620x(15*280); then 15 decoder products 280x10000 (mos,
    # moss), or one of the prior-weighted context (moc); 2 FLOPs per multiply-add.
    mixture = 2 * (620 * 15 + 620 * 15 * 280)
    assert flops == {"mos": mixture + 2 * 15 * 280 * 10000,
                     "moss": mixture + 2 * 15 * 280 * 10000,
                     "moc": mixture + 2 * 280 * 10000}
    tied = mc.replace(nhidlast=280)
    assert heads.get_head("softmax").flops_per_token(tied) == 2 * 280 * 10000
    assert heads.get_head("sigsoftmax").flops_per_token(tied) == 2 * 280 * 10000
    # Mixtape, K=2, V=10: S = 3 gated words and the shared row; one gate (K-1 = 1).
    small = mc.replace(vocab_size=10, n_experts=2, nhidlast=5, emsize=4)
    assert heads.get_head("mixtape").flops_per_token(small) == 2 * (
        5 * 2 * 4 + 5 * 1 * 4 + 5 * 1 + 1 * 4 * 4 + 2 * 4 * 3 + 4 * 7)


def test_mixtape_gate_dim_is_a_config_key_that_reaches_the_parameters():
    from pathlib import Path
    from mos_jax import config as config_lib, train
    c = config_lib.load_config_file(Path(__file__).resolve().parents[1] / "configs"
                                    / "tiny.py")
    config_lib.set_value(c, "model.head", "mixtape")
    config_lib.set_value(c, "model.heads.mixtape.gate_dim", "3")
    config_lib.validate(c)
    mc = train.model_config_from(c, 40)
    shapes = jax.eval_shape(model.init_params, mc, jax.random.key(0))["head"]
    k, h = mc.n_experts, mc.output_size  # S = ceil(40 / 4) = 10 gated rows + 1 shared
    assert shapes["gate_kernel"].shape == (h, (k - 1) * 3)
    assert shapes["gate_embedding"].shape == (11, 3)
    config_lib.set_value(c, "model.heads.mixtape.gate_dim", "0")  # 0: emsize
    shapes = jax.eval_shape(model.init_params, train.model_config_from(c, 40),
                            jax.random.key(0))["head"]
    assert shapes["gate_embedding"].shape == (11, mc.emsize)
    config_lib.set_value(c, "model.heads.mixtape.gate_dim", "-1")
    with pytest.raises(ConfigError, match="model.heads.mixtape.gate_dim"):
        config_lib.validate(c)
    # FLOPs as test_flops_per_token_by_hand's Mixtape, the gates of width d2 = 3
    small = model.ModelConfig(vocab_size=10, n_experts=2, nhidlast=5, emsize=4,
                              head="mixtape", head_options={"gate_dim": 3})
    assert heads.get_head("mixtape").flops_per_token(small) == 2 * (
        5 * 2 * 4 + 5 * 1 * 3 + 5 * 1 + 1 * 3 * 4 + 2 * 4 * 3 + 4 * 7)


def test_a_head_that_does_not_fuse_gets_the_weighted_nll_computed_once():
    hidden, emb, targets = random_inputs(21)
    hidden = hidden[..., :D] * 2.0
    head = make_head("sigsoftmax", n_experts=1, vocab_chunk="fused")
    params = random_params(head, hidden, emb, targets, 22)
    weights = np.random.default_rng(23).uniform(0, 1, size=(T, B)).astype(np.float32)
    out = jax.jit(lambda p: head.apply({"params": p}, hidden, emb, targets,
                                       target_weights=weights,
                                       method=type(head).output_with_nll))(params)
    want = np_sigsoftmax_head(as_np(params), np.asarray(hidden, np.float64),
                              np.asarray(emb, np.float64))
    want_t = np.take_along_axis(want, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.nll, -np.sum(weights * want_t), rtol=1e-5)
    np.testing.assert_allclose(out.target_logprobs, want_t, atol=1e-5)
    with pytest.raises(ConfigError, match="nhidlast=5"):
        wide, _, _ = random_inputs(21)
        head.apply({"params": params}, wide, emb, targets,
                   method=type(head).output_with_nll)
