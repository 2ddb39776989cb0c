"""Summarise a `benchmarks/side_by_side.sh` run: mos-jax against the reference's computation.

    python benchmarks/side_by_side_summary.py OUTDIR

For each workload: both medians of every round (tokens/s), the per-round ratio
mos-jax / reference (median and range over rounds, each round's two processes having
run back to back), peak memory, and the ratio the issue-6/issue-4 targets ask for
(the target tokens/s over the reference's tokens/s in docs/reference.md section 6).
"""

import json
import statistics
import sys
from pathlib import Path

WORKLOADS = {  # name: (mos-jax key, reference key, target ratio, description)
    "train": ("train", "train", 325 / 250, "PTB train step, B 12 x T 70"),
    "eval": ("eval", "eval", 1000 / 700, "PTB evaluation, B 10 x T 70"),
    "small": ("train", "train", 3700 / 1860, "small config train, B 12 x T 35"),
    "dyn": ("dynamic_eval", "dynamic_eval", 3.0, "PTB dynamic evaluation, update pass"),
}


def main(out: Path) -> None:
    print("| workload | reference tokens/s (rounds) | mos-jax tokens/s (rounds) | "
          "ratio, median [min, max] | target ratio | peak memory ref / mos-jax |")
    print("|---|---|---|---|---|---|")
    for name, (mk, rk, target, desc) in WORKLOADS.items():
        refs, moss, ratios, mem = [], [], [], None
        for r in sorted(out.glob(f"ref_{name}_*.json")):
            m = r.with_name(r.name.replace("ref_", "mos_"))
            if not m.exists():
                continue
            ref, mos = json.loads(r.read_text()), json.loads(m.read_text())
            a, b = ref[rk]["median"], mos[mk]["tokens_per_s"]["median"]
            refs.append(a)
            moss.append(b)
            ratios.append(b / a)
            mem = (ref["peak_rss_mb"], mos[mk]["peak_memory_mb"])
        if not ratios:
            continue
        fmt = lambda xs: ", ".join(f"{x:,.1f}" for x in xs)  # noqa: E731
        print(f"| {desc} | {fmt(refs)} | {fmt(moss)} | {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] | {target:.2f} | "
              f"{mem[0]:,} / {mem[1]:,} MB |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
