"""Peak memory of tokenising a text corpus into the memory-mapped id cache.

    python benchmarks/tokenize_memory.py [--sizes 2e6 6e6] [--layouts lines one-line]
        [--tokenizer word] [--dir DIR]

For each size and layout, a training file of that many words (drawn from 1,000 made-up
words; `lines`: 10 words a line, `one-line`: the whole file one line, as text8 is) and
two small valid/test files are written under a temporary directory (inside `--dir`,
default the system's). A fresh subprocess per case then reads the directory with
`mos_jax.data.read_corpus` (the id cache under the same temporary directory, so the
corpus is tokenised, not read from an earlier cache) and reports its peak resident set
size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) before and after, and the seconds
taken. The temporary directory is deleted at the end. Results: BENCHMARKS.md,
"Corpora larger than memory".
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

WORDS_PER_LINE = 10
BLOCK_LINES = 1000


def write_corpus(folder: Path, n: int, layout: str, seed: int = 0) -> None:
    """A training file of `n` words (`layout` `lines` or `one-line`), written a block
    of lines at a time, and two one-line valid/test files."""
    import numpy as np
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(1000)])
    sep = "\n" if layout == "lines" else " "
    folder.mkdir(parents=True)
    with open(folder / "train.txt", "w") as f:
        for i in range(0, n, WORDS_PER_LINE * BLOCK_LINES):
            k = min(WORDS_PER_LINE * BLOCK_LINES, n - i)
            block = words[rng.integers(0, len(words), k)].reshape(-1, WORDS_PER_LINE)
            f.write(sep.join(" ".join(row) for row in block) + sep)
    for split in ("valid", "test"):
        (folder / f"{split}.txt").write_text("w1 w2 w3\n")


def child(folder: str, tokenizer: str) -> None:
    """Run in the subprocess: tokenise `folder`, print one JSON record."""
    import resource

    from mos_jax import data
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    kw = {} if tokenizer == "word" else {"tokenizer": tokenizer, "vocab_size": 500}
    corpus = data.read_corpus(folder, cache_dir=Path(folder).parent / "cache", **kw)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"train_tokens": int(len(corpus.train)),
                      "mapped": type(corpus.train).__name__ == "memmap",
                      "rss_before_mib": round(before, 1), "peak_rss_mib": round(peak, 1),
                      "growth_mib": round(peak - before, 1),
                      "seconds": round(seconds, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[2e6, 6e6])
    p.add_argument("--layouts", nargs="+", default=["lines", "one-line"],
                   choices=["lines", "one-line"])
    p.add_argument("--tokenizer", default="word", choices=["word", "bpe", "unigram"])
    p.add_argument("--dir", default=None, help="where the temporary directory goes")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    tmp = Path(tempfile.mkdtemp(prefix="mos-jax-tokenize-", dir=args.dir))
    try:
        for layout in args.layouts:
            for size in args.sizes:
                case = tmp / f"{layout}-{int(size)}"
                write_corpus(case / "corpus", int(size), layout)
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(case / "corpus"),
                     args.tokenizer], capture_output=True, text=True, check=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)})
                record = json.loads(out.stdout.strip().splitlines()[-1])
                record.update(layout=layout, words=int(size),
                              file_mib=round((case / "corpus" / "train.txt").stat().st_size
                                             / 2**20, 1), tokenizer=args.tokenizer)
                print(json.dumps(record), flush=True)
                shutil.rmtree(case)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
