"""Shared test set-up: the real corpora, when present, and the import path."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # numpy_reference

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the corpus id cache out of the user's home directory."""
    monkeypatch.setenv("MOS_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def shared_corpus(name: str) -> Path:
    """`../shared/data/NAME`, or skip the test with a message when it is absent."""
    path = SHARED_DATA / name
    if not (path / "train.txt").is_file():
        pytest.skip(f"the {name} corpus is not at {path} (tests read the real corpora "
                    "from ../shared/data beside the repository)")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One short tiny-config training run (1 epoch of 4,000 synthetic tokens), shared
    by the command tests that only read a trained work directory."""
    from mos_jax import cli
    w = tmp_path_factory.mktemp("tiny") / "run"
    configs = Path(__file__).resolve().parents[1] / "configs"
    assert cli.main(["train", "--config", str(configs / "tiny.py"), "--workdir", str(w),
                     "--config.train.max_epochs=1", "--config.train.test=false",
                     "--config.data.synthetic.train_tokens=4000"]) == 0
    return w
