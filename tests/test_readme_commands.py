"""The README's commands, config keys and file names against the code (no training).

Every `mos-jax ...` command line in the README's code blocks must parse with the CLI's
own argparse parser, its `--config.KEY` overrides must name keys of the default config
with values of the right type, every subcommand, config key, config file, benchmark
script and test file the README names must exist, and its layout must list exactly the
package's modules.
"""

import re
import shlex
from pathlib import Path

import pytest

from mos_jax import cli
from mos_jax import config as config_lib
from mos_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SECTIONS = ("data", "model", "optim", "train", "finetune", "parallel")
OVERRIDES_OK = cli.OVERRIDE_COMMANDS


def _code_blocks(text: str) -> list[str]:
    """The shell blocks (```bash, ```console)."""
    return re.findall(r"^```(?:bash|console)\n(.*?)^```", text, re.S | re.M)


COMMAND_LINE = re.compile(r"^(\$ )?([A-Z_][A-Z0-9_]*=\S+ +)*mos-jax\b|&& *mos-jax\b")


def _commands(text: str) -> list[str]:
    """The `mos-jax` command lines of the code blocks, continuation lines joined,
    `$ ` prompts, environment assignments, `&&` prefixes, comments and redirections
    removed."""
    found = []
    for block in _code_blocks(text):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            line = line.strip()
            if not COMMAND_LINE.search(line):
                continue  # output, a comment, another program
            if line.startswith("$ "):
                line = line[2:]
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                    words = words[1:]  # XLA_FLAGS=..., MOS_JAX_HEADS=...
                if words and words[0] == "mos-jax":
                    found.append([w for w in words[1:] if not re.fullmatch(r"\d?>.*", w)])
    return found


COMMANDS = _commands(README)


def _config_keys() -> set[str]:
    return set(config_lib._all_keys(config_lib.default_config()))


def test_the_readme_extraction_finds_what_is_there():
    """The parsing above sees the README's commands (checked on a hand-made text too,
    so a broken extraction cannot pass silently)."""
    text = ("```console\n$ mos-jax train --config configs/tiny.py \\\n"
            "    --workdir runs/x  # note\nout\n$ A_B=1 mos-jax rank --workdir r 2>/dev/null\n"
            "```\n\n```bash\npip install . && mos-jax demo\n```\n")
    assert _commands(text) == [["train", "--config", "configs/tiny.py", "--workdir", "runs/x"],
                               ["rank", "--workdir", "r"], ["demo"]]
    names = {c[0] for c in COMMANDS}
    assert {"demo", "train", "finetune", "evaluate", "dynamic-eval", "rank", "generate",
            "compare-heads", "bench", "import", "download", "plot"} <= names
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_readme_command_parses(argv):
    parser = cli.build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse's error exit
        pytest.fail(f"`mos-jax {' '.join(argv)}` does not parse (exit {e.code})")
    if rest:
        assert args.command in OVERRIDES_OK, f"unknown arguments {rest} for {args.command}"
        config = config_lib.default_config()
        try:
            config_lib.apply_overrides(config, config_lib.parse_overrides(rest))
        except ConfigError as e:
            pytest.fail(f"`mos-jax {' '.join(argv)}`: {e}")
    for key in ("config", "transformer_config"):
        config_path = getattr(args, key, None)
        if config_path is not None:
            assert (ROOT / config_path).is_file(), f"no config file {config_path}"


def test_every_subcommand_named_exists():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    # inline code (`mos-jax rank`, `mos-jax evaluate --by-frequency`) and code blocks
    named = set(re.findall(r"`mos-jax ([a-z][a-z-]*)", README)) | {c[0] for c in COMMANDS}
    assert named, "the README names no subcommand"
    assert named <= set(sub.choices), f"not subcommands: {sorted(named - set(sub.choices))}"


def test_every_config_key_named_exists():
    keys = _config_keys()
    overrides = set(re.findall(r"--config\.([a-z_][a-z0-9_.]*[a-z0-9_])", README))
    quoted = {k for k in re.findall(r"`((?:%s)\.[a-z_][a-z0-9_.]*)`" % "|".join(SECTIONS),
                                    README)
              if not re.search(r"\.(py|txt)$", k)}  # `parallel.py`, `train.txt`: files
    assert "optim.lr" in overrides and "train.stop_at_step" in quoted
    missing = sorted((overrides | quoted) - keys)
    assert not missing, f"config keys the README names that do not exist: {missing}"


def test_every_file_named_exists():
    named = set(re.findall(r"\b((?:configs|benchmarks|tests)/[\w./-]*\w\.(?:py|sh|json))",
                           README))
    assert "configs/ptb.py" in named and "benchmarks/accelerator_check.sh" in named
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"files the README names that do not exist: {missing}"
    for stem in re.findall(r"\b(test_[a-z0-9_]+)\.py", README):
        assert (ROOT / "tests" / f"{stem}.py").is_file(), f"no tests/{stem}.py"
    for stem in re.findall(r"`([a-z0-9_]+)\.py`", README):  # not `X.py`
        if (ROOT / "configs" / f"{stem}.py").is_file():
            continue
        assert (ROOT / "mos_jax" / f"{stem}.py").is_file() or \
            (ROOT / "tests" / f"{stem}.py").is_file(), f"`{stem}.py` names no file"


def test_the_layout_lists_every_module():
    layout = re.search(r"### Layout\n\n```\nmos_jax/\n(.*?)^```", README, re.S | re.M)
    assert layout, "no layout block"
    listed = set(re.findall(r"^  (\w+)\.py ", layout.group(1), re.M))
    modules = {p.stem for p in (ROOT / "mos_jax").glob("*.py") if p.stem != "__init__"}
    assert listed == modules, (f"modules not in the layout: {sorted(modules - listed)}; "
                               f"listed but absent: {sorted(listed - modules)}")
