#!/usr/bin/env bash
# One call on the GPU machine: kernel checks (bench/check_kernels.py), then bench/run_all.py in
# separate processes (each starts with a free GPU): linear-layer row invariance; the deterministic
# engine (W2 + W1 + determinism check); W1 with --no-deterministic (the cost); HF transformers
# baselines (W2, W1); W3 vision tower (ours + HF). Ends with ONE summary table; JSON to $OUT.
# Usage (device machine, repo root):  bash bench/run_gpu.sh [--runs 5]
# Wheels (bench/fetch_gpu_wheels.sh makes both; carry them): build/h11wheels is installed to /tmp/site
# first (av, msgspec, transformers 5.23); build/w4wheels adds the serving stack W4 needs (litestar...).
# About 4 minutes on an H100 with --runs 5 (SKIP_KERNEL_CHECKS=1 saves ~30 s).
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d build/h11wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    build/h11wheels/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if [ -d build/sowheels ]; then   # structured outputs (llguidance, xgrammar): into /tmp/site like h11wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    build/sowheels/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if [ -d build/w4wheels ]; then
  python3 -m pip install -q --no-index --find-links build/w4wheels litestar uvicorn httpx prometheus_client swagger-ui-bundle \
    2>/dev/null || python3 -m pip install -q --break-system-packages --no-index --find-links build/w4wheels \
    litestar uvicorn httpx prometheus_client swagger-ui-bundle
fi
export PYTHONPATH=$(pwd):${PYTHONPATH:-}
rm -f bench/results/run_all_*.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${SKIP_KERNEL_CHECKS:-0}" != "1" ]; then
  python3 bench/check_kernels.py 2>&1 | tail -30
fi
for parts in linear det nondet hf w3; do
  echo "=== run_all --parts $parts"
  python3 bench/run_all.py --parts "$parts" "$@" 2>&1 | grep -v -i "warn"
done
if python3 -c "import litestar, uvicorn" 2>/dev/null; then
  echo "=== W4 serving"; python3 bench/w4_serving.py 2>&1 | grep -v -i "warn\|INFO"
else
  echo "=== W4 skipped: litestar/uvicorn (and their deps) not installed on this machine"
fi
if python3 -c "import llguidance, xgrammar" 2>/dev/null; then
  echo "=== structured outputs"; python3 bench/structured_outputs.py 2>&1 | grep -v -i "warn"
fi
python3 bench/run_all.py --summarize
if [ -n "${OUT:-}" ]; then
  for f in run_all_det run_all_nondet run_all_hf run_all_w3 run_all_linear w4_serving w3_vision; do
    cp "bench/results/$f.json" "$OUT"/ 2>/dev/null || true
  done
fi
