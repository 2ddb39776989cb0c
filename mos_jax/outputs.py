"""Output paths: one rule for every file and folder a command writes.

The rule, checked before any work (`check_file`, `check_folder`):

* missing folders are created (when the output is written, so a refused or failed
  command leaves none behind);
* a path is refused when it names an existing folder where a file is wanted, or an
  existing file where a folder is wanted; when one of its components is a file
  (`afile/run`); when the nearest existing folder does not take a new file, or an
  existing file cannot be opened for writing; and (files) when its suffix is not
  one the writer can write.

Whether a folder takes a new file is tried (a probe file, created and removed), not
asked: `os.access` answers yes to root on `/proc` and on read-only mounts.

After the work, `Deliveries` writes the outputs: a write that fails anyway (disk
full, a folder removed meanwhile, ...) is written to a fallback file in the system's
temporary folder where possible, the command still prints its result, and
`Deliveries.check` then raises one error naming the flag, the path, the reason and
the fallback (status 2).
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from mos_jax.errors import MosJaxError


class OutputError(MosJaxError):
    """An output path cannot be written."""


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _nearest_folder(flag: str, path: Path, start: Path) -> Path:
    """The nearest existing ancestor of `start` (itself included); refuses a file
    among them, and a folder that does not take a new file."""
    folder = start
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{flag} {path}: {folder} is a file, not a folder; choose "
                          "another path")
    _probe(flag, path, folder)
    return folder


def _probe(flag: str, path: Path, folder: Path) -> None:
    """Refuse `folder` unless a file can be created (and removed) in it."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".mos-jax-probe-", dir=folder)
    except OSError as e:  # /proc answers "no such file"
        why = ("it takes no new files" if isinstance(e, FileNotFoundError)
               else _reason(e))
        raise OutputError(f"{flag} {path}: cannot create files in {folder} ({why}); "
                          "choose another path") from None
    os.close(fd)
    os.unlink(probe)


def check_file(flag: str, path, suffixes: Iterable[str] | None = None) -> None:
    """Refuse, before any work, a file path the command could not write (the module's
    rule). `suffixes`: the accepted endings (e.g. an image format for plots)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder, not a file: give a file name "
                          f"inside it (e.g. {path / ('result' + _example(suffixes))})")
    if suffixes is not None and path.suffix.lower() not in set(suffixes):
        raise OutputError(
            f"{flag} {path}: cannot write a {path.suffix or 'suffix-less'} file; give a "
            f"name ending in one of {', '.join(sorted(suffixes))} (e.g. "
            f"{path.stem}{_example(suffixes)})")
    if path.exists():
        try:  # opening to append changes nothing
            with open(path, "ab"):
                pass
        except OSError as e:
            raise OutputError(f"{flag} {path}: cannot write this file ({_reason(e)}); "
                              "choose another path") from None
        return
    _nearest_folder(flag, path, path.parent)


def _example(suffixes) -> str:
    if not suffixes:
        return ".json"
    return ".png" if ".png" in suffixes else sorted(suffixes)[0]


def check_folder(flag: str, path) -> None:
    """Refuse, before any work, a folder path the command could not write in (the
    module's rule); it need not exist."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; choose another path")
    _nearest_folder(flag, path, path)


def make_folder(flag: str, path) -> list[Path]:
    """`check_folder`, then create `path` and its missing parents. Returns the folders
    it created, outermost first (so that a caller can remove them again)."""
    path = Path(path)
    check_folder(flag, path)
    missing = []
    folder = path
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot create this folder ({_reason(e)}); "
                          "choose another path") from None
    return missing[::-1]


def write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path`, creating missing folders. A regular file (or a new one)
    is written beside and renamed into place, so a failed write leaves any previous
    file whole; anything else (`/dev/stdout`, a pipe) is written in place."""
    from mos_jax.data import atomic_write_bytes
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is None or stat.S_ISREG(mode):
        atomic_write_bytes(path, data)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return path


def array_bytes(array) -> bytes:
    """`array` in NumPy's .npy format."""
    import numpy as np
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return buf.getvalue()


def where(path) -> str | None:
    """Where an output went (the path asked for, or its fallback; None: nowhere), as
    a result records it."""
    return None if path is None else str(path)


def fallback_path(path) -> Path:
    """A new file in the system's temporary folder named after `path`."""
    name = Path(path).name or "output"
    fd, fallback = tempfile.mkstemp(prefix="mos-jax-", suffix=f"-{name}")
    os.close(fd)
    return Path(fallback)


class Deliveries:
    """The writes of a command's results, after its work: none of them loses a result.

    Each `write` that fails is written to a fallback file where possible and noted;
    the command prints its result as usual, then calls `check`, which raises one
    `OutputError` for all the failures.
    """

    def __init__(self):
        self.failures: list[tuple[str, Path, str, Path | None]] = []

    def write(self, flag: str, path, write: Callable[[Path], object]) -> Path | None:
        """`write(path)`; if it fails (OSError), `write(fallback)`. Returns where the
        output is: `path`, the fallback, or None. `flag`: the option that named the
        path ("" for a file a command writes into its --workdir)."""
        path = Path(path)
        try:
            write(path)
            return path
        except OSError as e:
            reason = _reason(e)
        try:
            fallback = fallback_path(path)
            write(fallback)
        except OSError:
            fallback = None
        self.failures.append((flag, path, reason, fallback))
        return fallback

    def text(self, flag: str, path, text: str) -> Path | None:
        return self.write(flag, path, lambda p: write_bytes(p, text.encode()))

    def array(self, flag: str, path, array) -> Path | None:
        data = array_bytes(array)
        return self.write(flag, path, lambda p: write_bytes(p, data))

    def check(self, shown: bool = True) -> None:
        """Raise one `OutputError` for the failed writes, if any. `shown`: the
        command printed its result (the message says it is above)."""
        if not self.failures:
            return
        what = "; ".join(f"{flag} {path}: {reason}".lstrip()
                         for flag, path, reason, _ in self.failures)
        kept = ", ".join(str(f) for *_, f in self.failures if f is not None)
        if shown:
            where = "the result is above" + (f" (and in {kept})" if kept else "")
        else:
            where = f"it is in {kept} instead" if kept else "nothing was written"
        raise OutputError(f"could not write {what}; {where}")
