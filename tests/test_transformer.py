"""The Transformer encoder against an independent float64 NumPy implementation."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import model
from mos_jax.errors import ConfigError

jax.config.update("jax_numpy_rank_promotion", "allow")

jit_apply = jax.jit(model.apply, static_argnums=0, static_argnames="return_logprobs")
jit_loss_grad = jax.jit(jax.grad(model.regularized_loss, argnums=1, has_aux=True),
                        static_argnums=0)


def tiny_config(head="mos", **kw):
    base = dict(vocab_size=13, emsize=8, nlayers=2, head=head, n_experts=3,
                encoder="transformer", n_heads=2, d_ff=12, vocab_chunk=0)
    return model.ModelConfig(**{**base, **kw})


def random_params(config, seed):
    """Random parameters of the model's shapes (N(0, 0.4^2) everywhere, so biases and
    LayerNorm are not trivial); shapes from `eval_shape`, so nothing compiles."""
    params = jax.eval_shape(model.init_params, config, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(0, 0.4, x.shape), jnp.float32) for x in leaves]
    return jax.tree_util.tree_unflatten(tree, leaves)


# --------------------------------------------------------------- NumPy, float64

def np_layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def np_rotate(x, pos):
    """x [d_h] at position pos: rotate pair (x[i], x[i + d_h/2]) by pos * 10000^(-2i/d_h)."""
    half = len(x) // 2
    out = np.empty_like(x)
    for i in range(half):
        a = pos * 10000.0 ** (-2.0 * i / len(x))
        out[i] = x[i] * math.cos(a) - x[i + half] * math.sin(a)
        out[i + half] = x[i + half] * math.cos(a) + x[i] * math.sin(a)
    return out


def np_log_softmax(z):
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_encode(p, cfg, ids):
    """ids [T] (one column) -> output [T, d_model]."""
    x = p["embedding"][ids]
    if "in_proj" in p:
        x = x @ p["in_proj"]
    t, d = x.shape
    nh = cfg.n_heads
    dh = d // nh
    for l in range(cfg.nlayers):
        b = p[f"block_{l}"]
        h = np_layer_norm(x, b["ln_1_scale"], b["ln_1_bias"])
        qkv = h @ b["qkv_kernel"] + b["qkv_bias"]
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        att = np.zeros((t, d))
        for head in range(nh):
            sl = slice(head * dh, (head + 1) * dh)
            for i in range(t):
                qi = np_rotate(q[i, sl], i)
                scores = np.array([np_rotate(k[j, sl], j) @ qi / math.sqrt(dh)
                                   for j in range(i + 1)])
                w = np.exp(scores - scores.max())
                w /= w.sum()
                att[i, sl] = w @ v[:i + 1, sl]
        x = x + att @ b["out_kernel"] + b["out_bias"]
        h = np_layer_norm(x, b["ln_2_scale"], b["ln_2_bias"])
        x = x + np_gelu(h @ b["ff_in_kernel"] + b["ff_in_bias"]) @ b["ff_out_kernel"] \
            + b["ff_out_bias"]
    return np_layer_norm(x, p["ln_f_scale"], p["ln_f_bias"])


def np_logprobs(p, cfg, ids):
    """Full log-probabilities [T, V] of one column."""
    out = np_encode(p, cfg, ids)
    emb, hp = p["embedding"], p["head"]
    if cfg.head == "softmax":
        return np_log_softmax(out @ emb.T + hp["decoder_bias"])
    assert cfg.head == "mos"
    prior = np_log_softmax(out @ hp["prior_kernel"])  # [T, E]
    latent = np.tanh(out @ hp["latent_kernel"] + hp["latent_bias"])
    latent = latent.reshape(len(ids), cfg.n_experts, cfg.emsize)
    comp = np_log_softmax(latent @ emb.T + hp["decoder_bias"])  # [T, E, V]
    z = prior[..., None] + comp
    m = z.max(1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]


def np_nll(p, cfg, inputs, targets):
    """Mean NLL over a [T, B] window."""
    total = 0.0
    for j in range(inputs.shape[1]):
        lp = np_logprobs(p, cfg, inputs[:, j])
        total -= lp[np.arange(len(targets)), targets[:, j]].sum()
    return total / targets.size


def to64(params):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)


# -------------------------------------------------------------------- tests

@pytest.mark.parametrize("head,d_model", [("softmax", 0), ("mos", 0), ("mos", 12)])
def test_forward_matches_numpy_float64(head, d_model):
    cfg = tiny_config(head, d_model=d_model)
    params = random_params(cfg, 1)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(7, 2))
    out = jit_apply(cfg, params, jnp.asarray(ids[:-1]), model.init_carry(cfg, 2),
                    jnp.asarray(ids[1:]), return_logprobs=True)
    p64 = to64(params)
    assert ("in_proj" in params) == (d_model not in (0, cfg.emsize))
    for j in range(2):
        want = np_logprobs(p64, cfg, ids[:-1, j])
        np.testing.assert_allclose(out.logprobs[:, j], want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(out.target_logprobs[:, j],
                                   want[np.arange(6), ids[1:, j]], atol=1e-5, rtol=0)
    assert out.carry == ()


def test_causal_a_future_token_changes_no_earlier_logprob():
    cfg = tiny_config("mos")
    params = random_params(cfg, 3)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(10, 3))
    k = 6
    changed = ids.copy()
    changed[k] = (ids[k] + 1 + np.arange(3)) % cfg.vocab_size
    a, b = (jit_apply(cfg, params, jnp.asarray(x), (), None, return_logprobs=True).logprobs
            for x in (ids, changed))
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a[:k], b[:k], atol=1e-6, rtol=0)
    assert np.abs(a[k:] - b[k:]).max(axis=-1).min() > 1e-4  # later rows do see it


@pytest.mark.parametrize("head", ["softmax", "mos"])
def test_gradient_matches_finite_differences_of_numpy_loss(head):
    cfg = tiny_config(head, vocab_size=7, emsize=4, n_heads=2, d_ff=6, n_experts=2,
                      nlayers=1)
    params = random_params(cfg, 5)
    ids = np.random.default_rng(6).integers(0, 7, size=(5, 2))
    inputs, targets = ids[:-1], ids[1:]
    grads, aux = jit_loss_grad(cfg, params, jnp.asarray(inputs), jnp.asarray(targets), (),
                               0.0, 0.0)
    p64 = to64(params)
    assert float(aux["nll"]) == pytest.approx(np_nll(p64, cfg, inputs, targets), abs=1e-5)
    rng = np.random.default_rng(7)
    for _ in range(3):  # directional derivatives along random directions
        direction = jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape), p64)
        eps = 1e-5
        shifted = [jax.tree_util.tree_map(lambda x, v: x + s * eps * v, p64, direction)
                   for s in (1, -1)]
        fd = (np_nll(shifted[0], cfg, inputs, targets)
              - np_nll(shifted[1], cfg, inputs, targets)) / (2 * eps)
        analytic = sum(float(np.sum(np.asarray(g, np.float64) * v)) for g, v in zip(
            jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction)))
        assert analytic == pytest.approx(fd, rel=2e-3, abs=2e-4)


def test_dropout_is_on_only_with_a_key_and_carry_is_empty():
    cfg = tiny_config("mos", attn_dropout=0.3, resid_dropout=0.3, nlayers=1)
    params = random_params(cfg, 8)
    ids = jnp.asarray(np.random.default_rng(9).integers(0, 13, size=(6, 2)))
    plain = jit_apply(cfg, params, ids, (), ids).target_logprobs
    again = jit_apply(cfg, params, ids, (), ids).target_logprobs
    dropped = jit_apply(cfg, params, ids, (), ids, rng=jax.random.key(0)).target_logprobs
    np.testing.assert_array_equal(plain, again)
    assert np.abs(np.asarray(plain) - np.asarray(dropped)).max() > 1e-3
    assert model.init_carry(cfg, 4) == ()


@pytest.mark.parametrize("kw,fragment", [
    (dict(head="softmax", d_model=12), r"\(d_model=12\) must equal emsize \(8\): set "
                                       "model.d_model = model.emsize"),
    (dict(n_heads=3), "n_heads=3 must divide"),
    (dict(n_heads=8), "even head size"),
    (dict(encoder="gru"), "unknown encoder"),
    (dict(attn_dropout=1.0), "attn_dropout"),
])
def test_config_mistakes_are_clear_errors(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny_config(**kw)


# ------------------------------------------------------ sliding-window evaluation

@pytest.mark.parametrize("n_tokens,context,stride", [(50, 6, 4), (50, 6, 6), (41, 5, 1),
                                                     (16, 9, 3)])
def test_sliding_windows_score_every_target_once(n_tokens, context, stride):
    from mos_jax.batching import sliding_windows
    ids = np.arange(n_tokens)
    w = sliding_windows(ids, 2, context, stride)
    n = n_tokens // 2 - 1
    scored = []
    for k, (length, first) in enumerate(zip(w.lengths, w.first)):
        start = int(w.inputs[k, 0, 0])  # ids are positions: column 0 starts at 0
        assert np.array_equal(w.inputs[k, :length, 0], np.arange(start, start + length))
        for r in range(first, length):
            scored.append(start + r)
            if k:  # the context of target row start + r: inputs start..start + r
                assert r + 1 >= context - stride
    assert scored == list(range(n))


@pytest.mark.parametrize("encoder", ["transformer", "lstm"])
def test_sliding_token_logprobs_match_a_brute_force_loop(encoder):
    """Every target scored once, from the window that leaves it among its last
    `stride` rows, against each target's own window prefix run alone. The Transformer
    through `token_logprobs` (its evaluation); the LSTM (a carry, restarted from zeros
    in every window, and donated: a new one each window) called directly."""
    from mos_jax import evaluate
    context, stride, batch = 7, 3, 2
    if encoder == "transformer":
        cfg = tiny_config("mos", eval_stride=3)
    else:
        cfg = model.ModelConfig(vocab_size=13, emsize=8, nhid=10, nhidlast=8, nlayers=2,
                                head="mos", n_experts=3, vocab_chunk=0)
    params = random_params(cfg, 10)
    ids = np.random.default_rng(11).integers(0, cfg.vocab_size, size=43)
    if encoder == "transformer":
        got = evaluate.token_logprobs(cfg, params, ids, batch, context)
    else:
        got = evaluate.sliding_token_logprobs(cfg, params, ids, batch, context, stride)
    rows = ids[: len(ids) // batch * batch].reshape(batch, -1).T
    inputs, targets = rows[:-1], rows[1:]
    n = len(targets)
    x = np.zeros((context, n, batch), np.int32)  # one prefix per target, side by side
    y = np.zeros_like(x)
    offsets = []
    for t in range(n):
        # the window that scores target t starts at the multiple of the stride that
        # leaves t among its last `stride` rows (0 for the first window's targets)
        s = 0 if t < context else stride * -(-(t - context + 1) // stride)
        assert t - s < context and (s == 0 or t - s + 1 >= context - stride)
        x[: t - s + 1, t] = inputs[s:t + 1]
        y[: t - s + 1, t] = targets[s:t + 1]
        offsets.append(t - s)
    out = jit_apply(cfg, params, jnp.asarray(x.reshape(context, -1)),
                    model.init_carry(cfg, n * batch), jnp.asarray(y.reshape(context, -1)))
    lp = np.asarray(out.target_logprobs).reshape(context, n, batch)
    want = lp[offsets, np.arange(n)]
    assert got.shape == want.shape == (20, 2)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------- training and exact resume

def _train_cli(workdir, *extra):
    from pathlib import Path
    from mos_jax import cli
    configs = Path(__file__).resolve().parents[1] / "configs"
    args = ["train", "--config", str(configs / "tiny.py"), "--workdir", str(workdir),
            "--config.model.encoder=transformer", "--config.model.n_heads=2",
            "--config.optim.name=adamw", "--config.optim.lr=0.003",
            "--config.optim.warmup_steps=3", "--config.optim.decay_steps=5",
            "--config.train.steps_per_epoch=4", "--config.train.max_epochs=2",
            "--config.train.eval_max_tokens=200", "--config.train.test=false",
            # windows of 5..8 tokens, all padded to one bucket: one train program
            "--config.data.bptt=8", "--config.data.max_seq_len_delta=0", *extra]
    assert cli.main(args) == 0


def _final_tree(workdir):
    from mos_jax import optim, train
    from mos_jax.checkpoint import CheckpointStore
    c = train.load_run_config(workdir)
    mc = train.model_config_from(c, 50)
    tx = optim.from_config(c.optim).transform(averaging=True)
    abstract = jax.eval_shape(lambda: train._state_tree(train.init_state(
        mc, model.init_params(mc, jax.random.key(0)), c.data.batch_size, tx)))
    store = CheckpointStore(workdir, read_only=True)
    tree, meta = store.restore(abstract)
    store.close()
    return tree, meta


def test_transformer_trains_and_resumes_bit_identically(tmp_path, capsys):
    _train_cli(tmp_path / "whole")
    for stop in (3, 6):  # mid-epoch 1 (in warm-up), mid-epoch 2
        _train_cli(tmp_path / "parts", f"--config.train.stop_at_step={stop}")
    _train_cli(tmp_path / "parts")
    capsys.readouterr()
    want, want_meta = _final_tree(tmp_path / "whole")
    got, meta = _final_tree(tmp_path / "parts")
    assert int(want["step"]) == 8 and want["carry"] in ((), [], {}, None)
    la, lb = jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)
    assert len(la) == len(lb) > 30  # params, Adam's moments, the average
    for a, b in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert meta["history"] == want_meta["history"]
    first = jax.tree_util.tree_leaves(model.init_params(
        model.ModelConfig(vocab_size=50, emsize=16, nlayers=1, n_experts=4, head="mos",
                          encoder="transformer", n_heads=2), jax.random.key(0)))
    assert len(first) == len(jax.tree_util.tree_leaves(want["params"]))


def test_the_documented_tiny_transformer_command_trains(tmp_path, capsys):
    """docs/laboratory.md's tiny Transformer command, run as written (only the work
    directory added, and no final test): validation perplexity falls from the first
    epoch to the last and ends below the unigram perplexity of the training text
    (NumPy), which a model that learned nothing of the context cannot beat."""
    import shlex
    from pathlib import Path
    from mos_jax import cli, config as config_lib, data
    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "laboratory.md").read_text()
    lines = [l for l in page.splitlines()
             if l.startswith("mos-jax train --config configs/tiny_transformer.py")]
    assert len(lines) == 1, lines
    args = shlex.split(lines[0])
    assert args[:2] == ["mos-jax", "train"]
    args = [str(root / a) if a.startswith("configs/") else a for a in args[1:]]
    assert cli.main([*args, "--workdir", str(tmp_path), "--config.train.test=false"]) == 0
    assert "note:" not in capsys.readouterr().err  # the config's own encoder
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ppl = [r["valid_ppl"] for r in records if r.get("mode") == "train" and "epoch" in r]
    c = config_lib.load_config(root / "configs" / "tiny_transformer.py")
    assert len(ppl) == c.train.max_epochs >= 2
    train_ids = data.synthetic_corpus(**c.data.synthetic.to_dict()).train
    p = np.bincount(train_ids) / len(train_ids)
    p = p[p > 0]
    unigram = math.exp(-np.sum(p * np.log(p)))
    assert ppl[-1] < ppl[0], ppl
    assert ppl[-1] < unigram, (ppl, unigram)


def test_switching_a_configs_encoder_says_whose_optimiser_it_keeps(capsys):
    """An override of model.encoder away from the file's encoder: one line on stderr
    naming the kept optimiser and the config written for that encoder."""
    from pathlib import Path
    from mos_jax import cli
    configs = Path(__file__).resolve().parents[1] / "configs"
    cases = [("tiny.py", "transformer", "tiny_transformer.py", "optim.name=sgd"),
             ("tiny_transformer.py", "lstm", "tiny.py", "optim.name=adamw"),
             ("tiny_finetune.py", "transformer", "tiny_transformer_finetune.py", "sgd"),
             ("ptb_study_lstm.py", "transformer", "ptb_study_transformer.py", "adamw"),
             ("ptb_transformer_softmax.py", "lstm", None, "adamw")]
    for name, encoder, sibling, optimiser in cases:
        assert cli.main(["config", "--config", str(configs / name),
                         f"--config.model.encoder={encoder}"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["model"]["encoder"] == encoder  # nothing else changed
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("note: "), err
        assert "written for the " in lines[0] and optimiser in lines[0], lines[0]
        if sibling is None:
            assert "set optim.*" in lines[0] and "--config" not in lines[0]
        else:
            assert f"--config {configs / sibling}" in lines[0], lines[0]
    # the file's own encoder, given or not: no note
    for extra in ([], ["--config.model.encoder=lstm"]):
        assert cli.main(["config", "--config", str(configs / "tiny.py"), *extra]) == 0
        assert capsys.readouterr().err == ""


def test_a_study_over_both_encoders_of_one_config_notes_the_switch(monkeypatch, capsys):
    from pathlib import Path
    from mos_jax import cli, study
    configs = Path(__file__).resolve().parents[1] / "configs"
    seen = {}

    def fake_run_study(configs, heads, widths, workdir, **kwargs):
        seen.update(configs)
        raise SystemExit(0)

    monkeypatch.setattr(study, "run_study", fake_run_study)
    with pytest.raises(SystemExit):
        cli.main(["study", "--config", str(configs / "tiny.py"), "--widths", "8,16"])
    assert sorted(seen) == ["lstm", "transformer"]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "with model.encoder=transformer" in lines[0], lines
    # the study's option for the Transformer's config (--config is every encoder's)
    assert f"--transformer-config {configs / 'tiny_transformer.py'}" in lines[0]


def test_ptb_configs_load_and_the_twins_share_a_parameter_budget():
    from pathlib import Path
    from mos_jax import config as config_lib, optim, train
    configs = Path(__file__).resolve().parents[1] / "configs"
    counts = {}
    for name in ("ptb_transformer", "ptb_transformer_softmax"):
        c = config_lib.load_config(configs / f"{name}.py")
        mc = train.model_config_from(c, 10000)
        assert mc.encoder == "transformer" and optim.from_config(c.optim).has_schedule
        counts[mc.head] = model.param_count(
            jax.eval_shape(model.init_params, mc, jax.random.key(0)))
    # by hand: embedding 10000*128; per block 4 LayerNorm vectors, qkv, out and ff
    blocks = lambda f: 2 * (4 * 128 + 128 * 384 + 384 + 128 * 128 + 128
                            + 128 * f + f + f * 128 + 128)
    assert counts["mos"] == 1_280_000 + blocks(512) + 2 * 128 + (
        128 * 4 + 128 * 512 + 512 + 10000)
    assert counts["softmax"] == 1_280_000 + blocks(642) + 2 * 128 + 10000
    assert abs(counts["mos"] - counts["softmax"]) / counts["mos"] < 1e-3


def test_generation_with_the_cache_equals_recomputing_the_prefix():
    """generate runs the prompt, then one position per word against the key/value
    cache; the log-probabilities it returns equal one pass that recomputes the whole
    prefix (the prompt and the sampled words, each scored on everything before it)."""
    from mos_jax import generate
    cfg = tiny_config("mos", nlayers=1, attn_dropout=0.0, resid_dropout=0.0)
    params = random_params(cfg, 12)
    prompt = [3, 1, 4, 1, 5]
    ids, logp = generate.sample(cfg, params, prompt, 6, temperature=1.3, seed=3,
                                return_logprobs=True)
    cache = cfg.encoder_cls.generation_state(cfg, 1, 11)
    assert cache["layers"][0][0].shape == (11, 1, 2, 4)  # [P + n, B, heads, d_h]
    seq = np.asarray(prompt + list(ids), np.int32)[:, None]
    out = jit_apply(cfg, params, jnp.asarray(seq[:-1]), (), jnp.asarray(seq[1:]))
    np.testing.assert_allclose(logp, np.asarray(out.target_logprobs)[4:, 0], atol=1e-5)
    # and not from the last word alone (what an empty carry would give)
    alone = jit_apply(cfg, params, jnp.asarray(seq[4:-1].reshape(1, -1)), (),
                      jnp.asarray(seq[5:].reshape(1, -1)))
    assert np.abs(np.asarray(alone.target_logprobs)[0, 1:] - logp[1:]).max() > 1e-3


def test_dynamic_evaluation_refuses_the_transformer_clearly():
    from mos_jax import dynamic_eval
    cfg = tiny_config("mos")
    ids = np.arange(40) % cfg.vocab_size
    with pytest.raises(ConfigError, match="not supported for the transformer encoder"):
        dynamic_eval.gradient_statistics(cfg, {}, ids, batch_size=2)
    with pytest.raises(ConfigError, match="not supported for the transformer encoder"):
        dynamic_eval.dynamic_evaluate(cfg, {}, {}, {}, ids)


def test_bench_counts_the_transformer_flops_by_hand():
    from mos_jax import bench
    cfg = tiny_config("softmax", vocab_size=100, emsize=8, nlayers=2, d_ff=12)
    f = bench.model_flops_per_token(cfg, context=10)
    # per block: qkv 2*8*24, out 2*8*8, ff 2*(8*12 + 12*8); attention: scores and
    # mixing, 2 * 2 * 8 per earlier position, (10 + 1) / 2 positions on average
    block = 2 * 8 * 24 + 2 * 8 * 8 + 2 * (8 * 12 + 12 * 8) + 4 * 8 * 11 // 2
    assert f == {"transformer": 2 * block, "head": 2 * 8 * 100,
                 "forward": 2 * block + 2 * 8 * 100}


# ---------------------------------------------------- one device against 4 (fake)

_PARALLEL_SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from mos_jax import config as config_lib, evaluate, model, parallel, train
cfg = model.ModelConfig(vocab_size=30, emsize=8, nlayers=1, head="mos", n_experts=3,
                        encoder="transformer", n_heads=2, d_ff=12, attn_dropout=0.0,
                        resid_dropout=0.0, dropoute=0.0, dropoutl=0.0)
B, T = 8, 9
params = jax.tree_util.tree_map(np.asarray, model.init_params(cfg, jax.random.key(0)))
seq = np.random.default_rng(0).integers(0, 30, size=(T + 1, B)).astype(np.int32)
c = config_lib.default_config()
c.optim.alpha, c.optim.beta, c.optim.clip, c.optim.wdecay = 0.0, 0.0, 1e6, 0.0
c.optim.name = "sgd"  # with lr 1 the update is the gradient itself
c.data.batch_size, c.data.bptt, c.train.seed = B, T, 0
out = {"devices": jax.device_count()}
results = {}
for name, plan in (("one", parallel.local_plan(1, "none")),
                   ("mesh", parallel.make_plan("mesh", jax.devices()))):
    step = train.build_train_step(c, cfg, plan)
    state = train.init_state(cfg, jax.tree_util.tree_map(jnp.array, params), B, step.tx)
    state, m = step(state, seq[:-1], seq[1:], T, T, 1.0)
    ids = np.random.default_rng(1).integers(0, 30, size=200)
    logp = evaluate.token_logprobs(cfg, params, ids, 4, 10, plan=plan)
    results[name] = (jax.tree_util.tree_map(np.asarray, state.params), float(m["loss"]), logp)
(pa, la, ea), (pb, lb, eb) = results["one"], results["mesh"]
out["loss"] = abs(la - lb)
out["params"] = max(float(np.max(np.abs(x - y))) for x, y in
                    zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)))
out["eval"] = float(np.max(np.abs(ea - eb)))
print(json.dumps(out))
'''


def test_four_devices_give_the_one_device_losses_and_evaluation():
    import json, os, subprocess, sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 "
               "--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(root))
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", _PARALLEL_SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    assert out["loss"] < 1e-5 and out["params"] < 1e-5 and out["eval"] < 1e-5, out


def test_bfloat16_matmuls_stay_close_to_float32():
    cfg = tiny_config("mos", nlayers=1)
    params = random_params(cfg, 13)
    ids = jnp.asarray(np.random.default_rng(14).integers(0, 13, size=(6, 2)))
    a = jit_apply(cfg, params, ids, (), ids).target_logprobs
    b = jit_apply(cfg.replace(compute_dtype="bfloat16"), params, ids, (), ids).target_logprobs
    assert b.dtype == jnp.float32  # log space stays float32
    diff = np.abs(np.asarray(a) - np.asarray(b)).max()
    assert 0 < diff < 0.1  # bfloat16 operands were used, and are close


def test_compare_heads_sets_the_transformers_width_for_a_tied_head():
    from pathlib import Path
    from mos_jax import compare, config as config_lib
    c = config_lib.load_config_file(Path(__file__).resolve().parents[1] / "configs"
                                    / "tiny.py")
    c.model.encoder, c.model.n_heads, c.model.d_model = "transformer", 2, 24
    soft, notes = compare.head_config(c, "softmax")
    assert soft.model.d_model == soft.model.emsize == 16
    assert notes == ["d_model set to emsize = 16 (config: 24); the softmax head needs "
                     "d_model == emsize"]
    mos, notes = compare.head_config(c, "mos")
    assert mos.model.d_model == 24 and notes == []
