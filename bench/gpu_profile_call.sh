#!/usr/bin/env bash
# One device call: profile the engine core on the GPU (bench/profile_gpu.py parts) and py-spy the
# host side of W1. Carry: build/h11wheels (av, msgspec, transformers 5.23) and build/tools (py-spy).
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  build/h11wheels/*.whl build/tools/*.whl && export PYTHONPATH=$(pwd):/tmp/site:${PYTHONPATH:-}
export PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for part in "$@"; do
  echo "=== $part"
  case "$part" in
    pyspy-w1) py-spy record -r 100 -f raw -o "$OUT/w1_pyspy.txt" -- python3 bench/w1_throughput.py --runs 1 --no-hf 2>&1 | grep -v -i "warn" | tail -25 ;;
    *) python3 bench/profile_gpu.py $part 2>&1 | grep -v -i "warn" ;;
  esac
done
