"""The worked example of a new head (docs/extending.md), run as written."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import bench, cli, compare, heads, model
from mos_jax import config as config_lib
from mos_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    readme = (ROOT / "docs" / "extending.md").read_text()
    code = re.search(r"```python\n(# my_heads\.py\n.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) < 40  # "a new head in under 40 lines"
    path = tmp_path_factory.mktemp("plugin") / "my_heads.py"
    path.write_text(code)
    heads.load_plugins(str(path))
    return path


def test_example_head_matches_numpy(head_file):
    cfg = model.ModelConfig(vocab_size=11, emsize=4, nhid=6, nhidlast=4, nlayers=1,
                            head="scaled_softmax", compute_dtype="float32")
    params = model.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    head = dict(params["head"])
    head["scale_kernel"] = jnp.asarray(rng.normal(size=4), jnp.float32)
    head["decoder_bias"] = jnp.asarray(rng.normal(size=11), jnp.float32)
    params = {**params, "head": head}
    ids = jnp.asarray(rng.integers(0, 11, size=(6, 2)))
    out = model.apply(cfg, params, ids[:-1], model.init_carry(cfg, 2), ids[1:],
                      return_logprobs=True)
    h = np.asarray(out.output, np.float64)  # the head's input (no dropout here)
    emb = np.asarray(params["embedding"], np.float64)
    s = np.log1p(np.exp(h @ np.asarray(head["scale_kernel"], np.float64)
                        + float(head["scale_bias"])))[..., None]
    z = s * (h @ emb.T + np.asarray(head["decoder_bias"], np.float64))
    want = z - np.log(np.exp(z).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.logprobs, want, atol=1e-5)
    np.testing.assert_allclose(
        out.target_logprobs, np.take_along_axis(want, np.asarray(ids[1:])[..., None],
                                                -1)[..., 0], atol=1e-5)


def test_example_head_trains_from_the_command_line(head_file, tmp_path, monkeypatch,
                                                   capsys):
    monkeypatch.setenv("MOS_JAX_HEADS", str(head_file))
    rc = cli.main(["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir",
                   str(tmp_path / "run"), "--config.model.head=scaled_softmax",
                   "--config.train.max_epochs=1", "--config.train.test=false",
                   "--config.data.synthetic.train_tokens=8000"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["valid_ppl"] < 50  # better than uniform over the 50 words
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["head"] == "scaled_softmax"


def test_unknown_plugin_file_is_a_clear_error():
    with pytest.raises(heads.ConfigError, match="no head file at nowhere.py"):
        heads.load_plugins("nowhere.py")


def test_example_head_flops_in_bench_are_a_hand_count(head_file):
    mc = model.ModelConfig(vocab_size=10000, emsize=280, nhidlast=280,
                           head="scaled_softmax")
    f = bench.model_flops_per_token(mc)
    # h E^T: 280 x 10,000 multiply-adds; the scale h . u: 280; 2 FLOPs each.
    assert f["head"] == 2 * (280 * 10000 + 280)
    lstm = 2 * 4 * (960 * (280 + 960) + 960 * (960 + 960) + 280 * (960 + 280))
    assert f == {"lstm": lstm, "head": f["head"], "forward": lstm + f["head"]}
    assert f["head"] / 1e6 == pytest.approx(5.6, abs=0.01)  # not a 15-expert mixture


def test_example_head_in_compare_heads_gets_nhidlast_equal_to_emsize(head_file):
    c = config_lib.load_config(TINY)
    c.model.nhidlast = 24
    cfg, notes = compare.head_config(c, "scaled_softmax")
    assert cfg.model.nhidlast == cfg.model.emsize == 16
    assert notes == ["nhidlast set to emsize = 16 (config: 24); the scaled_softmax "
                     "head needs nhidlast == emsize"]
    with pytest.raises(ConfigError, match="nhidlast"):
        model.ModelConfig(vocab_size=10, emsize=4, nhidlast=5, head="scaled_softmax")


BARE_HEAD = """
import flax.linen as nn
import jax.numpy as jnp
from mos_jax.heads import Head, HeadOutput, register_head


@register_head("bare_tied_softmax")
class Bare(Head):  # declares nothing, though hidden @ E^T needs nhidlast == emsize
    @nn.compact
    def __call__(self, hidden, embedding, targets=None, *, deterministic=True,
                 return_logprobs=False):
        logp = jax_log_softmax(hidden @ embedding.T)
        return HeadOutput(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0],
                          logp if return_logprobs else None)


def jax_log_softmax(x):
    return x - jnp.log(jnp.sum(jnp.exp(x), -1, keepdims=True))
"""


def test_a_head_that_declares_nothing_gets_the_documented_defaults(tmp_path,
                                                                   monkeypatch, capsys):
    path = tmp_path / "bare_heads.py"
    path.write_text(BARE_HEAD)
    heads.load_plugins(str(path))
    cls = heads.get_head("bare_tied_softmax")
    assert (cls.tied, cls.fuses_loss) == (False, False)
    mc = model.ModelConfig(vocab_size=50, emsize=16, nhidlast=24, nhid=24, nlayers=1,
                           head="bare_tied_softmax")
    assert bench.model_flops_per_token(mc)["head"] == 2 * 16 * 50  # one decoder product
    assert cls.rank_bound(mc) is None
    # compare-heads cannot know it is tied: a one-line error before anything trains.
    monkeypatch.setenv("MOS_JAX_HEADS", str(path))
    rc = cli.main(["compare-heads", "--config", str(TINY), "--heads", "bare_tied_softmax",
                   "--steps", "1", "--workdir", str(tmp_path / "cmp"),
                   "--config.model.nhidlast=24"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: the bare_tied_softmax head cannot be built with this "
                          "config: TypeError") and "declares tied = True" in err
    assert not (tmp_path / "cmp" / "bare_tied_softmax").exists()


def test_a_head_must_subclass_the_base_class(tmp_path):
    path = tmp_path / "module_head.py"
    path.write_text("import flax.linen as nn\n"
                    "from mos_jax.heads import register_head\n"
                    "@register_head('plain_module_head')\n"
                    "class Plain(nn.Module):\n"
                    "    pass\n")
    with pytest.raises(ConfigError, match="must subclass mos_jax.heads.Head"):
        heads.load_plugins(str(path))
    assert "plain_module_head" not in heads.HEADS
