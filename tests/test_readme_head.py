"""The README's worked example of a new head, run as written."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import cli, heads, model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    readme = (ROOT / "README.md").read_text()
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
