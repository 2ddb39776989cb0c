"""Config files and command-line overrides."""

import pytest

from mos_jax import config as config_lib
from mos_jax.errors import ConfigError

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_paper_configs_hold_the_spec_values():
    ptb = config_lib.load_config(CONFIGS / "ptb.py")
    assert (ptb.model.emsize, ptb.model.nhid, ptb.model.nhidlast, ptb.model.n_experts) == (280, 960, 620, 15)
    assert (ptb.data.batch_size, ptb.optim.lr, ptb.data.bptt, ptb.train.seed) == (12, 20.0, 70, 28)
    assert (ptb.model.dropout, ptb.model.dropouth, ptb.model.dropouti, ptb.model.dropoute,
            ptb.model.dropoutl, ptb.model.wdrop) == (0.4, 0.225, 0.4, 0.1, 0.29, 0.5)
    assert (ptb.optim.alpha, ptb.optim.beta, ptb.optim.wdecay, ptb.optim.clip,
            ptb.optim.nonmono) == (2.0, 1.0, 1.2e-6, 0.25, 5)
    assert ptb.data.bptt + ptb.data.max_seq_len_delta == 110
    wt2 = config_lib.load_config(CONFIGS / "wt2.py")
    assert (wt2.model.emsize, wt2.model.nhid, wt2.model.nhidlast) == (300, 1150, 650)
    assert (wt2.data.batch_size, wt2.data.small_batch_size, wt2.optim.lr) == (15, 5, 15.0)
    assert (wt2.model.dropouth, wt2.model.dropouti, wt2.train.seed) == (0.2, 0.55, 1882)
    assert wt2.data.bptt + wt2.data.max_seq_len_delta == 90
    assert config_lib.load_config(CONFIGS / "ptb_finetune.py").finetune.lr == 25.0
    wt2_ft = config_lib.load_config(CONFIGS / "wt2_finetune.py")
    assert (wt2_ft.finetune.lr, wt2_ft.model.nhid) == (20.0, 1150)
    for name in ("tiny", "bottleneck"):
        config_lib.load_config(CONFIGS / f"{name}.py")


def test_overrides_parse_to_the_default_type():
    pairs = config_lib.parse_overrides(
        ["--config.optim.lr=10", "--config.data.dir", "../x", "--config.optim.asgd=false",
         "--config.model.n_experts", "3", "--config.optim.alpha=0"])
    c = config_lib.load_config(CONFIGS / "ptb.py", pairs)
    assert c.optim.lr == 10.0 and isinstance(c.optim.lr, float)
    assert c.data.dir == "../x" and c.optim.asgd is False
    assert c.model.n_experts == 3 and c.optim.alpha == 0.0


@pytest.mark.parametrize("arg, message", [
    ("--config.optim.lrr=1", r"unknown config key --config\.optim\.lrr\. Close matches: --config\.optim\.lr"),
    ("--config.modle.nhid=3", r"Close matches: --config\.model\.nhid"),
    ("--config.model.nhid=big", r"cannot read 'big' as a int"),
    ("--config.optim.asgd=maybe", "true or false"),
    ("--config.model=3", "is a section"),
    ("--lr=3", "unexpected argument"),
])
def test_override_errors_are_clear(arg, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load_config(CONFIGS / "ptb.py", config_lib.parse_overrides([arg]))


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        config_lib.load_config(tmp_path / "nope.py")
    (tmp_path / "bad.py").write_text("def get_config():\n    return 3\n")
    with pytest.raises(ConfigError, match="ConfigDict"):
        config_lib.load_config(tmp_path / "bad.py")
