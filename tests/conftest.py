"""Shared test set-up: the real corpora, when present, the import path, and a
compilation cache for the run."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # numpy_reference

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# XLA compilation cache, per test run: many tests build the same programs again (a new
# jit of the same train step, eval or head; a training run in a subprocess), and a
# cache hit skips XLA's compile. The environment carries it into the processes the
# tests launch (compare-heads' per-head runs, multi-device workers, the command).
# A fresh directory each run: nothing stale is ever read. MOS_JAX_TEST_XLA_CACHE=0
# turns it off. The pytest-xdist workers use their controller's directory (inherited in
# the environment), so a program one worker compiled is read by the other.
_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": None,
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
_SHARED_CACHE_ENV = "MOS_JAX_TEST_XLA_CACHE_DIR"  # this run's directory, for the workers


# XLA's backend (LLVM) optimisations off for the test run: the tests' programs are tiny,
# so compiling them costs far more than running them, and at level 0 compiling takes
# about 40% less CPU time (a third of the suite's time is compilation). Every comparison
# in the suite is between programs compiled with the same flags: the environment carries
# the flag into the processes the tests launch. MOS_JAX_TEST_XLA_OPT=1 keeps them on.
_NO_BACKEND_OPT = "--xla_backend_optimization_level=0"


def _backend_optimisations_off() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if (os.environ.get("MOS_JAX_TEST_XLA_OPT", "0") != "1"
            and "xla_backend_optimization_level" not in flags):
        os.environ["XLA_FLAGS"] = f"{flags} {_NO_BACKEND_OPT}".strip()


def pytest_configure(config):
    _backend_optimisations_off()  # before the first computation creates the backend
    if os.environ.get("MOS_JAX_TEST_XLA_CACHE", "1") == "0":
        return
    inherited = os.environ.get(_SHARED_CACHE_ENV)
    if os.environ.get("PYTEST_XDIST_WORKER") and inherited and os.path.isdir(inherited):
        cache = inherited  # the controller made it, and removes it
    else:
        cache = tempfile.mkdtemp(prefix="mos-jax-tests-xla-")
        config.mos_jax_xla_cache = cache
        config.mos_jax_saved_env = {k: os.environ.get(k)
                                    for k in (*_CACHE_ENV, _SHARED_CACHE_ENV)}
        os.environ[_SHARED_CACHE_ENV] = cache
    os.environ.update({k: v or cache for k, v in _CACHE_ENV.items()})
    import jax  # already imported or not: the settings apply from the next compile
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    cache = getattr(config, "mos_jax_xla_cache", None)
    if cache is None:
        return
    for key, value in config.mos_jax_saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(cache, ignore_errors=True)


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


def fake_mesh_plan(n_devices: int, model_size: int):
    """A `MeshPlan` over `n_devices` placeholder devices, for its checks and specs
    (no mesh is built, so any device count works in this one-device process)."""
    from mos_jax import parallel
    plan = parallel.Plan.__new__(parallel.MeshPlan)
    object.__setattr__(plan, "devices", tuple(range(n_devices)))
    object.__setattr__(plan, "model_size", model_size)
    object.__setattr__(plan, "rules", parallel.DEFAULT_RULES)
    return plan
