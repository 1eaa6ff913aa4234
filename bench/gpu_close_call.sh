#!/usr/bin/env bash
# Closing device call (carry build/h11wheels build/w4wheels build/tools): bench/gpu_serving_call.sh's
# PARTS (default check,w4,det,nondet), then W2 with a second attention launch ($ALT_LAUNCH, a JSON
# AttentionLaunch written to kernels/attention_launch.json for that run only), then the transformers
# baselines (bench/run_all.py --parts hf), last because the call may run out of time there. INVARIANCE=1
# adds bench/check_determinism.py (linear rows across M, fused SiLU included) before the baselines; W1_PAIR=1
# W1 deterministic then --no-deterministic, 5 runs each. Every log comes back in one archive, close_logs.tgz.
set -uo pipefail
PARTS=${PARTS:-check,w4,det,nondet} bash bench/gpu_serving_call.sh
export PYTHONPATH=$(pwd):/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
if [[ -n ${ALT_LAUNCH:-} ]]; then
  cp kernels/attention_launch.json /tmp/attention_launch.json
  python3 -c "import json, sys, torch; json.dump({torch.cuda.get_device_name(): json.loads(sys.argv[1])}, open('kernels/attention_launch.json', 'w'))" "$ALT_LAUNCH"
  timeout 70 python3 bench/w2_latency.py --no-hf --runs 3 > "$OUT/w2_alt.log" 2>&1
  echo "W2 with $ALT_LAUNCH: $(grep -E 'engine ms/token' "$OUT/w2_alt.log")"
  cp /tmp/attention_launch.json kernels/attention_launch.json
fi
if [[ ${INVARIANCE:-0} == 1 ]]; then   # bench/check_determinism.py whole: linear rows across M, then the engine probes
  timeout 150 python3 bench/check_determinism.py > "$OUT/invariance.log" 2>&1; echo "check_determinism rc=$?"
  grep -v -i warn "$OUT/invariance.log" | grep -E "False|FAIL|probe|mode" | head -12
fi
if [[ ${W1_PAIR:-0} == 1 ]]; then   # determinism's cost on W1 again: 5 runs each, deterministic then not
  PARTS=w1 W1_VARIANTS='pair_det;nondet_pair' bash bench/gpu_fusion_call.sh 2>&1 | grep -E "W1|done"
fi
if [[ ${HF:-1} == 1 ]]; then
  timeout 90 python3 bench/run_all.py --parts hf > "$OUT/hf.log" 2>&1; grep -v -i warn "$OUT/hf.log" | tail -4
fi
# At most 8 files come back from a device call: one archive of every log.
(cd "$OUT" && tar czf /tmp/close_logs.tgz --exclude=close_logs.tgz . && rm -rf ./* && mv /tmp/close_logs.tgz .)
