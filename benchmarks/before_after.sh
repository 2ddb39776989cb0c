#!/usr/bin/env bash
# Two checkouts of mos-jax, alternating, one `mos-jax bench` process per workload and round,
# so both see the same machine at the same time.
#   benchmarks/before_after.sh BEFORE_TREE AFTER_TREE OUTDIR [ROUNDS]
# Each tree is a repository root (e.g. a `git worktree add` of the older commit); the
# command runs from it with PYTHONPATH set to it. Writes OUTDIR/{before,after}_W_R.json;
# summarise with `python benchmarks/before_after.py OUTDIR`.
set -euo pipefail
before=$(cd "${1:?usage: before_after.sh BEFORE_TREE AFTER_TREE OUTDIR [ROUNDS]}" && pwd)
after=$(cd "${2:?usage}" && pwd)
mkdir -p "${3:?usage}"
out=$(cd "$3" && pwd)
rounds=${4:-3}
bench() {  # TREE LABEL WORKLOAD ROUND
  (cd "$1" && PYTHONPATH="$1" python3 -m mos_jax.cli bench --vocab 10000 --only "$3" --repeats 5 \
      --out "$out/$2_$3_$4.json" > /dev/null 2>&1)
}
for r in $(seq 1 "$rounds"); do
  for w in train eval dynamic_eval; do
    if (( r % 2 )); then bench "$before" before "$w" "$r"; bench "$after" after "$w" "$r"
    else bench "$after" after "$w" "$r"; bench "$before" before "$w" "$r"; fi
  done
  echo "round $r done"
done
