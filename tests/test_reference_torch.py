"""The PyTorch yardstick (benchmarks/reference_torch.py) computes the model mos-jax does.

Its speed figures stand for the reference's only if it does the reference's work: here
its evaluation-mode log-probabilities, on mos-jax's weights, equal mos-jax's, and its
training-mode dropouts have the reference's shapes (a mask shared over time).
"""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from mos_jax import convert, evaluate
from mos_jax import model as model_lib

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

SIZES = dict(emsize=6, nhid=10, nhidlast=7, experts=3, vocab=23, batch=2, bptt=9,
             eval_batch=2, wdrop=0.5, dropout=0.4, dropouth=0.225, dropouti=0.4,
             dropoute=0.1, dropoutl=0.29)


def _reference_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_torch.py"
    spec = importlib.util.spec_from_file_location("reference_torch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pair():
    ref = _reference_module()
    mc = model_lib.ModelConfig(vocab_size=23, emsize=6, nhid=10, nhidlast=7, n_experts=3)
    params = model_lib.init_params(mc, jax.random.key(3))
    state = convert.to_reference_state(mc, params)
    m = ref.ReferenceMoS(SIZES)
    with torch.no_grad():
        m.encoder.weight.copy_(torch.tensor(state["encoder.weight"]))
        for l, rnn in enumerate(m.rnns):
            for n in ("weight_ih", "bias_ih", "bias_hh"):
                getattr(rnn, f"{n}_l0").copy_(torch.tensor(state[f"rnns.{l}.{n}"]))
            m.raw_hh[l].copy_(torch.tensor(state[f"rnns.{l}.weight_hh"]))
        m.prior.weight.copy_(torch.tensor(state["prior.weight"]))
        m.latent.weight.copy_(torch.tensor(state["latent.weight"]))
        m.latent.bias.copy_(torch.tensor(state["latent.bias"]))
        m.decoder.bias.copy_(torch.tensor(state["decoder.bias"]))
    return mc, params, m


def test_reference_yardstick_scores_like_mos_jax():
    mc, params, m = _pair()
    ids = np.random.default_rng(0).integers(0, 23, size=2 * 15)
    ours = evaluate.token_logprobs(mc, params, ids, batch_size=2, bptt=14)
    rows = torch.tensor(ids.reshape(2, 15).T)
    m.eval()
    with torch.no_grad():
        logp, _, _, _ = m(rows[:-1], m.init_hidden(2))
    want = logp.view(14, 2, 23).gather(-1, rows[1:, :, None])[..., 0].numpy()
    # The reference returns log(p + 1e-8); p here is far above 1e-8.
    np.testing.assert_allclose(ours, want, atol=2e-5)


def test_reference_yardstick_dropout_masks_are_locked_over_time():
    _, _, m = _pair()
    ref = _reference_module()
    x = torch.ones(5, 3, 8)
    y = ref.locked(x, 0.5, True)
    assert torch.all(y == y[:1])  # one mask [1, B, F] for every step
    assert set(torch.unique(y).tolist()) <= {0.0, 2.0}
    assert torch.equal(ref.locked(x, 0.5, False), x)
    m.train()
    torch.manual_seed(0)
    a, *_ = m(torch.zeros(4, 2, dtype=torch.long), m.init_hidden(2))
    torch.manual_seed(1)
    b, *_ = m(torch.zeros(4, 2, dtype=torch.long), m.init_hidden(2))
    assert not torch.allclose(a, b)  # dropout is on in training mode
