"""The model against the independent NumPy reference (tests/numpy_reference.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from mos_jax import convert, evaluate, model
from mos_jax.errors import ConfigError

# Jitted once per config: eager op-by-op execution would dominate the test time.
jit_loss = jax.jit(model.regularized_loss, static_argnums=0)
jit_apply = jax.jit(model.apply, static_argnums=0, static_argnames="return_logprobs")

TINY = dict(vocab=13, emsize=4, nhid=6, nhidlast=4, nlayers=3, n_experts=3)


def tiny_state(head, seed=0, **overrides):
    return ref.random_state(np.random.default_rng(seed), head=head, **{**TINY, **overrides})


@pytest.mark.parametrize("head", ["mos", "softmax", "moc"])
def test_token_logprobs_match_numpy_reference(head):
    state = tiny_state(head)
    config, params = convert.from_reference_state(state, head=head)
    ids = np.random.default_rng(1).integers(0, TINY["vocab"], size=83)
    # 83 tokens, B=3 -> 27 rows, 26 targets a column: windows of 8, 8, 8, 2 (carry crosses)
    got = evaluate.token_logprobs(config, params, ids, batch_size=3, bptt=8)
    want = ref.token_logprobs(state, ids, batch_size=3, bptt=8, head=head)
    assert got.shape == want.shape == (26, 3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The reference's log(p + 1e-8) differs by at most 1e-8 / p.
    want_eps = ref.token_logprobs(state, ids, 3, 8, head, epsilon=1e-8)
    assert np.all(np.abs(got - want_eps) <= 1e-8 / np.exp(want) + 1e-5)
    ppl = evaluate.perplexity(config, params, ids, batch_size=3, bptt=8)
    assert ppl == pytest.approx(np.exp(-want.mean()), rel=1e-5)


def test_full_logprobs_are_normalised_and_agree_with_targets():
    state = tiny_state("mos")
    config, params = convert.from_reference_state(state)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 13, size=(5, 2)))
    out = jit_apply(config, params, ids[:-1], model.init_carry(config, 2), ids[1:],
                      return_logprobs=True)
    np.testing.assert_allclose(jnp.exp(out.logprobs).sum(-1), 1.0, atol=1e-5)
    gathered = jnp.take_along_axis(out.logprobs, ids[1:, :, None], axis=-1)[..., 0]
    np.testing.assert_allclose(gathered, out.target_logprobs, atol=1e-5)
    output, _ = ref.encode(state, np.asarray(ids[:-1]), ref.zero_carry(state, 2))
    np.testing.assert_allclose(np.exp(out.logprobs), ref.head_probs(state, output, "mos"),
                               atol=1e-6)


@pytest.mark.parametrize("head", ["mos", "softmax"])
def test_regularized_loss_and_gradient_match_numpy_finite_differences(head):
    state = tiny_state(head, seed=3, vocab=7, emsize=3, nhid=4, nhidlast=3, n_experts=2)
    config, params = convert.from_reference_state(state, head=head)
    rng = np.random.default_rng(4)
    seq = rng.integers(0, 7, size=(6, 2))
    inputs, targets = seq[:-1], seq[1:]
    alpha, beta = 2.0, 1.0

    def loss_fn(p):
        return model.regularized_loss(config, p, jnp.asarray(inputs), jnp.asarray(targets),
                                      model.init_carry(config, 2), alpha, beta)

    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert float(loss) == pytest.approx(
        ref.regularized_loss(state, inputs, targets, head, alpha, beta), abs=1e-5)
    # Each reported term against its own NumPy value (docs/reference.md section 2, item 6).
    output, _ = ref.encode(state, inputs, ref.zero_carry(state, 2))
    probs = ref.head_probs(state, output, head)
    nll = -np.log(np.take_along_axis(probs, targets[..., None], axis=-1)).mean()
    assert float(aux["nll"]) == pytest.approx(nll, abs=1e-5)
    assert float(aux["ar"]) == pytest.approx(np.mean(output ** 2), rel=1e-5)
    assert float(aux["tar"]) == pytest.approx(np.mean((output[1:] - output[:-1]) ** 2),
                                              rel=1e-5)

    # Central differences of the float64 NumPy loss, per reference weight.
    grad_ref = convert.to_reference_state(config, grads)
    h = 1e-6
    for name, value in state.items():
        fd = np.empty_like(value)
        for idx in np.ndindex(value.shape):
            plus = {**state, name: value.copy()}
            minus = {**state, name: value.copy()}
            plus[name][idx] += h
            minus[name][idx] -= h
            fd[idx] = (ref.regularized_loss(plus, inputs, targets, head, alpha, beta)
                       - ref.regularized_loss(minus, inputs, targets, head, alpha, beta)) / (2 * h)
        np.testing.assert_allclose(grad_ref[name], fd, atol=2e-5, rtol=1e-3, err_msg=name)


def test_padding_to_a_bucket_changes_nothing():
    state = tiny_state("mos", seed=5)
    config, params = convert.from_reference_state(state)
    seq = jnp.asarray(np.random.default_rng(6).integers(0, 13, size=(8, 3)))
    carry = model.init_carry(config, 3)
    loss, aux = jit_loss(config, params, seq[:-1], seq[1:], carry, 2.0, 1.0)
    padded_in = jnp.pad(seq[:-1], ((0, 5), (0, 0)), constant_values=1)
    padded_tg = jnp.pad(seq[1:], ((0, 5), (0, 0)), constant_values=2)
    loss_p, aux_p = jit_loss(config, params, padded_in, padded_tg, carry,
                                           2.0, 1.0, length=7)
    assert float(loss_p) == pytest.approx(float(loss), abs=1e-6)
    for k in ("nll", "ar", "tar"):
        assert float(aux_p[k]) == pytest.approx(float(aux[k]), abs=1e-6)
    for (h, c), (hp, cp) in zip(aux["carry"], aux_p["carry"]):
        np.testing.assert_allclose(hp, h, atol=1e-6)
        np.testing.assert_allclose(cp, c, atol=1e-6)


def test_carry_is_threaded_between_windows():
    state = tiny_state("moc", seed=7)
    config, params = convert.from_reference_state(state, head="moc")
    seq = jnp.asarray(np.random.default_rng(8).integers(0, 13, size=(9, 2)))
    zero = model.init_carry(config, 2)
    whole = jit_apply(config, params, seq[:-1], zero, seq[1:])
    first = jit_apply(config, params, seq[:4], zero, seq[1:5])
    second = jit_apply(config, params, seq[4:-1], first.carry, seq[5:])
    np.testing.assert_allclose(
        jnp.concatenate([first.target_logprobs, second.target_logprobs]),
        whole.target_logprobs, atol=1e-6)
    assert [c[0].shape for c in whole.carry] == [(2, 6), (2, 6), (2, 4)]


def test_dropout_only_with_rng_and_reproducible():
    config = model.ModelConfig(vocab_size=20, emsize=8, nhid=8, nhidlast=8, n_experts=2)
    params = model.init_params(config, jax.random.key(0))
    seq = jnp.asarray(np.random.default_rng(9).integers(0, 20, size=(6, 2)))
    carry = model.init_carry(config, 2)
    args = (config, params, seq[:-1], seq[1:], carry, 2.0, 1.0)
    plain = jit_loss(*args)[0]
    assert float(jit_loss(*args)[0]) == float(plain)
    a = jit_loss(*args, rng=jax.random.key(1))[0]
    b = jit_loss(*args, rng=jax.random.key(1))[0]
    c = jit_loss(*args, rng=jax.random.key(2))[0]
    assert float(a) == float(b)
    assert float(a) != float(plain) and float(a) != float(c)


def test_parameter_counts_of_the_paper_configs():
    def count(cfg):
        shapes = jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(0))
        return model.param_count(shapes)
    # docs/reference.md section 2: PTB 21,500,620; WikiText-2 34,909,528. Independent count:
    def by_formula(v, d, nhid, last, e):
        lstm = sum(4 * h * (i + h) + 8 * h for i, h in [(d, nhid), (nhid, nhid), (nhid, last)])
        return v * d + lstm + e * last + e * d * last + e * d + v
    assert count(model.ModelConfig(vocab_size=10000)) == by_formula(10000, 280, 960, 620, 15) == 21_500_620
    wt2 = model.ModelConfig(vocab_size=33278, emsize=300, nhid=1150, nhidlast=650)
    assert count(wt2) == by_formula(33278, 300, 1150, 650, 15) == 34_909_528


def test_initialisation_ranges():
    config = model.ModelConfig(vocab_size=50, emsize=8, nhid=16, nhidlast=12, n_experts=3)
    p = model.init_params(config, jax.random.key(0))
    assert float(jnp.abs(p["embedding"]).max()) <= 0.1
    assert float(jnp.abs(p["embedding"]).max()) > 0.09
    assert float(jnp.abs(p["lstm_0"]["hh_kernel"]).max()) <= 16 ** -0.5
    assert float(jnp.abs(p["lstm_2"]["ih_kernel"]).max()) <= 12 ** -0.5
    assert float(jnp.abs(p["head"]["latent_kernel"]).max()) <= 12 ** -0.5
    assert float(jnp.abs(p["head"]["decoder_bias"]).max()) == 0.0


def test_config_errors():
    with pytest.raises(ConfigError, match="nhidlast"):
        model.ModelConfig(vocab_size=10, emsize=4, nhidlast=5, head="softmax")
    # the same rule for the Transformer, whose width key is d_model
    with pytest.raises(ConfigError, match=r"d_model=8\) must equal emsize \(4\)"):
        model.ModelConfig(vocab_size=10, emsize=4, encoder="transformer", n_heads=2,
                          d_model=8, head="sigsoftmax")
    model.ModelConfig(vocab_size=10, emsize=4, encoder="transformer", n_heads=2,
                      d_model=8, head="mos")  # an untied head takes any width
    with pytest.raises(ConfigError, match="unknown head"):
        model.ModelConfig(vocab_size=10, head="nope")
    with pytest.raises(ConfigError, match="dropout"):
        model.ModelConfig(vocab_size=10, dropout=1.0)
    with pytest.raises(ConfigError, match="Did you mean n_experts"):
        model.ModelConfig.from_dict({"vocab_size": 10, "n_expert": 3})
