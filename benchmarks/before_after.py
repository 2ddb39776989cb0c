"""Summarise a `benchmarks/before_after.sh` run: tokens/s and peak memory of two checkouts.

    python benchmarks/before_after.py OUTDIR

For each workload: the median tokens/s of every round for both trees, the per-round
ratio after / before (median and range over rounds), and the range of both peak
memories (process peak RSS) over the rounds.
"""

import json
import statistics
import sys
from pathlib import Path


def main(out: Path) -> None:
    print("| workload | before tokens/s (rounds) | after tokens/s (rounds) | "
          "after / before, median [min, max] | peak memory before / after |")
    print("|---|---|---|---|---|")
    for w in ("train", "eval", "dynamic_eval"):
        pairs = []
        for b in sorted(out.glob(f"before_{w}_*.json")):
            a = b.with_name(b.name.replace("before_", "after_", 1))
            if a.exists():
                pairs.append((json.loads(b.read_text())[w], json.loads(a.read_text())[w]))
        if not pairs:
            continue
        tb = [p[0]["tokens_per_s"]["median"] for p in pairs]
        ta = [p[1]["tokens_per_s"]["median"] for p in pairs]
        ratios = [y / x for x, y in zip(tb, ta)]
        mb = [p[0]["peak_memory_mb"] for p in pairs]
        ma = [p[1]["peak_memory_mb"] for p in pairs]
        fmt = lambda xs: ", ".join(f"{x:,.1f}" for x in xs)  # noqa: E731
        print(f"| {w} | {fmt(tb)} | {fmt(ta)} | {statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}, {max(ratios):.3f}] | {min(mb):,}-{max(mb):,} / "
              f"{min(ma):,}-{max(ma):,} MB |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
