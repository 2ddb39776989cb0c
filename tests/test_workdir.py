"""One run per work directory: the lock of `mos_jax.workdir`, as train takes it."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mos_jax import cli, train
from mos_jax import config as config_lib
from mos_jax.progress import read_metrics
from mos_jax.workdir import LOCK_FILE, WorkdirBusy, WorkdirLock, hold, holder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REPO = Path(__file__).resolve().parents[1]
TINY = ["--config.train.test=false", "--config.data.synthetic.train_tokens=4000"]

# A process that holds the lock of a work directory until it is killed.
HOLDER = """
import sys, time
from mos_jax.workdir import WorkdirLock
with WorkdirLock(sys.argv[1], "train"):
    print("holding", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def lock_holder():
    """Start processes that hold a work directory's lock; kill them at the end."""
    started = []

    def start(workdir: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)],
                                stdout=subprocess.PIPE, text=True, env=env)
        started.append(proc)
        assert proc.stdout.readline().strip() == "holding"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _no_training(*args, **kwargs):
    raise AssertionError("training started in a work directory held by another run")


def test_a_second_train_is_refused_naming_the_holder_then_resumes_after_kill_9(
        tmp_path, lock_holder, capsys, monkeypatch):
    w = tmp_path / "run"
    argv = ["train", "--config", str(CONFIGS / "tiny.py"), "--workdir", str(w),
            "--config.train.max_epochs=1", *TINY]
    proc = lock_holder(w)
    info = holder(w)
    assert info["pid"] == proc.pid and info["host"] == socket.gethostname()
    assert info["mode"] == "train" and info["since"].endswith("UTC")

    with monkeypatch.context() as m:
        m.setattr(train, "load_corpus_from", _no_training)  # refused before this
        assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert f"pid {proc.pid} on host {socket.gethostname()}" in captured.err
    assert info["since"] in captured.err and "another --workdir" in captured.err
    assert sorted(p.name for p in w.iterdir()) == [LOCK_FILE]  # nothing else touched

    proc.send_signal(signal.SIGKILL)  # the holder dies without releasing anything
    proc.wait()
    assert holder(w)["pid"] == proc.pid  # its lock file is left behind
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["finished"] and result["trained_steps"] > 0
    assert not (w / LOCK_FILE).exists()  # released (and removed) at the end


def test_a_lock_file_of_a_dead_process_does_not_block(tmp_path):
    w = tmp_path / "run"
    w.mkdir()
    (w / LOCK_FILE).write_text(json.dumps(
        {"mode": "train", "pid": 2 ** 22 + 1, "host": socket.gethostname(),
         "since": "2020-01-01 00:00:00 UTC"}))
    with WorkdirLock(w, "finetune"):
        assert holder(w)["pid"] == os.getpid() and holder(w)["mode"] == "finetune"
    assert not (w / LOCK_FILE).exists()


def test_the_lock_excludes_a_second_holder_in_the_same_process(tmp_path):
    w = tmp_path / "run"
    with WorkdirLock(w):
        with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
            WorkdirLock(w).acquire()
    with WorkdirLock(w):  # free again
        pass


def test_the_lock_is_held_during_a_run_and_released_after_it(tmp_path, capsys):
    w = tmp_path / "run"
    seen = []

    def log(message):  # while the run is going: the lock is this process's
        seen.append(holder(w))

    config = config_lib.load_config(
        CONFIGS / "tiny.py", config_lib.parse_overrides(["--config.train.max_epochs=1",
                                                         *TINY]))
    train.train_and_evaluate(config, w, log=log)
    assert seen and all(s is not None and s["pid"] == os.getpid() for s in seen)
    assert not (w / LOCK_FILE).exists()
    # A second run, after the first: it resumes (one more epoch), not refused.
    assert cli.main(["train", "--workdir", str(w), "--config.train.max_epochs=2"]) == 0
    epochs = [r["epoch"] for r in read_metrics(w) if "valid_ppl" in r and not r.get("final")]
    assert epochs == [1, 2]


def test_a_failed_start_releases_the_lock_and_leaves_no_folder(tmp_path, capsys,
                                                               monkeypatch):
    w = tmp_path / "new" / "run"

    def broken(config):
        raise train.ConfigError("no corpus today")

    monkeypatch.setattr(train, "load_corpus_from", broken)
    assert cli.main(["train", "--config", str(CONFIGS / "tiny.py"), "--workdir", str(w),
                     *TINY]) == 2
    assert "no corpus today" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    with WorkdirLock(w):  # free
        pass

    def ctrl_c(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "load_corpus_from", ctrl_c)  # Ctrl-C releases it too
    assert cli.main(["train", "--config", str(CONFIGS / "tiny.py"), "--workdir", str(w),
                     *TINY]) == 130
    with WorkdirLock(w):
        pass


class TwoProcesses:
    """A stand-in placement plan of a 2-process run, seen from one process: `agree`
    ORs the flag with what the other process says (`peer`)."""

    process_count = 2

    def __init__(self, primary: bool, peer: bool = False):
        self.is_primary, self.peer = primary, peer

    def agree(self, check, requested):
        return (requested or self.peer,)


def test_only_the_primary_process_takes_the_lock_and_all_stop_when_it_cannot(tmp_path):
    w = tmp_path / "run"
    with hold(w, "train", TwoProcesses(primary=False)):
        assert not w.exists()  # process 1 touches nothing
        with hold(w, "train", TwoProcesses(primary=True)):
            assert holder(w)["pid"] == os.getpid()
            # a second run: its process 0 is refused, and its process 1 learns it
            with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
                hold(w, "train", TwoProcesses(primary=True))
            with pytest.raises(WorkdirBusy, match="process 0 of this run could not"):
                hold(w, "train", TwoProcesses(primary=False, peer=True))
    assert not w.exists()
