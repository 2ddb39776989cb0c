"""Config files and command-line overrides."""

import json

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


# ------------------------------------------------------------------ declared ranges

ROOT = Path(__file__).resolve().parents[1]


def _out_of_range(check):
    """Values a check must refuse, read off its bounds (both sides where it has two)."""
    bad = []
    if isinstance(check, config_lib.Int):
        if check.lo is not None:
            low = check.lo - 1
            while low in check.also:
                low -= 1
            bad.append(low)
        if check.hi is not None:
            bad.append(check.hi + 1)
        bad.append(2.5)  # not an integer
    elif isinstance(check, config_lib.Real):
        if check.lo is not None:
            bad.append(check.lo if check.open_lo else check.lo - 0.5)
        if check.hi is not None:
            bad.append(check.hi if check.open_hi else check.hi + 0.5)
        bad.append(float("nan"))
    return bad


NUMERIC = {name: key for name, key in config_lib.schema().items()
           if isinstance(key.check, (config_lib.Int, config_lib.Real))}
CASES = [(name, value) for name, key in NUMERIC.items()
         for value in _out_of_range(key.check)]


def test_every_key_is_declared_and_every_default_is_allowed():
    default = config_lib.default_config()
    keys = set(config_lib._all_keys(default))

    def node(key):
        value = default
        for part in key.split("."):
            value = value[part]
        return value
    sections = {k for k in keys if isinstance(node(k), config_lib.ConfigDict)}
    assert {"data", "data.synthetic", "model.heads", "model.heads.adaptive"} <= sections
    assert keys - sections == set(config_lib.schema())
    assert config_lib.problems(config_lib.default_config()) == []
    for path in sorted((ROOT / "configs").glob("*.py")):
        assert config_lib.problems(config_lib.load_config_file(path)) == [], path.name
    # every numeric key has a lower bound, so the table below reaches every one of them
    assert all(key.check.lo is not None for key in NUMERIC.values())
    assert len(NUMERIC) >= 50


def test_hand_written_ranges():
    """A few ranges written out by hand, independently of the declarations."""
    bad = {"data.bptt": (0, -5), "data.eval_batch_size": (0,), "data.batch_size": (0,),
           "model.dropout": (1.0, -0.1), "model.wdrop": (1.5,), "optim.lr": (-1.0,),
           "optim.nonmono": (0,), "data.small_batch_size": (-2,),
           "train.checkpoint_every_s": (-1.0,), "optim.b2": (1.0,)}
    good = {"data.bptt": (1, 70), "data.small_batch_size": (-1, 0, 4), "model.dropout": (0.0, 0.99),
            "optim.lr": (0.0, 30.0), "train.eval_max_tokens": (0, 100)}
    for table, expect in ((bad, False), (good, True)):
        for name, values in table.items():
            for value in values:
                assert config_lib.schema()[name].check.ok(value) is expect, (name, value)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a corpus is loaded or a train step is built."""
    from mos_jax import sources, train

    def refuse(*a, **k):
        raise AssertionError("work started before the config was checked")
    monkeypatch.setattr(train, "load_corpus_from", refuse)
    monkeypatch.setattr(train, "build_train_step", refuse)
    monkeypatch.setattr(sources, "load_corpus", refuse)


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v}" for n, v in CASES])
def test_out_of_range_values_are_one_line_before_any_work(name, value, tmp_path,
                                                           capsys, no_work):
    from mos_jax import cli
    workdir = tmp_path / "run"
    rc = cli.main(["train", "--config", str(CONFIGS / "tiny.py"), "--workdir",
                   str(workdir), f"--config.{name}={value}"])
    assert rc == 2
    line = _one_error_line(capsys)
    assert f"--config.{name}=" in line and name in line
    if isinstance(value, int):
        assert f"={value}" in line  # the value as given
    assert not workdir.exists()


@pytest.mark.parametrize("name, value, choices", [
    ("model.head", "sofmax", ["softmax", "mos", "moc"]),
    ("model.encoder", "gru", ["lstm", "transformer"]),
    ("optim.name", "lamb", ["sgd", "adam"]),
    ("parallel.strategy", "fsdp", ["mesh", "none"]),
    ("model.compute_dtype", "float8", ["float32", "bfloat16"]),
    ("model.vocab_chunk", "big", ["auto", "fused"]),
])
def test_unknown_choices_are_one_line_listing_the_choices(name, value, choices, tmp_path,
                                                          capsys, no_work):
    from mos_jax import cli
    rc = cli.main(["train", "--config", str(CONFIGS / "tiny.py"), "--workdir",
                   str(tmp_path / "run"), f"--config.{name}={value}"])
    assert rc == 2
    line = _one_error_line(capsys)
    assert name in line and value in line and all(c in line for c in choices)


def test_the_python_api_checks_too(tmp_path, no_work):
    from mos_jax import train
    c = config_lib.load_config_file(CONFIGS / "tiny.py")
    c.data.bptt = 0
    with pytest.raises(ConfigError, match=r"data\.bptt must be an integer >= 1"):
        train.train_and_evaluate(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_config_file_with_an_unknown_key_is_refused(tmp_path):
    (tmp_path / "typo.py").write_text(
        "from mos_jax.config import default_config\n"
        "def get_config():\n    c = default_config()\n    c.optim.lrr = 3.0\n    return c\n")
    with pytest.raises(ConfigError, match=r"unknown config key optim\.lrr \(did you mean "
                       r"optim\.lr\?\)"):
        config_lib.load_config(tmp_path / "typo.py")


def test_config_command_prints_the_resolved_config(capsys):
    from mos_jax import cli
    assert cli.main(["config", "--config", str(CONFIGS / "tiny.py"),
                     "--config.optim.lr=3", "--config.data.bptt", "9"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = config_lib.load_config_file(CONFIGS / "tiny.py").to_dict()
    expected["optim"]["lr"], expected["data"]["bptt"] = 3.0, 9
    assert printed == expected


def test_config_reference_is_generated_from_the_declarations(capsys):
    from mos_jax import cli
    assert cli.main(["config", "--reference"]) == 0
    text = capsys.readouterr().out
    assert (ROOT / "docs" / "config.md").read_text() == text, (
        "docs/config.md is stale: regenerate it with "
        "`mos-jax config --reference > docs/config.md`")
    for name, key in config_lib.schema().items():  # one row per key, with its default
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"`{json.dumps(key.default)}`" in row


@pytest.mark.parametrize("override, key", [
    ("--config.data.test_batch_size=501", "data.test_batch_size=501"),
    ("--config.train.eval_max_tokens=2", "data.eval_batch_size=8"),
    ("--config.data.eval_batch_size=600", "data.eval_batch_size=600"),
])
def test_batch_sizes_too_large_for_a_split_are_refused_before_training(
        override, key, tmp_path, capsys, monkeypatch):
    """tiny.py: 1,000 valid and test tokens; a split needs 2 tokens per column."""
    from mos_jax import cli, train

    def refuse(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(train, "build_train_step", refuse)
    rc = cli.main(["train", "--config", str(CONFIGS / "tiny.py"), "--workdir",
                   str(tmp_path / "run"), override])
    assert rc == 2
    line = _one_error_line(capsys)
    assert f"--config.{key} is too large" in line and "at most" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_closed_pipe_ends_the_command_quietly():
    import subprocess
    import sys
    proc = subprocess.run(["bash", "-c", "set -o pipefail; " + sys.executable +
                           " -m mos_jax.cli config --reference | true"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
