#!/usr/bin/env bash
# One device call for programmatic dependent launch (kernels/dependent_launch.py; carry build/h11wheels):
# every Triton kernel against its reference plus the PDL decode chain in a graph (bench/check_kernels.py),
# row invariance over graph replays (bench/check_determinism.py), float32 VL parity (bench/check_vl_gpu.py),
# then W2 for each setting in W2_SETTINGS (env assignments; "-" = defaults) and W1 (median of W1_RUNS).
source bench/gpu_env.sh
PARTS=",${PARTS:-check,w2,w1},"
if [[ $PARTS == *,check,* ]]; then
  timeout 120 python3 bench/check_kernels.py > "$OUT/check_kernels.log" 2>&1; echo "check_kernels rc=$?"
  grep -v -i warn "$OUT/check_kernels.log" | grep -E "FAIL|PDL|chain|failure" | tail -8; stamp kernels
  timeout 150 python3 bench/check_determinism.py > "$OUT/determinism.log" 2>&1; echo "check_determinism rc=$?"
  grep -v -i warn "$OUT/determinism.log" | tail -6; stamp determinism
  timeout 120 python3 bench/check_vl_gpu.py > "$OUT/check_vl.log" 2>&1; echo "check_vl rc=$?"
  grep -E "tokens|OK|FAIL|Error|error" "$OUT/check_vl.log" | tail -6; stamp check_vl
fi
if [[ $PARTS == *,w2,* ]]; then
  for setting in ${W2_SETTINGS:-VLSERVE_PDL=0 -}; do
    env_args=(); [[ $setting != - ]] && env_args=("$setting")
    env "${env_args[@]}" timeout 80 python3 bench/w2_latency.py --no-hf --runs 3 > "$OUT/w2_${setting//=/_}.log" 2>&1
    echo "W2 [$setting]: $(grep -E 'engine ms/token' "$OUT/w2_${setting//=/_}.log")"; stamp "w2 $setting"
  done
fi
if [[ $PARTS == *,w1,* ]]; then
  timeout 150 python3 bench/w1_throughput.py --no-hf --runs ${W1_RUNS:-3} > "$OUT/w1.log" 2>&1
  grep -E "runs \(s\)|output tokens/s|stage" "$OUT/w1.log"; stamp w1
fi
