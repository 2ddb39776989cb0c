"""A padded vocabulary (`model.vocab_multiple`): the rows past the V words are never a
word. A head over an embedding of V_pad rows whose first V rows are an unpadded head's
parameters gives that head's numbers, on every path (plain, streamed over vocabulary
chunks, fused), and the padded rows get no gradient; full distributions are cut to V
and agree with NumPy from the parameters."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fake_mesh_plan
from mos_jax import adaptive, bench, convert, heads, model, runcompat
from mos_jax import config as config_lib
from mos_jax.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
V, V_PAD, D, E, T, B = 10, 16, 6, 3, 3, 2  # chunks of 4: one partial, one all padding
CHUNK = 4


def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def _lse(x, axis):
    m = x.max(axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis, keepdims=True))).squeeze(axis)


def _sig(z):
    return z - np.logaddexp(0.0, -z)  # z + log_sigmoid(z)


def numpy_logprobs(name, p, hidden, emb):
    """Full log-probabilities [T, B, V] of head `name` in float64 from its parameters
    (the embedding's first V rows only: the words)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    h, w = np.asarray(hidden, np.float64), np.asarray(emb, np.float64)[:V]
    if name in ("softmax", "sigsoftmax"):
        z = h @ w.T + p["decoder_bias"][:V]
        return _log_softmax(_sig(z) if name == "sigsoftmax" else z)
    if name == "adaptive":
        cut = adaptive.auto_cutoffs(V)
        head_lp = _log_softmax(h @ p["head_weight"].T)
        out = np.zeros(h.shape[:-1] + (V,))
        out[..., :cut[0]] = head_lp[..., :cut[0]]
        bounds = list(cut) + [V]
        for i in range(len(cut)):
            tail = _log_softmax(h @ p[f"tail_{i}_proj"].T @ p[f"tail_{i}_out"].T)
            out[..., bounds[i]:bounds[i + 1]] = head_lp[..., cut[0] + i, None] + tail
        return out
    prior = _log_softmax(h @ p["prior_kernel"])  # [T, B, E]
    lat = np.tanh(h @ p["latent_kernel"] + p["latent_bias"]).reshape(T, B, E, D)
    b = p["decoder_bias"][:V]
    if name == "moc":
        ctx = np.einsum("tbe,tbed->tbd", np.exp(prior), lat)
        return _log_softmax(ctx @ w.T + b)
    z = lat @ w.T + b  # [T, B, E, V]
    comp = _log_softmax(_sig(z) if name == "moss" else z)
    return _lse(prior[..., None] + comp, axis=2)


# (head, vocab_chunk, options): the loss on the plain path, streamed over chunks of
# the vocabulary, or fused; full distributions always take the plain path, so each case
# covers its normaliser too (moc's paths are the softmax's, sigsoftmax streams as moss,
# adaptive_mos's fused loss is beside its plain full distribution)
CASES = [("softmax", CHUNK, {}), ("softmax", "fused", {}),
         ("mos", 0, {}), ("mos", CHUNK, {}), ("mos", "fused", {}),
         ("moc", "fused", {}),
         ("sigsoftmax", 0, {}), ("moss", CHUNK, {}),
         ("adaptive", 0, {"div_value": 1.5}),
         ("adaptive_mos", "fused", {"div_value": 1.5}),
         ("mixtape", 0, {})]
NUMPY = ("softmax", "mos", "moc", "sigsoftmax", "moss", "adaptive")


def _run(head, params, hidden, emb, targets, weights):
    """(nll, target log-probs, full log-probs, gradients of nll in (params, hidden,
    emb)), jitted."""
    def loss(p, h, e):
        out = head.apply({"params": p}, h, e, targets, target_weights=weights,
                         method=type(head).output_with_nll)
        return out.nll, out.target_logprobs

    def run(p, h, e):
        (nll, target_lp), grads = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                                      has_aux=True)(p, h, e)
        full = head.apply({"params": p}, h, e, targets, return_logprobs=True,
                          method=type(head).output_with_nll).logprobs
        return nll, target_lp, full, grads
    return jax.jit(run)(params, hidden, emb)


@pytest.mark.parametrize("name, chunk, options", CASES)
def test_a_padded_head_gives_the_unpadded_numbers_and_no_gradient_to_padding(
        name, chunk, options):
    rng = np.random.default_rng(7)
    hidden = jnp.asarray(rng.normal(size=(T, B, D)), jnp.float32)
    emb_pad = jnp.asarray(rng.uniform(-1, 1, size=(V_PAD, D)), jnp.float32)
    emb_pad = emb_pad.at[V:].set(5.0)  # large: a padded row left unmasked would show
    targets = jnp.asarray(rng.integers(0, V, size=(T, B)), jnp.int32)
    targets = targets.at[0, 0].set(V - 1)  # the last word, next to the padding
    weights = jnp.asarray(rng.uniform(0.5, 1.5, size=(T, B)), jnp.float32)
    cls = heads.get_head(name)
    kw = dict(n_experts=E, dropoutl=0.0, dtype=jnp.float32, vocab_chunk=chunk, **options)
    padded, plain = cls(vocab_size=V, **kw), cls(**kw)

    params = jax.jit(functools.partial(padded.init, method=cls.output_with_nll))(
        jax.random.key(1), hidden, emb_pad, targets)["params"]
    params = jax.tree_util.tree_map(  # random values everywhere, padded rows included
        lambda a: jnp.asarray(rng.uniform(-0.5, 0.5, size=a.shape), a.dtype), params)
    if "decoder_bias" in params and params["decoder_bias"].shape[0] == V_PAD:
        params["decoder_bias"] = params["decoder_bias"].at[V:].set(5.0)
    cut = {k: (a[:V] if k == "decoder_bias" else a) for k, a in params.items()}
    assert jax.tree_util.tree_structure(cut) == jax.tree_util.tree_structure(
        jax.eval_shape(functools.partial(plain.init, method=cls.output_with_nll),
                       jax.random.key(1), hidden, emb_pad[:V], targets)["params"])

    nll, lp, full, (g_p, g_h, g_e) = _run(padded, params, hidden, emb_pad, targets,
                                          weights)
    want_nll, want_lp, want_full, (w_p, w_h, w_e) = _run(plain, cut, hidden, emb_pad[:V],
                                                         targets, weights)
    assert full.shape == (T, B, V)  # cut to the words
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5)
    np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full, want_full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.exp(full).sum(-1), 1.0, rtol=1e-5)  # no mass lost
    if name in NUMPY:
        np.testing.assert_allclose(full, numpy_logprobs(name, params, hidden, emb_pad),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lp, np.take_along_axis(
            numpy_logprobs(name, params, hidden, emb_pad), targets[..., None], -1)[..., 0],
            rtol=1e-5, atol=1e-5)
    # gradients: the shared parameters as the unpadded head's, the padding's zero
    for got, want in ((g_h, w_h), (g_e[:V], w_e)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(g_e))) and not np.any(np.asarray(g_e[V:]))
    for key, got in g_p.items():
        assert np.all(np.isfinite(np.asarray(got))), key
        if key == "decoder_bias" and got.shape[0] == V_PAD:
            assert not np.any(np.asarray(got[V:])), "padded bias rows got a gradient"
            got = got[:V]
        np.testing.assert_allclose(got, w_p[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _mc(**kw):
    return model.ModelConfig(**{**dict(vocab_size=V, emsize=D, nhid=D, nhidlast=D,
                                       nlayers=1, head="mos", n_experts=E), **kw})


def test_the_model_pads_the_vocabulary_sized_parameters_and_scores_words_only():
    """V=10 with vocab_multiple 8: 16 rows of the embedding and the decoder bias (the
    size is the config's, whatever the mesh), full distributions over the 10 words;
    with vocab_multiple 1 nothing changes. (Gradients through the whole model: the
    import test below.)"""
    assert _mc().padded_vocab_size == V and _mc().head_vocab_size is None
    mc = _mc(vocab_multiple=8)
    assert mc.padded_vocab_size == V_PAD and mc.head_vocab_size == V
    assert _mc(vocab_multiple=5).padded_vocab_size == V  # already a multiple
    params = jax.eval_shape(model.init_params, mc, jax.random.key(0))
    assert params["embedding"].shape == (V_PAD, D)
    assert params["head"]["decoder_bias"].shape == (V_PAD,)
    ids = jnp.zeros((5, 2), jnp.int32)
    shape = jax.eval_shape(lambda p: model.apply(mc, p, ids, model.init_carry(mc, 2), ids,
                                                 return_logprobs=True).logprobs, params)
    assert shape.shape == (5, 2, V)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="model.vocab_multiple"):
            _mc(vocab_multiple=bad)


def test_flops_and_bench_count_the_padded_rows():
    mc, mc_pad = _mc(), _mc(vocab_multiple=8)
    mos = heads.get_head("mos")
    extra = 2 * E * D * (V_PAD - V)  # one decoder product per component per padded row
    assert mos.flops_per_token(mc_pad) - mos.flops_per_token(mc) == extra
    assert (bench.model_flops_per_token(mc_pad)["head"]
            - bench.model_flops_per_token(mc)["head"]) == extra
    ada, opts = heads.get_head("adaptive"), {"div_value": 1.5}
    assert (ada.flops_per_token(_mc(head="adaptive", head_options=opts, vocab_multiple=8))
            == ada.flops_per_token(_mc(head="adaptive", head_options=opts)))  # the words


def test_reference_weights_import_into_a_padded_model_and_export_the_words():
    """Importing pads the embedding and the decoder bias with zero rows (masked, never a
    word); exporting drops them; the recorded vocabulary is V."""
    mc = _mc(vocab_multiple=8)
    params = model.init_params(mc, jax.random.key(3))
    state = convert.to_reference_state(mc, params)
    assert state["encoder.weight"].shape == (V, D) and state["decoder.bias"].shape == (V,)
    loaded, back = convert.from_reference_state(state, head="mos", vocab_multiple=8)
    assert loaded.vocab_size == V and loaded.padded_vocab_size == V_PAD
    assert back["embedding"].shape == (V_PAD, D)
    np.testing.assert_array_equal(back["embedding"][:V], params["embedding"][:V])
    assert not np.any(np.asarray(back["embedding"][V:]))
    assert not np.any(np.asarray(back["head"]["decoder_bias"][V:]))
    # the whole model's training loss (dropout on): the padded rows' values do not
    # matter (masked), and they get no gradient (never looked up, no probability)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, V, size=(4, 2)), jnp.int32)
    carry = model.init_carry(mc, 2)
    loss = jax.jit(jax.value_and_grad(lambda p: model.regularized_loss(
        mc, p, ids, ids, carry, 2.0, 1.0, rng=jax.random.key(1))[0]))
    (got, grads), (want, _) = loss(back), loss(params)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.any(np.asarray(grads["embedding"][V:]))
    assert not np.any(np.asarray(grads["head"]["decoder_bias"][V:]))


def test_check_vocab_uses_the_padded_size_and_says_how_to_pad():
    plan = fake_mesh_plan(8, 8)
    with pytest.raises(ConfigError) as e:
        plan.check_vocab(793_471)  # the One Billion Word benchmark: 7 x 263 x 431
    message = str(e.value)
    assert "model.vocab_multiple=8" in message and "128" in message
    assert "\n" not in message
    mc = model.ModelConfig(vocab_size=793_471, emsize=4, nhid=4, nhidlast=4, nlayers=1,
                           head="mos", n_experts=2, vocab_multiple=128)
    plan.check_vocab(mc.padded_vocab_size, words=mc.vocab_size)  # 793,472 rows: splits
    for m in (1, 2, 4):
        fake_mesh_plan(8, m).check_vocab(_mc(vocab_multiple=4).padded_vocab_size, words=V)
    with pytest.raises(ConfigError, match="without a word"):  # 5 words in 8 blocks of 1
        plan.check_vocab(8, words=5)



def test_trained_weights_are_told_a_model_size_not_padding():
    """evaluate, rank, generate and dynamic-eval load weights whose rows are fixed:
    their refusal names a model size that divides the rows (of this process's devices),
    never a padding key those commands do not take."""
    import jax
    with pytest.raises(ConfigError) as e:
        fake_mesh_plan(4, 4).check_vocab(10, trained=True)
    message = str(e.value)
    assert "vocab_multiple=" not in message and "--config" not in message
    local = jax.local_device_count()
    want = [k for k in range(1, local + 1) if 10 % k == 0]
    assert f"({', '.join(map(str, want))} on this process's {local} devices)" in message
    with pytest.raises(ConfigError) as e:
        fake_mesh_plan(8, 8).check_vocab(8, words=5, trained=True)
    assert "without a word" in str(e.value) and "vocab_multiple" not in str(e.value)


def test_the_key_is_checked_and_a_run_from_before_it_resumes_unpadded(tmp_path):
    """model.vocab_multiple is a config key checked with the others; a run whose
    config.json predates it ran unpadded, so it resumes with 1 and refuses 8."""
    c = config_lib.load_config_file(CONFIGS / "tiny.py")
    config_lib.set_value(c, "model.vocab_multiple", "0")
    with pytest.raises(ConfigError, match="model.vocab_multiple"):
        config_lib.validate(c)
    c = config_lib.load_config_file(CONFIGS / "tiny.py")
    saved = runcompat.saved_config(c)
    del saved["model"]["vocab_multiple"]
    work = tmp_path / "run"
    (work / "checkpoints" / "12").mkdir(parents=True)
    (work / "config.json").write_text(json.dumps(saved))
    assert runcompat.config_changes(c, work, print) == {}
    c.model.vocab_multiple = 8
    with pytest.raises(ConfigError, match="model.vocab_multiple=1, not 8"):
        runcompat.config_changes(c, work, print)
