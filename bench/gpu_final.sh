#!/usr/bin/env bash
# The closing device call (one lease): the vision memory check of issue 16 (0.95 utilisation, largest image),
# then W4-VL served (vlserve bench serve at 1/16/64 clients, deterministic default; 64 with
# --no-deterministic), W2 + W1 (median of 5) + determinism, W1 --no-deterministic, transformers baselines.
# Carry build/h11wheels and build/w4wheels (bench/fetch_gpu_wheels.sh).
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site build/h11wheels/*.whl \
  build/tools/*.whl
python3 -m pip install -q --no-index --find-links build/w4wheels litestar uvicorn httpx prometheus_client swagger-ui-bundle 2>/dev/null \
  || python3 -m pip install -q --break-system-packages --no-index --find-links build/w4wheels litestar uvicorn httpx prometheus_client swagger-ui-bundle
export PYTHONPATH=$(pwd):/tmp/site PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
log() { tee -a "$OUT/final.log"; }
stamp() { echo "[$1 done at $(( $(date +%s) - start )) s]" | log; }
nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 250 > "$OUT/gpu_util_w4.txt" &
smi=$!
# py-spy of the server's processes (API, engine core, decode workers) for 10 s into the 64-client level
(sleep 58; mkdir -p /tmp/pyspy; for pid in $(pgrep -f "spawn_main|-m app"); do
   py-spy record -d 10 -r 50 -f raw -o /tmp/pyspy/pid_$pid.txt --pid $pid >/dev/null 2>&1 &
 done; wait; ps -eo pid,args | grep -E "spawn_main|-m app" > /tmp/pyspy/ps.txt
 tar czf "$OUT/pyspy.tgz" /tmp/pyspy 2>/dev/null) &
timeout 200 python3 bench/w4_serving.py --levels 1,16,64 --min-prompts 32 2>&1 | grep -v -i "warn\|INFO\|it/s\]" | tail -16 | log
kill $smi 2>/dev/null
cp bench/results/w4_serving.json "$OUT/w4_det.json" 2>/dev/null
stamp "W4 det"
if [ -z "${W4_ONLY:-}" ]; then
timeout 150 python3 bench/run_all.py --parts det --runs 5 2>&1 | grep -v -i "warn" \
  | grep -E "W1|W2|stage|determinism|start|median|runs|requests/s|output tokens" | head -30 | log
cp bench/results/run_all_det.json "$OUT/" 2>/dev/null
stamp "det"
timeout 120 python3 bench/check_vision_memory.py 2>&1 | grep -v -i "warn" \
  | grep -iE "plan|encoder|tower|peak|KV cache|OK|FAIL|error|out of memory" | tail -14 | log
stamp "vision memory"
fi
timeout 90 python3 bench/w4_serving.py --levels 64 --min-prompts 32 \
  --server-args "--load-format dummy --max-model-len 8000 --gpu-memory-utilization 0.9 --no-deterministic" 2>&1 \
  | grep -v -i "warn\|INFO\|it/s\]" | tail -6 | log
stamp "W4 nondet"
[ -n "${W4_ONLY:-}" ] && { stamp "all"; exit 0; }
timeout 70 python3 bench/run_all.py --parts nondet --runs 3 2>&1 | grep -E "W1 out|median|runs \(s\)" | head -6 | log
timeout 80 python3 bench/run_all.py --parts hf 2>&1 | grep -v -i warn | tail -4 | log
python3 bench/run_all.py --summarize 2>&1 | tail -22 | log
tar czf "$OUT/results.tgz" bench/results/*.json 2>/dev/null
stamp "all"
