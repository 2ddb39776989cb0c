"""The fused mixture loss (loss and gradients in one pass) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import fused, streaming


def numpy_mixture_nll(latent, log_prior, emb, bias, targets, weights):
    """float64 loss, target log-probs and analytic gradients, written from the math."""
    latent, log_prior, emb, bias, weights = (np.asarray(a, np.float64) for a in
                                             (latent, log_prior, emb, bias, weights))
    n, e, _ = latent.shape
    z = np.einsum("ned,vd->nev", latent, emb) + bias
    m = z.max(-1, keepdims=True)
    logsm = z - (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))
    a = log_prior + logsm[np.arange(n), :, targets]  # [N, E]
    am = a.max(-1, keepdims=True)
    lp = (am + np.log(np.exp(a - am).sum(-1, keepdims=True)))[:, 0]
    post = np.exp(a - lp[:, None])
    coef = -weights[:, None] * post  # d loss / d a
    dz = -coef[..., None] * np.exp(logsm)  # softmax part
    dz[np.arange(n), :, targets] += coef  # one-hot part
    return (-(weights * lp).sum(), lp, np.einsum("nev,vd->ned", dz, emb), coef,
            np.einsum("nev,ned->vd", dz, latent), dz.sum((0, 1)), -lp)


@pytest.mark.parametrize("e,rows", [(1, 4), (3, 5), (3, 40), (4, 1)])
def test_mixture_nll_matches_numpy(e, rows):
    rng = np.random.default_rng(e * 100 + rows)
    n, d, v = 13, 5, 17  # 13 rows: chunks of 5 leave a padded last chunk
    latent = rng.normal(size=(n, e, d)).astype(np.float32)
    log_prior = np.asarray(jax.nn.log_softmax(rng.normal(size=(n, e)), -1), np.float32)
    emb = rng.normal(size=(v, d)).astype(np.float32)
    bias = rng.normal(size=v).astype(np.float32)
    targets = rng.integers(0, v, size=n)
    targets[:3] = 7  # repeated targets: their one-hot gradients add up
    weights = rng.uniform(size=n).astype(np.float32)
    weights[-2:] = 0.0  # padding-like rows count for nothing
    want = numpy_mixture_nll(latent, log_prior, emb, bias, targets, weights)

    loss, lp = jax.jit(fused.mixture_nll, static_argnums=6)(
        latent, log_prior, emb, bias, targets, weights, rows)
    np.testing.assert_allclose(loss, want[0], rtol=1e-5)
    np.testing.assert_allclose(lp, want[1], atol=1e-5)

    def f(latent, log_prior, emb, bias, weights):
        return 2.5 * fused.mixture_nll(latent, log_prior, emb, bias, targets, weights,
                                       rows)[0]
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(latent, log_prior, emb, bias,
                                                           weights)
    for got, ref in zip(grads, want[2:]):
        np.testing.assert_allclose(got, 2.5 * ref, rtol=1e-4, atol=1e-5)


def test_target_logprobs_carry_no_gradient():
    args = (jnp.ones((2, 1, 3)), jnp.zeros((2, 1)), jnp.eye(4, 3), jnp.zeros(4),
            jnp.array([0, 1]), jnp.ones(2))
    g = jax.grad(lambda x: jnp.sum(fused.mixture_nll(x, *args[1:], 1)[1]))(args[0])
    assert not np.any(np.asarray(g))


def test_fused_tiles_follow_the_cpu_rule():
    # about 2 * D logit rows at V = 10,000, scaled by 10,000 / V above, within [64, 1024]
    assert streaming.fused_tile_rows(280, 10000, "cpu") == 560
    assert streaming.fused_tile_rows(64, 10000, "cpu") == 128
    assert streaming.fused_tile_rows(300, 33278, "cpu") == 180
    assert streaming.fused_tile_rows(8, 100, "cpu") == 64
    assert streaming.fused_tile_rows(4096, 100, "cpu") == 1024
    assert streaming.fused_tile_rows(280, 10000, "gpu") == streaming.FUSED_TILE_ROWS_DEFAULT


def test_fused_rows_on_cpu_are_balanced_chunks_of_the_tile():
    if jax.default_backend() != "cpu":
        pytest.skip("fused_rows follows the default backend's tile rule; these figures "
                    "are the CPU rule's")
    assert streaming.fused_rows(0, 840, 15, 10000, 280) == 0  # not asked for
    assert streaming.fused_rows(64, 840, 15, 10000, 280) == 0
    # 560 // 15 = 37 rows asked; 840 = 24 * 35 wastes no padding row (37: 23 * 37 = 851)
    assert streaming.fused_rows("auto", 840, 15, 10000, 280) == 35
    assert streaming.fused_rows("auto", 420, 4, 10000, 64) == 30  # 128 // 4 = 32 asked
    assert streaming.fused_rows("fused", 3, 2, 10, 8) == 3  # never more rows than there are


def test_balanced_chunk_wastes_the_fewest_padding_rows():
    for rows in (1, 7, 100, 420, 703, 840, 1050, 4093):
        for target in (1, 3, 10, 32, 37, 128):
            target = min(target, rows)
            r = streaming.balanced_chunk(rows, target)
            assert int(0.8 * target) <= r <= target
            padded = -(-rows // r) * r
            # brute force over the allowed chunk sizes; ties go to the larger chunk
            allowed = [c for c in range(1, target + 1) if c >= int(0.8 * target)]
            cost = {c: -(-rows // c) * c for c in allowed}
            best = min(cost.values())
            assert padded == best
            assert r == max(c for c in allowed if cost[c] == best)
    assert streaming.balanced_chunk(840, 37) == 35  # 35 and 30 divide 840; the larger
    assert streaming.balanced_chunk(1000, 40) == 40  # no padding already: kept
