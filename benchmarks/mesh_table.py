"""The table of benchmarks/mesh_bench.sh's JSON files: python3 benchmarks/mesh_table.py DIR"""

import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    rows = []
    for path in sorted(Path(folder).glob("*.json")):
        r = json.loads(path.read_text())
        t = r["train"]
        rows.append((r["head"], r["vocab"], tuple(t["mesh"]), t))
    rows.sort(key=lambda x: (x[1], x[0], -x[2][1]))
    print("| head | V | data x model | state MiB / device | step plan MiB / device "
          "| collectives | collective MiB / step | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for head, vocab, (data, model), t in rows:
        print(f"| {head} | {vocab:,} | {data} x {model} | {t['state_mb_per_device']:,.1f} "
              f"| {t.get('step_plan_mb_per_device', float('nan')):,.1f} "
              f"| {t.get('collectives', '')} | {t.get('collective_mb_per_step', 0):,.2f} "
              f"| {t['tokens_per_s']['median']:,.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mesh_bench")
