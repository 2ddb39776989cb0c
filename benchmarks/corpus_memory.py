"""Peak memory of a host reading its batch columns of a memory-mapped corpus.

    python benchmarks/corpus_memory.py [--sizes 1e6 1e9] [--windows 2000] [--dir DIR]
        [--copy-baseline]

For each size, a stream of that many random int32 token ids is written to a `.npy`
under a temporary directory (inside `--dir`, default the system's), in chunks of 2^24
ids with `mos_jax.data.IdWriter` (never the whole stream in memory), the way the id
cache stores a split. Then a fresh subprocess per size opens it memory-mapped
(`data.open_ids`), batchifies it for batch 64 (`batching.batchify`, a view), takes the
columns of process 0 of 2 (columns 0-31, as `Plan.host_slice` gives them), and cuts
`--windows` training windows of bptt 70 (`batching.train_windows` and
`padded_window`, as the training loop does; a new epoch when the stream is used up),
summing every window so each id is read. It reports its peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), that before the ids were opened (the
interpreter and NumPy), the time per window, and at the end the resident memory split
into anonymous (`RssAnon`: the process's own allocations) and file-backed (`RssFile`:
pages of mapped files, the ids read so far among them; clean page cache the kernel
can take back, never copied or swapped). `--copy-baseline` adds a subprocess
that batchifies the largest stream as earlier versions did (`np.ascontiguousarray`
of the transposed stream: the whole split in memory) for comparison. The temporary
directory is deleted at the end. Results: BENCHMARKS.md, "Corpora larger than memory".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH, BPTT, HOSTS = 64, 70, 2
CHUNK = 1 << 24


def write_stream(path: Path, n: int, vocab: int, seed: int = 0) -> float:
    """`n` random ids below `vocab` into the `.npy` `path`, a chunk at a time; the
    seconds it took."""
    import numpy as np

    from mos_jax.data import IdWriter
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with IdWriter(path) as w:
        for i in range(0, n, CHUNK):
            w.write(rng.integers(0, vocab, size=min(CHUNK, n - i), dtype=np.int32))
    return time.perf_counter() - start


def child(path: str, windows: int, copy: bool) -> None:
    """Run in the subprocess: read this host's windows, print one JSON record."""
    import resource

    def peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def status_mib(key: str) -> float | None:  # /proc/self/status (Linux), kB -> MiB
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(f"{key}:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        return None

    import numpy as np

    from mos_jax import batching, data
    before = peak_mib()
    ids = data.open_ids(path)
    if copy:  # the earlier batchify: a contiguous copy of the whole split
        n = len(ids) // BATCH
        rows = np.ascontiguousarray(ids[:n * BATCH].reshape(BATCH, n).T)
    else:
        rows = batching.batchify(ids, BATCH)
    per_host = BATCH // HOSTS
    local = rows[:, 0:per_host]  # process 0 of 2: Plan.host_slice(64) = slice(0, 32)
    buckets = batching.default_buckets(BPTT, BPTT + 40)
    done, epoch, total, rows_read = 0, 0, 0, 0
    start = time.perf_counter()
    while done < windows:
        rng = np.random.default_rng([0, epoch])
        for w in batching.train_windows(len(local), rng, BPTT, BPTT + 40, buckets):
            x, y, length = batching.padded_window(local, w.start, w.length, w.padded)
            total += int(x.sum(dtype=np.int64)) + int(y.sum(dtype=np.int64))
            rows_read += length
            done += 1
            if done == windows:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens": len(ids), "file_mib": round(os.path.getsize(path) / 2**20, 1),
                      "windows": done, "epochs_started": epoch, "rows_read": rows_read,
                      "copy_baseline": copy, "rss_before_open_mib": round(before, 1),
                      "peak_rss_mib": round(peak_mib(), 1), "vm_hwm_mib": status_mib("VmHWM"),
                      "end_rss_anon_mib": status_mib("RssAnon"),
                      "end_rss_file_mib": status_mib("RssFile"),
                      "ms_per_window": round(1e3 * seconds / done, 3), "checksum": total}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e9])
    p.add_argument("--windows", type=int, default=2000)
    p.add_argument("--vocab", type=int, default=800_000, help="ids are drawn below this")
    p.add_argument("--dir", default=None, help="where the temporary directory goes")
    p.add_argument("--copy-baseline", action="store_true")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--write", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2] == "copy")
        return
    if args.write:
        seconds = write_stream(Path(args.write[0]), int(args.write[1]), args.vocab)
        print(json.dumps({"wrote": int(args.write[1]), "seconds": round(seconds, 1)}))
        return
    # This process stays small (no NumPy): a child's ru_maxrss starts from its
    # parent's resident size at the fork, so the writing runs in a subprocess too.
    folder = Path(tempfile.mkdtemp(prefix="mos-jax-corpus-memory-", dir=args.dir))
    try:
        runs = [(int(n), False) for n in args.sizes]
        if args.copy_baseline:
            runs.append((int(max(args.sizes)), True))
        written = {}
        for n, copy in runs:
            path = folder / f"ids-{n}.npy"
            if n not in written:
                written[n] = subprocess.run(
                    [sys.executable, __file__, "--write", str(path), str(n),
                     "--vocab", str(args.vocab)],
                    check=True, capture_output=True, text=True).stdout.strip()
                print(written[n], flush=True)
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(path), str(args.windows),
                 "copy" if copy else "view"],
                check=True, capture_output=True, text=True)
            print(out.stdout.strip(), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
