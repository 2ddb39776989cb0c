"""Work directories: one run at a time in each.

`WorkdirLock` is held by `train`/`finetune` (`mos_jax.train._run` takes it through
`hold`, and so the Python API, `compare-heads` and `study` do too) for the whole run,
from before the run reads its work directory to the end (errors and Ctrl-C included).
A second start in the same work directory is refused in one line that names the
holder. In a multi-process run process 0 holds it, and the others stop with it.

The lock is `flock(LOCK_EX | LOCK_NB)` on `WORKDIR/lock`. The kernel releases it when
the holding process ends in any way (SIGKILL, a crash), and a restarted machine holds
none, so a stale lock never blocks a resume: there are no process ids to compare and no
timeouts to guess. The file's content (JSON: mode, command, pid, host, since) only
says who holds it; a file left by a dead process is taken over. The file is removed
when the lock is released (a taker checks that the file it locked is still the one at
the path, so a removal never lets two processes hold it).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path

from mos_jax import outputs
from mos_jax.errors import MosJaxError

try:
    import fcntl
except ImportError:  # not a POSIX system: the lock records its holder, enforces nothing
    fcntl = None

LOCK_FILE = "lock"


class WorkdirBusy(MosJaxError):
    """Another process runs in this work directory."""


def holder(workdir) -> dict | None:
    """What the lock file of `workdir` says about its holder (None: no file, or no
    holder written). The lock itself may be free: a killed holder leaves the file."""
    try:
        return json.loads((Path(workdir) / LOCK_FILE).read_text()) or None
    except (OSError, ValueError):
        return None


def describe_holder(info: dict | None) -> str:
    if not info:
        return "another process (it has not recorded itself yet)"
    command = info.get("command") or f"mos-jax {info.get('mode', 'train')}"
    return (f"`{command}` (pid {info.get('pid')} on host {info.get('host')}, since "
            f"{info.get('since')})")


class WorkdirLock:
    """Hold the work directory `workdir` for one run (a context manager).

    Entering checks the path (`mos_jax.outputs.check_folder`, as `flag`), creates the
    folder and takes the lock, or raises `WorkdirBusy`. Leaving releases it, removes
    the lock file, and removes the folders it created if they are still empty (a start
    that failed leaves nothing behind). `active=False` (the other processes of a
    multi-process run: process 0 holds the lock) does nothing.
    """

    def __init__(self, workdir, mode: str = "train", *, flag: str = "--workdir",
                 active: bool = True):
        self.workdir, self.mode, self.flag = Path(workdir), mode, flag
        self.active = active
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> "WorkdirLock":
        if self.active and self._fd is None:  # not taken yet (see `hold`)
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self._created = outputs.make_folder(self.flag, self.workdir)
        try:
            self._fd = self._take()
        except BaseException:
            self._remove_created()
            raise
        info = {"mode": self.mode, "command": _command_line(self.mode),
                "pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now(datetime.timezone.utc)
                .strftime("%Y-%m-%d %H:%M:%S UTC")}
        try:
            os.ftruncate(self._fd, 0)
            os.write(self._fd, (json.dumps(info) + "\n").encode())
        except OSError as e:  # a full disk, say: let go of what was taken
            self.release()
            raise outputs.OutputError(
                f"{self.flag} {self.workdir}: cannot write {self.path} "
                f"({outputs._reason(e)}); free some space or choose another path") from None

    def _take(self) -> int:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise outputs.OutputError(
                    f"{self.flag} {self.workdir}: cannot create {self.path} "
                    f"({outputs._reason(e)}); choose another path") from None
            if fcntl is None:
                return fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise WorkdirBusy(
                    f"{self.workdir} is in use by {describe_holder(holder(self.workdir))}"
                    f": wait for that run to end, or stop it (Ctrl-C saves a "
                    f"checkpoint), then run this command again; or give another "
                    f"{self.flag}") from None
            try:  # the holder before us may have removed the file we opened
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: see _take
        except OSError:
            pass
        os.close(self._fd)  # releases the lock
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break
        self._created = []


def hold(workdir, mode: str, plan) -> WorkdirLock:
    """The lock of a run over the placement `plan` (a `mos_jax.parallel.Plan`), taken:
    process 0 takes it, and in a multi-process run every process learns whether it
    did, so that none is left waiting for a peer that stopped. Use it as a context
    manager (`with hold(...):`) to release it."""
    lock = WorkdirLock(workdir, mode, active=plan.is_primary)
    error = None
    if plan.is_primary:
        try:
            lock.acquire()
        except Exception as e:  # any failure: the other processes must hear of it
            error = e
    if plan.process_count > 1:
        refused = plan.agree(True, error is not None)[0]
        if refused and error is None:
            raise WorkdirBusy(f"process 0 of this run could not take the work directory "
                              f"{workdir} (its message says why)")
    if error is not None:
        raise error
    return lock


def _command_line(mode: str) -> str:
    """How this process was started, for the lock's holder: the command line when it
    is the `mos-jax` command, else `mos-jax MODE` (a Python caller)."""
    argv = sys.argv
    if argv and Path(argv[0]).name in ("mos-jax", "cli.py") and len(argv) > 1:
        return " ".join(["mos-jax", *argv[1:]])
    return f"mos-jax {mode} (from {Path(argv[0]).name if argv and argv[0] else 'Python'})"
