#!/usr/bin/env bash
# One device call for decode-path A/Bs (carry build/h11wheels build/before): bench/check_kernels.py
# (bitwise checks of the fused kernels), then for each variant the captured decode step's GPU time
# (bench/step_time.py: buckets 1 and 64, plus one W2 wall run):
#   before   the tree in build/before (`git archive REV | tar -x -C build/before`, bench/step_time.py copied in)
#   now      this tree as it is
#   att64    kernels/attention_launch.json with 64-token KV segments
#   silu     gate_up's small-M product fused with SiLU (swapped 64 x 64 tile, 6 stages: tune_decode's best)
#   down2    the down projection's K ranges summed in the launch of the next norm (kernels/linear_norm.py)
# PARTS (default check,ab) picks; VARIANTS (default before,now,att64,silu,down2) the A/B runs; W2=1 adds
# bench/w2_latency.py --runs 3 after each; also det (bench/check_determinism.py), vl (bench/check_vl_gpu.py).
source bench/gpu_env.sh
PARTS=",${PARTS:-check,ab},"
if [[ $PARTS == *,check,* ]]; then
  timeout 150 python3 bench/check_kernels.py > "$OUT/check_kernels.log" 2>&1; echo "check_kernels rc=$?"
  grep -E "FAIL|fused|PDL|failure" "$OUT/check_kernels.log" | tail -8; stamp check
fi
patch_table() {  # file, JSON {key: {field: value}} merged into this GPU's entries ("" key: the entry itself)
  python3 -c "
import json, sys, torch
path = sys.argv[1]; table = json.load(open(path)); device = table.setdefault(torch.cuda.get_device_name(), {})
for key, extra in json.loads(sys.argv[2]).items(): (device.setdefault(key, {}) if key else device).update(extra)
json.dump(table, open(path, 'w'), indent=1)" "$@"
}
run_variant() {
  local name=$1 dir=.
  cp kernels/linear_tiles.json /tmp/linear_tiles.json; cp kernels/attention_launch.json /tmp/attention_launch.json
  case $name in
    before) dir=build/before ;;
    att64) patch_table kernels/attention_launch.json '{"": {"kv_split": 64}}' ;;
    silu) patch_table kernels/linear_tiles.json '{"22016,2048": {"silu_tile": [64, 64, 4, 6], "swap_ab": true}}' ;;
    down2) patch_table kernels/linear_tiles.json '{"2048,11008": {"split_sum": "two_launch"}}' ;;
  esac
  (cd $dir && PYTHONPATH=$(pwd):/tmp/site timeout 120 python3 bench/step_time.py) > "$OUT/step_$name.log" 2>&1
  echo "[$name] $(grep -E 'W2 wall|decode step' "$OUT/step_$name.log" | tr '\n' ' ')"
  if [[ ${W2:-0} == 1 ]]; then
    (cd $dir && PYTHONPATH=$(pwd):/tmp/site timeout 100 python3 bench/w2_latency.py --no-hf --runs 3) > "$OUT/w2_$name.log" 2>&1
    echo "[$name] W2 $(grep -E 'engine ms/token' "$OUT/w2_$name.log")"
  fi
  cp /tmp/linear_tiles.json kernels/linear_tiles.json; cp /tmp/attention_launch.json kernels/attention_launch.json
  stamp "$name"
}
if [[ $PARTS == *,ab,* ]]; then
  IFS=',' read -ra variants <<< "${VARIANTS:-before,now,att64,silu,down2}"
  for variant in "${variants[@]}"; do run_variant "$variant"; done
fi
if [[ $PARTS == *,det,* ]]; then
  timeout 150 python3 bench/check_determinism.py > "$OUT/determinism.log" 2>&1; echo "check_determinism rc=$?"
  grep -v -i warn "$OUT/determinism.log" | tail -14; stamp determinism
fi
if [[ $PARTS == *,vl,* ]]; then
  timeout 120 python3 bench/check_vl_gpu.py > "$OUT/check_vl.log" 2>&1; echo "check_vl rc=$?"
  grep -E "tokens|OK|FAIL|Error|error" "$OUT/check_vl.log" | tail -10; stamp check_vl
fi
