"""Embedding dropout, locked dropout and the weight-dropped LSTM."""

import jax
import jax.numpy as jnp
import numpy as np

import numpy_reference as ref
from mos_jax import layers


def test_embedding_dropout_drops_whole_words():
    emb = jnp.ones((2000, 3))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 2000, size=(40, 50)))
    out = np.asarray(layers.embedding_dropout(emb, ids, 0.25, jax.random.key(1)))
    scale = out[..., 0]
    assert set(np.unique(out)) <= {0.0, np.float32(1 / 0.75)}
    ids_np = np.asarray(ids)
    for word in np.unique(ids_np)[:200]:  # every occurrence of a word shares its fate
        assert len(np.unique(scale[ids_np == word])) == 1
    dropped_words = {w for w in np.unique(ids_np) if scale[ids_np == w][0] == 0}
    assert 0.2 < len(dropped_words) / len(np.unique(ids_np)) < 0.3
    np.testing.assert_array_equal(layers.embedding_dropout(emb, ids, 0.25, None),
                                  np.ones((40, 50, 3)))


def test_locked_dropout_shares_the_mask_over_time():
    x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, size=(7, 4, 300)))
    out = np.asarray(layers.locked_dropout(x, 0.4, jax.random.key(3)))
    ratio = out / np.asarray(x)
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:1], ratio.shape), rtol=1e-6)
    assert np.all(np.isclose(ratio, 0) | np.isclose(ratio, 1 / 0.6))
    assert 0.35 < np.isclose(ratio[0], 0).mean() < 0.45
    assert layers.locked_dropout(x, 0.0, jax.random.key(3)) is x


def test_weight_drop_lstm_matches_numpy_with_the_mask():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(6, 3, 5)), jnp.float32)
    carry = (jnp.asarray(rng.normal(size=(3, 8)), jnp.float32),
             jnp.asarray(rng.normal(size=(3, 8)), jnp.float32))
    lstm = layers.WeightDropLSTM(8, wdrop=0.5)
    params = lstm.init(jax.random.key(0), x, carry)["params"]
    (out, (h, c)), state = lstm.apply({"params": params}, x, carry, deterministic=False,
                                      rngs={"dropout": jax.random.key(7)},
                                      mutable=["intermediates"])
    (mask,) = state["intermediates"]["hh_mask"]
    mask = np.asarray(mask)
    assert set(np.unique(mask)) == {0.0, 2.0}
    assert 0.4 < (mask == 0).mean() < 0.6

    def to_np(p):
        return np.asarray(p, dtype=np.float64)
    want, (wh, wc) = ref.lstm_layer(
        to_np(x), to_np(carry[0]), to_np(carry[1]), to_np(params["ih_kernel"]).T,
        (to_np(params["hh_kernel"]) * mask).T, to_np(params["ih_bias"]),
        to_np(params["hh_bias"]))
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(h, wh, atol=1e-5)
    np.testing.assert_allclose(c, wc, atol=1e-5)
    # Deterministic: no mask at all.
    plain, _ = lstm.apply({"params": params}, x, carry)
    want_plain, _ = ref.lstm_layer(to_np(x), to_np(carry[0]), to_np(carry[1]),
                                   to_np(params["ih_kernel"]).T,
                                   to_np(params["hh_kernel"]).T,
                                   to_np(params["ih_bias"]), to_np(params["hh_bias"]))
    np.testing.assert_allclose(plain, want_plain, atol=1e-5)


def test_custom_lstm_gradient_matches_autodiff_with_padding():
    """The hand-written backward pass against JAX's autodiff of the same scan."""
    rng = np.random.default_rng(3)
    t, b, h = 7, 3, 5
    x_proj = jnp.asarray(rng.normal(size=(t, b, 4 * h)), jnp.float32)
    hh = jnp.asarray(rng.normal(size=(h, 4 * h)) * 0.5, jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(b, h)), jnp.float32)
    c0 = jnp.asarray(rng.normal(size=(b, h)), jnp.float32)
    valid = jnp.arange(t) < 5  # two padded steps at the end
    w_out = jnp.asarray(rng.normal(size=(t, b, h)), jnp.float32)
    w_h, w_c = (jnp.asarray(rng.normal(size=(b, h)), jnp.float32) for _ in range(2))

    def loss(fn):
        def f(x_proj, hh, h0, c0):
            out, hT, cT = fn(x_proj, hh, h0, c0)
            return (jnp.sum(out * w_out * valid[:, None, None]) + jnp.sum(hT * w_h)
                    + jnp.sum(jnp.sin(cT) * w_c))
        return f

    def plain(x_proj, hh, h0, c0):
        out, hT, cT, _ = layers._recurrence_scan(x_proj, hh, h0, c0, valid, jnp.float32)
        return out, hT, cT

    def custom(x_proj, hh, h0, c0):
        return layers.lstm_recurrence(x_proj, hh, h0, c0, valid)

    want = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(x_proj, hh, h0, c0)
    got = jax.jit(jax.grad(loss(custom), argnums=(0, 1, 2, 3)))(x_proj, hh, h0, c0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(want[0][5:]).max()) == 0.0  # padded steps get no gradient
