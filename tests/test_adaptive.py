"""The adaptive and adaptive_mos heads against float64 NumPy and torch; tail skipping."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import adaptive, cli, config as config_lib, convert, heads, model, train
from mos_jax.errors import ConfigError

T, B, H, D, V, K = 4, 5, 8, 6, 30, 3  # 20 rows
CUTS = (4, 12, 20)  # shortlist 4, clusters 4..11, 12..19, 20..29
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---- float64 NumPy references, written from the equations ----

def np_log_softmax(z):
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_adaptive(p, x, cutoffs, v, k=None, x_tail=None):
    """log p [N, V] of the adaptive softmax on x [N, Din] (`k`: component k's tail
    projections when they are per component; `x_tail`: what the tails read, default x)."""
    f = {name: np.asarray(a, np.float64) for name, a in p.items()}
    logits = x @ f["head_weight"].T + (f["head_bias"] if "head_bias" in f else 0.0)
    head_lp = np_log_softmax(logits)
    s, bounds = cutoffs[0], list(cutoffs) + [v]
    out = np.empty((x.shape[0], v))
    out[:, :s] = head_lp[:, :s]
    for i in range(len(cutoffs)):
        proj = f[f"tail_{i}_proj"] if k is None else f[f"tail_{i}_proj"][k]
        xt = x if x_tail is None else x_tail
        tail = np_log_softmax(xt @ proj.T @ f[f"tail_{i}_out"].T)
        out[:, bounds[i]:bounds[i + 1]] = head_lp[:, s + i, None] + tail
    return out


def np_adaptive_mos(p, hidden, cutoffs, v, k, tails):
    """Component j: an adaptive softmax whose head reads latent j and whose tails read
    latent j (tails shared / separate) or the hidden state (tails one)."""
    f = {name: np.asarray(a, np.float64) for name, a in p.items()}
    log_prior = np_log_softmax(hidden @ f["prior_kernel"])  # [N, K]
    latent = np.tanh(hidden @ f["latent_kernel"] + f["latent_bias"]).reshape(
        hidden.shape[0], k, -1)
    comps = np.stack([np_adaptive(p, latent[:, j], cutoffs, v,
                                  j if tails == "separate" else None,
                                  hidden if tails == "one" else None)
                      for j in range(k)], 1)  # [N, K, V]
    z = log_prior[..., None] + comps
    m = z.max(1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]


# ---- set-up ----

def make(name, **options):
    return heads.get_head(name)(n_experts=K, dtype=jnp.float32, vocab_chunk=0,
                                **options)


def inputs(seed, in_short_only=False):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(T, B, H)).astype(np.float32)
    emb = np.zeros((V, D), np.float32)  # only its shape matters (untied heads)
    hi = CUTS[0] if in_short_only else V
    targets = rng.integers(0, hi, size=(T, B))
    if not in_short_only:
        targets[0, :4] = [0, CUTS[0], CUTS[1], V - 1]  # every cluster at least once
    return jnp.asarray(hidden), jnp.asarray(emb), jnp.asarray(targets)


def random_params(head, hidden, emb, targets, seed):
    shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), hidden, emb,
                                              targets)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.uniform(-0.6, 0.6, size=s.shape), jnp.float32), shapes)


CASES = [("adaptive", dict(cutoffs="4,12,20", div_value=1.5, head_bias=True)),
         ("adaptive_mos", dict(cutoffs="4,12,20", div_value=1.5, tails="one",
                               head_bias=True)),
         ("adaptive_mos", dict(cutoffs="4,12,20", div_value=1.5, tails="shared")),
         ("adaptive_mos", dict(cutoffs="4,12,20", div_value=1.5, tails="separate",
                               head_bias=True))]


@pytest.mark.parametrize("name,options", CASES)
def test_log_probabilities_match_numpy_and_are_normalised(name, options):
    hidden, emb, targets = inputs(1)
    head = make(name, **options)
    p = random_params(head, hidden, emb, targets, 2)
    out, tgt = jax.jit(lambda p: (
        head.apply({"params": p}, hidden, emb, targets, return_logprobs=True),
        head.apply({"params": p}, hidden, emb, targets)))(p)
    x = np.asarray(hidden, np.float64).reshape(-1, H)
    if name == "adaptive":
        want = np_adaptive(p, x, CUTS, V)
    else:
        want = np_adaptive_mos(p, x, CUTS, V, K, options["tails"])
    np.testing.assert_allclose(np.exp(want).sum(-1), 1.0, atol=1e-12)
    got = np.asarray(out.logprobs).reshape(-1, V)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    # the target path (tails only where the target is) gives the same numbers
    want_t = np.take_along_axis(want, np.asarray(targets).reshape(-1, 1), 1)[:, 0]
    np.testing.assert_allclose(np.asarray(tgt.target_logprobs).reshape(-1), want_t,
                               atol=1e-5)


def test_matches_torch_adaptive_log_softmax():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    for cutoffs, div, bias in (([4, 12, 20], 2.0, True), ([5, 17], 4.0, False)):
        m = torch.nn.AdaptiveLogSoftmaxWithLoss(16, V, cutoffs, div_value=div,
                                                head_bias=bias)
        x = torch.randn(7, 16)
        with torch.no_grad():
            want = m.log_prob(x).numpy()
        state = {k: v.numpy() for k, v in m.state_dict().items()}
        options = convert.torch_adaptive_options(state)
        assert options == {"cutoffs": ",".join(map(str, cutoffs)), "div_value": div,
                           "head_bias": bias}
        params = convert.from_torch_adaptive(state)
        head = make("adaptive", **options)
        out = jax.jit(lambda p, x: head.apply({"params": p}, x, jnp.zeros((V, 2)),
                                              return_logprobs=True))(
            params, jnp.asarray(x.numpy())[None])
        np.testing.assert_allclose(np.asarray(out.logprobs)[0], want, atol=1e-5)
    with pytest.raises(Exception, match="disagree"):
        convert.from_torch_adaptive(state, cutoffs=[5, 18])


@pytest.mark.parametrize("name,options,chunk", [
    ("adaptive", dict(cutoffs="4,12", div_value=1.5, head_bias=True), 0),
    ("adaptive_mos", dict(cutoffs="4,12", div_value=1.5, tails="separate",
                          head_bias=True), 0),
    ("adaptive_mos", dict(cutoffs="4,12", div_value=1.5, tails="one",
                          head_bias=True), "fused")])  # the fused head loss
def test_target_path_gradient_equals_the_full_distribution_gradient(name, options, chunk,
                                                                    monkeypatch):
    monkeypatch.setattr(adaptive, "TAIL_CHUNK_ROWS", 4)  # several chunks, some skipped
    hidden, emb, targets = inputs(3)
    head = make(name, **options)
    train_head = heads.get_head(name)(n_experts=K, dtype=jnp.float32, vocab_chunk=chunk,
                                      **options)
    p = random_params(head, hidden, emb, targets, 4)
    w = jnp.asarray(np.random.default_rng(5).uniform(0.5, 1.5, size=(T, B)), jnp.float32)

    def loss(p, hidden, full):
        if full:
            out = head.apply({"params": p}, hidden, emb, targets, return_logprobs=True)
            lp = jnp.take_along_axis(out.logprobs, targets[..., None], -1)[..., 0]
            return -jnp.sum(w * lp)
        # the model's training call: the weighted NLL, fused by the head where it can
        out = train_head.apply({"params": p}, hidden, emb, targets, target_weights=w,
                               method="output_with_nll")
        assert out.logprobs is None
        return out.nll

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    g_tail, g_full = grad(p, hidden, False), grad(p, hidden, True)
    value = jax.jit(loss, static_argnums=2)
    np.testing.assert_allclose(float(value(p, hidden, False)),
                               float(value(p, hidden, True)), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g_tail), jax.tree_util.tree_leaves(g_full)):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale + 1e-7


@pytest.mark.parametrize("name", ["adaptive", "adaptive_mos"])  # K components: 1 chunk
def test_tail_chunks_run_only_for_rows_with_a_tail_target(name, monkeypatch):
    chunk = 4
    monkeypatch.setattr(adaptive, "TAIL_CHUNK_ROWS", chunk)
    ran = []
    monkeypatch.setattr(adaptive, "TAIL_CHUNK_HOOK", lambda c: ran.append(int(c)))
    head = make(name, cutoffs="4,12,20", div_value=1.5)
    hidden, emb, targets = inputs(6)
    p = random_params(head, hidden, emb, targets, 9)
    apply = jax.jit(lambda p, h, t: head.apply({"params": p}, h, emb, t))
    for seed, short_only in ((6, True), (7, False), (8, False)):
        hidden, emb, targets = inputs(seed, short_only)
        ran.clear()
        jax.block_until_ready(apply(p, hidden, targets))
        jax.effects_barrier()
        t = np.asarray(targets).reshape(-1)
        bounds = list(CUTS) + [V]
        want = {i: math.ceil(np.sum((t >= bounds[i]) & (t < bounds[i + 1])) / chunk)
                for i in range(len(CUTS))}
        got = {i: ran.count(i) for i in range(len(CUTS))}
        assert got == want, (seed, got, want)
        if short_only:
            assert ran == []


def test_bad_options_give_one_line_before_any_work(tmp_path):
    def validated(**keys):
        c = config_lib.load_config_file(CONFIGS / "tiny.py")
        for key, value in keys.items():
            config_lib.set_value(c, key, value)
        config_lib.validate(c)
        return c

    with pytest.raises(ConfigError, match="model.heads.adaptive.cutoffs") as e:
        validated(**{"model.heads.adaptive.cutoffs": "12,4"})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model.heads.adaptive_mos.div_value"):
        validated(**{"model.heads.adaptive_mos.div_value": "0"})
    c = validated(**{"model.head": "adaptive", "model.heads.adaptive.cutoffs": "10,50"})
    with pytest.raises(ConfigError, match=r"\[1, 49\]"):  # V = 50: known after the corpus
        train.model_config_from(c, 50)
    c = validated(**{"model.head": "adaptive", "model.heads.adaptive.cutoffs": "2,5,10"})
    with pytest.raises(ConfigError, match="cluster 2 .*div_value"):  # 16 // 4^3 = 0
        train.model_config_from(c, 50)
    # through the command: refused after the corpus, before anything compiles
    rc = cli.main(["train", "--config", str(CONFIGS / "tiny.py"), "--workdir",
                   str(tmp_path / "w"), "--config.model.head=adaptive",
                   "--config.model.heads.adaptive.cutoffs=3,70"])
    assert rc == 2 and not (tmp_path / "w" / "checkpoints").exists()
    # the selected head's section reaches the model; auto derives from V
    mc = train.model_config_from(validated(**{"model.head": "adaptive_mos"}), 1000)
    assert dict(mc.head_options)["cutoffs"] == "auto"
    assert adaptive.resolve_cutoffs("auto", 1000) == (50, 200)
    assert adaptive.auto_cutoffs(100) == (5, 20) and adaptive.auto_cutoffs(3) == (1,)


def test_facts_and_flops_by_hand():
    c = config_lib.load_config_file(CONFIGS / "tiny.py")
    for name in ("adaptive", "adaptive_mos"):
        cls = heads.get_head(name)
        assert (cls.tied, cls.wants_frequency_order) == (False, True)
        c.model.head = name
        assert train.vocab_order(c) == "frequency"  # data.vocab_order auto
    mc = model.ModelConfig(vocab_size=100, emsize=8, nhidlast=16, nhid=16, nlayers=1,
                           head="adaptive", n_experts=2,
                           head_options={"cutoffs": "10,40"})
    assert heads.get_head("adaptive").rank_bound(mc) is None
    harm = lambda n: sum(1.0 / r for r in range(1, n + 1))  # noqa: E731
    f0, f1 = ((harm(40) - harm(10)) / harm(100), (harm(100) - harm(40)) / harm(100))
    # head 16 x (10 + 2); tail 0: 16 -> 4 -> 30, tail 1: 16 -> 1 -> 60
    want = 2 * 16 * 12 + f0 * 2 * 4 * (16 + 30) + f1 * 2 * 1 * (16 + 60)
    assert heads.get_head("adaptive").flops_per_token(mc) == round(want)
    with pytest.raises(ConfigError, match="cluster 1"):  # D = 8: 8 // 4^2 = 0
        mc.replace(head="adaptive_mos", head_options=(("cutoffs", "10,40"),
                                                      ("tails", "shared")))
    mc.replace(head="adaptive_mos")  # tails one read H = 16: 16 // 4^2 = 1
    f = (harm(100) - harm(10)) / harm(100)
    mos = mc.replace(head="adaptive_mos", head_options=(("cutoffs", "10"),
                                                        ("tails", "shared")))
    # prior 2 H K, latents 2 H K D, head 2 K D (10 + 1), K tails 8 -> 2 -> 90
    want = 2 * 16 * 2 + 2 * 16 * 2 * 8 + 2 * 2 * 8 * 11 + f * 2 * 2 * 2 * (8 + 90)
    assert heads.get_head("adaptive_mos").flops_per_token(mos) == round(want)
    one = mc.replace(head="adaptive_mos", head_options=(("cutoffs", "10"),))
    # one tail, on H = 16: 16 -> 4 -> 90
    want = 2 * 16 * 2 + 2 * 16 * 2 * 8 + 2 * 2 * 8 * 11 + f * 2 * 4 * (16 + 90)
    assert heads.get_head("adaptive_mos").flops_per_token(one) == round(want)


@pytest.mark.parametrize("name,encoder", [("adaptive", "lstm"),
                                          ("adaptive_mos", "transformer")])
def test_tiny_model_trains_and_evaluates(name, encoder):
    from mos_jax import batching, evaluate
    c = config_lib.load_config_file(CONFIGS / "tiny.py")
    c.data.synthetic.train_tokens = 2000
    c.model.head, c.model.encoder = name, encoder
    for rate in ("dropout", "dropouti", "dropoutl", "wdrop", "dropoute"):
        c.model[rate] = 0.0
    c.model.attn_dropout = c.model.resid_dropout = 0.0
    config_lib.validate(c)
    corpus = train.load_corpus_from(c)
    mc = train.model_config_from(c, corpus.vocab_size)
    rng = np.random.default_rng(0)  # set by name: no compile of the model's init

    def initial(path, leaf):
        name = jax.tree_util.keystr(path)
        value = (np.ones(leaf.shape) if "scale" in name else np.zeros(leaf.shape)
                 if "bias" in name else rng.uniform(-0.2, 0.2, size=leaf.shape))
        return jnp.asarray(value, jnp.float32)
    params = jax.tree_util.tree_map_with_path(
        initial, jax.eval_shape(model.init_params, mc, jax.random.key(0)))
    rows = batching.batchify(corpus.train, 8)
    carry = model.init_carry(mc, 8)
    lr = 1.0 if encoder == "lstm" else 0.3

    @jax.jit
    def step(params, inputs, targets):
        loss, grads = jax.value_and_grad(lambda p: model.regularized_loss(
            mc, p, inputs, targets, carry, 0.0, 0.0)[0])(params)
        return loss, jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)

    def valid_ppl(params):
        return evaluate.perplexity(mc, params, corpus.valid[:400], batch_size=4, bptt=20)

    before = valid_ppl(params)
    losses = []
    for i in range(12):
        inputs, targets = batching.window(rows, (i * 20) % (len(rows) - 21), 20)
        loss, params = step(params, inputs, targets)
        losses.append(float(loss))
    after = valid_ppl(params)
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < losses[0] - 0.2, losses
    assert after < before - 1.0, (before, after)
