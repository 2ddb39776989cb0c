"""bfloat16 matmuls (model.compute_dtype) against float32 on the tiny config."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import batching, config as config_lib, evaluate, model, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def train_curve(dtype, steps=250, lr=10.0):
    """Per-step losses and final valid perplexity of the tiny model, fixed windows."""
    c = config_lib.load_config(CONFIGS / "tiny.py")
    corpus = train.load_corpus_from(c)
    rows = batching.batchify(corpus.train, 8)
    mc = train.model_config_from(c, corpus.vocab_size).replace(compute_dtype=dtype)
    step = train.TrainStep(mc, alpha=0.0, beta=0.0, bptt=20, n_groups=1, seed=0,
                           optimizer=train.optim.Optimizer("sgd", clip=0.25, wdecay=1.2e-6))
    state = train.init_state(mc, model.init_params(mc, jax.random.key(0)), 8, step.tx)
    losses = []
    for k in range(steps):
        x, y = batching.window(rows, (k * 20) % (len(rows) - 21), 20)
        state, m = step(state, jnp.asarray(x), jnp.asarray(y), 20, 20, lr)
        losses.append(m["loss"])
    ppl = evaluate.perplexity(mc, state.params, corpus.valid[:600], batch_size=8, bptt=20)
    return np.array(jax.device_get(losses)), ppl, state.params


def test_bfloat16_training_tracks_float32():
    loss32, ppl32, _ = train_curve("float32")
    loss16, ppl16, params16 = train_curve("bfloat16")
    assert ppl32 < 0.6 * 50  # learnt well below uniform over 50 words, so tracking
    # the learning curve means something
    blocks32, blocks16 = loss32.reshape(5, 50).mean(1), loss16.reshape(5, 50).mean(1)
    assert blocks32[-1] < blocks32[0] - 0.3
    np.testing.assert_allclose(blocks16, blocks32, rtol=0.01)
    assert ppl16 == pytest.approx(ppl32, rel=0.02)
    assert not np.array_equal(loss16, loss32)  # the bfloat16 path did run
    # parameters (and so the optimiser's arithmetic) stay float32
    assert {x.dtype for x in jax.tree_util.tree_leaves(params16)} == {jnp.dtype("float32")}


@pytest.mark.parametrize("head", ["mos", "softmax"])
def test_bfloat16_forward_is_close_and_log_space_is_float32(head):
    kw = dict(vocab_size=40, emsize=8, nhid=12, nhidlast=8, nlayers=2, n_experts=3,
              head=head)
    c32 = model.ModelConfig(**kw, compute_dtype="float32")
    c16 = model.ModelConfig(**kw, compute_dtype="bfloat16")
    params = model.init_params(c32, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, size=(9, 2)))
    carry = model.init_carry(c32, 2)
    out32, out16 = (jax.jit(lambda p, c=c: model.apply(c, p, ids[:-1], carry, ids[1:],
                                                        return_logprobs=True))(params)
                    for c in (c32, c16))
    assert out16.logprobs.dtype == out16.target_logprobs.dtype == jnp.float32
    np.testing.assert_allclose(np.exp(out16.logprobs).sum(-1), 1.0, atol=1e-5)
    # bfloat16 operands carry 8 bits of mantissa: close, but not equal, to float32
    diff = np.abs(np.asarray(out16.target_logprobs) - np.asarray(out32.target_logprobs))
    assert 0 < diff.max() < 0.05
