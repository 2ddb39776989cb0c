#!/usr/bin/env bash
# The prepared accelerator check (benchmarks/accelerator_check.py says what it runs).
#
#   PYTHONPATH=. bash benchmarks/accelerator_check.sh [--data .data] [--out DIR] [--rehearse]
#
# Run from anywhere; it works in the repository root. Wheels carried in .whl/ (the GPU
# image lacks ml_collections; `--wheel-commands` prints how to fetch it) are installed
# into a private folder and put on PYTHONPATH; the project itself runs from source.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/mos_jax_accel_site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl || { echo "error: installing .whl/*.whl failed" >&2; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 benchmarks/accelerator_check.py "$@"
