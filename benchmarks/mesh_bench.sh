#!/usr/bin/env bash
# The output layer split over the `model` mesh axis, on 8 fake CPU devices: per-device
# state and planned step memory, tokens/s and the collectives of one train step, for
# meshes data x model = 2x4, 8x1, 1x8 at V = 100k and 267k with softmax and MoS (the PTB
# config shrunk as in "Cost against vocabulary size"; batch 8 x 8 to keep MoS at 267k
# within minutes on a CPU). Writes one JSON per cell into $OUT (default mesh_bench/),
# then prints the table (benchmarks/mesh_table.py).
set -euo pipefail
OUT=${OUT:-mesh_bench}
mkdir -p "$OUT"
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
for vocab in 100000 267000; do
  for head in softmax mos; do
    for mesh in 8x1 2x4 1x8; do
      model=${mesh#*x}
      file="$OUT/$head-$vocab-$mesh.json"
      [ -s "$file" ] && continue  # done in an earlier (interrupted) run
      python3 -m mos_jax.cli bench --config configs/ptb.py --vocab "$vocab" --head "$head" \
        --num-devices 0 --only train --batch 8 --bptt 8 --warmup 1 --repeats 2 \
        --config.model.emsize=256 --config.model.nhidlast=256 --config.model.nhid=512 \
        --config.model.nlayers=2 --config.parallel.mesh.model="$model" \
        --out "$file.part" > /dev/null
      mv "$file.part" "$file"
      echo "done: $file"
    done
  done
done
python3 benchmarks/mesh_table.py "$OUT"
