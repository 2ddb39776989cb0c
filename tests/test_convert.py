"""Reference-weight import/export: names, layouts, round trips, PyTorch files."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import numpy_reference as ref
from mos_jax import convert, evaluate
from mos_jax.errors import CheckpointError, ConfigError

SIZES = dict(vocab=11, emsize=4, nhid=5, nhidlast=3, nlayers=3, n_experts=2)


def state_for(head="mos", seed=0):
    return ref.random_state(np.random.default_rng(seed), head=head, **SIZES)


def assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k], np.float32),
                                      np.asarray(b[k], np.float32), err_msg=k)


@pytest.mark.parametrize("head", ["mos", "moc", "softmax"])
def test_round_trip_both_ways(head, tmp_path):
    sizes = {**SIZES, "nhidlast": 4} if head == "softmax" else SIZES
    state = ref.random_state(np.random.default_rng(1), head=head, **sizes)
    config, params = convert.from_reference_state(state, head=head)
    assert (config.vocab_size, config.emsize, config.nhid, config.nhidlast,
            config.nlayers, config.head) == (11, 4, 5, sizes["nhidlast"], 3, head)
    assert_same_state(convert.to_reference_state(config, params), state)
    # Through an .npz file, with an unrelated key that must be ignored.
    np.savez(tmp_path / "w.npz", **state, **{"optimizer.step": np.zeros(1)})
    config2, params2 = convert.load_reference_npz(tmp_path / "w.npz", head=head)
    assert config2 == config
    assert_same_state(convert.to_reference_state(config2, params2), state)


def test_reference_code_names_are_accepted():
    state = state_for()
    config, params = convert.from_reference_state(state)
    saved = convert.to_reference_state(config, params, style="reference")
    assert "rnns.0.module.weight_hh_l0_raw" in saved and "latent.0.weight" in saved
    # DataParallel prefix, and the derived (dropped) weight_hh_l0 beside the raw one.
    noisy = {f"module.{k}": v for k, v in saved.items()}
    noisy["module.rnns.1.module.weight_hh_l0"] = np.zeros_like(saved["rnns.1.module.weight_hh_l0_raw"])
    config2, params2 = convert.from_reference_state(noisy)
    assert config2 == config
    assert_same_state(convert.to_reference_state(config2, params2), state)


def test_the_heads_that_can_be_imported_are_the_registrys(tmp_path, monkeypatch,
                                                          capsys):
    from mos_jax import cli, heads

    assert heads.importable_heads() == ["softmax", "mos", "moc"]  # registration order
    state = state_for()
    with pytest.raises(ConfigError, match="cannot be read .*softmax, mos, moc"):
        convert.from_reference_state(state, head="mixtape")

    class MosCopy(heads.MixtureOfSoftmaxes):  # a head of one's own with MoS's weights
        pass

    monkeypatch.setitem(heads.HEADS, "mos_copy", MosCopy)
    config, params = convert.from_reference_state(state, head="mos_copy")
    assert config.head == "mos_copy"
    assert_same_state(convert.to_reference_state(config, params), state)
    np.savez(tmp_path / "w.npz", **state)
    for head, rc in (("mos_copy", 0), ("moss", 2)):  # the command asks the registry too
        assert cli.main(["import", str(tmp_path / "w.npz"), "--out",
                         str(tmp_path / head), "--head", head]) == rc
    err = capsys.readouterr().err
    assert "moss head cannot be read" in err and "mos_copy" in err
    assert not (tmp_path / "moss").exists()


def test_head_is_inferred_and_errors_are_clear(tmp_path):
    config, _ = convert.from_reference_state(ref.random_state(
        np.random.default_rng(0), head="softmax", **{**SIZES, "nhidlast": 4}))
    assert config.head == "softmax" and config.n_experts == 1
    assert convert.from_reference_state(state_for())[0].head == "mos"
    state = state_for()
    with pytest.raises(CheckpointError, match=r"mixture head.*import them with one of "
                                              r"the heads .*mos.*--head"):
        convert.from_reference_state(state, head="softmax")
    bad = dict(state)
    bad["rnns.1.weight_ih"] = bad["rnns.1.weight_ih"][:, :-1]
    with pytest.raises(CheckpointError, match=r"rnns\.1\.weight_ih has shape"):
        convert.from_reference_state(bad)
    missing = {k: v for k, v in state.items() if k != "decoder.bias"}
    with pytest.raises(CheckpointError, match="lack 'decoder.bias'"):
        convert.from_reference_state(missing)
    with pytest.raises(CheckpointError, match="no such file"):
        convert.load_reference_npz(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable"):
        convert.load_reference_npz(tmp_path / "junk.npz")


def test_npz_metadata_of_any_dtype_is_ignored(tmp_path):
    state = state_for()
    meta = {"config": np.asarray('{"emsize": 4, "dropout": 0.4}'),  # a string
            "epochs": np.asarray(30), "notes": np.asarray([{"a": 1}], dtype=object)}
    np.savez(tmp_path / "w.npz", **state, **meta)
    config, params = convert.load_reference_npz(tmp_path / "w.npz")
    assert (config.vocab_size, config.emsize, config.n_experts) == (11, 4, 2)
    assert_same_state(convert.to_reference_state(config, params), state)
    # A weight's own name holding text is not metadata: a clear error.
    np.savez(tmp_path / "bad.npz", **{**state, "decoder.bias": np.asarray(["x"] * 11)})
    with pytest.raises(CheckpointError, match="decoder.bias holds <U1 values"):
        convert.load_reference_npz(tmp_path / "bad.npz")


def test_save_and_load_weights(tmp_path):
    config, params = convert.from_reference_state(state_for(), dropout=0.3)
    convert.save_weights(tmp_path / "m", config, params)
    config2, params2 = convert.load_weights(tmp_path / "m")
    assert config2 == config and config2.dropout == 0.3
    assert_same_state(convert.to_reference_state(config2, params2), state_for())
    with pytest.raises(CheckpointError, match="model.json"):
        convert.load_weights(tmp_path)


# ---------------------------------------------------------------------------- PyTorch

REFERENCE_LIKE_MODEL = '''
import torch
from torch import nn

class WeightDrop(nn.Module):
    """Like the reference: the raw recurrent weight is a parameter of the inner LSTM."""
    def __init__(self, module):
        super().__init__()
        self.module = module
        w = module.weight_hh_l0
        del module._parameters["weight_hh_l0"]
        module.register_parameter("weight_hh_l0_raw", nn.Parameter(w.data))

class RNNModel(nn.Module):
    def __init__(self, V, D, H, last, E):
        super().__init__()
        self.encoder = nn.Embedding(V, D)
        self.rnns = nn.ModuleList([WeightDrop(nn.LSTM(D if l == 0 else H,
                                   H if l < 2 else last)) for l in range(3)])
        self.prior = nn.Linear(last, E, bias=False)
        self.latent = nn.Sequential(nn.Linear(last, E * D), nn.Tanh())
        self.decoder = nn.Linear(D, V)
        self.decoder.weight = self.encoder.weight
'''


def test_torch_lstm_layout_matches(tmp_path):
    """PyTorch's own LSTM on imported weights gives our per-token log-probs."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    state = state_for(seed=4)
    config, params = convert.from_reference_state(state)
    ids = np.random.default_rng(5).integers(0, 11, size=40)
    ours = evaluate.token_logprobs(config, params, ids, batch_size=2, bptt=7)
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in state.items()}
    rows = torch.tensor(ids[:40].reshape(2, 20).T)
    x = t["encoder.weight"][rows[:-1]]
    for l in range(3):
        h = t[f"rnns.{l}.weight_hh"].shape[1]
        lstm = torch.nn.LSTM(x.shape[-1], h).double()
        with torch.no_grad():
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(lstm, f"{n}_l0").copy_(t[f"rnns.{l}.{n}"])
            x, _ = lstm(x)
    with torch.no_grad():
        prior = torch.softmax(x @ t["prior.weight"].T, -1)
        latent = torch.tanh(x @ t["latent.weight"].T + t["latent.bias"]).view(19, 2, 2, 4)
        probs = torch.softmax(latent @ t["encoder.weight"].T + t["decoder.bias"], -1)
        p = (prior[..., None] * probs).sum(-2)
        want = torch.log(p.gather(-1, rows[1:, :, None]))[..., 0].numpy()
    np.testing.assert_allclose(ours, want, atol=1e-5)


def test_import_torch_state_dict_and_pickled_model(tmp_path):
    pytest.importorskip("torch", reason="PyTorch is not installed")
    (tmp_path / "refmodel.py").write_text(REFERENCE_LIKE_MODEL)
    # Save a state dict and a whole pickled model from a separate process, whose class
    # definitions this process never imports (as with a reference checkpoint).
    script = textwrap.dedent(f"""
        import sys, torch, numpy as np
        sys.path.insert(0, {str(tmp_path)!r})
        from refmodel import RNNModel
        torch.manual_seed(0)
        m = RNNModel(11, 4, 5, 3, 2)
        torch.save(m.state_dict(), {str(tmp_path / 'sd.pt')!r})
        torch.save(m, {str(tmp_path / 'model.pt')!r})
        np.savez({str(tmp_path / 'expect.npz')!r},
                 **{{k: v.detach().numpy() for k, v in m.state_dict().items()}})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    with np.load(tmp_path / "expect.npz") as z:
        expect = convert.normalize_state({k: z[k] for k in z.files})
    expect.pop("decoder.weight")
    assert "rnns.0.weight_hh" in expect  # the raw weight, under its docs/reference.md name
    assert "refmodel" not in sys.modules
    for name in ("sd.pt", "model.pt"):
        config, params = convert.read_weights(tmp_path / name)  # what `import` does
        convert.save_weights(tmp_path / f"out-{name}", config, params)
        assert (config.nhid, config.nhidlast, config.n_experts) == (5, 3, 2)
        assert_same_state(convert.to_reference_state(config, params), expect)
        config2, _ = convert.load_weights(tmp_path / f"out-{name}")
        assert config2 == config
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        convert.read_torch_state(tmp_path / "bad.pt")
