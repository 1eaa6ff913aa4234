#!/usr/bin/env bash
# Device call: tune the small-M linear tiles (writes kernels/linear_tiles.json, copied to $OUT), then
# the deterministic engine with async scheduling (W2, W1, determinism), then the float32 VL parity on CUDA.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site build/h11wheels/*.whl
export PYTHONPATH=$(pwd):/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 300 python3 bench/tune_linear.py --shapes 3b --write-table 2>&1 | grep -v "^skip" | tee "$OUT/tune.log"
cp kernels/linear_tiles.json "$OUT/" 2>/dev/null
python3 bench/run_all.py --parts det --runs 3 2>&1 | grep -v -i "warn" | tail -45
python3 bench/run_all.py --summarize 2>&1 | tail -25
cp bench/results/run_all_det.json "$OUT/" 2>/dev/null
timeout 240 python3 bench/check_vl_gpu.py 2>&1 | grep -v -i "warn" | tail -12
