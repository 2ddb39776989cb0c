#!/usr/bin/env bash
# mos-jax and the reference's computation (benchmarks/reference_torch.py), alternating,
# one process per workload and round, so both see the same machine at the same time.
#   benchmarks/side_by_side.sh OUTDIR [ROUNDS]
# Writes OUTDIR/{mos,ref}_{train,eval,small,dyn}_R.json; summarise with
#   python benchmarks/side_by_side_summary.py OUTDIR
set -euo pipefail
out=${1:?usage: side_by_side.sh OUTDIR [ROUNDS]}
rounds=${2:-3}
mkdir -p "$out"
for r in $(seq 1 "$rounds"); do
  python3 benchmarks/reference_torch.py --only train --out "$out/ref_train_$r.json"
  mos-jax bench --vocab 10000 --only train --repeats 5 --out "$out/mos_train_$r.json" > /dev/null 2>&1
  python3 benchmarks/reference_torch.py --only eval --out "$out/ref_eval_$r.json"
  mos-jax bench --vocab 10000 --only eval --repeats 5 --out "$out/mos_eval_$r.json" > /dev/null 2>&1
  python3 benchmarks/reference_torch.py --config small --only train --repeats 10 \
      --out "$out/ref_small_$r.json"
  mos-jax bench --vocab 10000 --config configs/ptb_small.py --batch 12 --bptt 35 --repeats 10 \
      --only train --out "$out/mos_small_$r.json" > /dev/null 2>&1
  python3 benchmarks/reference_torch.py --only dynamic_eval --repeats 3 \
      --out "$out/ref_dyn_$r.json"
  mos-jax bench --vocab 10000 --only dynamic_eval --repeats 3 --out "$out/mos_dyn_$r.json" > /dev/null 2>&1
  echo "round $r done"
done
