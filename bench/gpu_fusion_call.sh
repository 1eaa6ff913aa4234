#!/usr/bin/env bash
# One device call for decode-path A/Bs (carry build/h11wheels build/before): bench/check_kernels.py,
# then for each variant the captured decode step's GPU time (bench/step_time.py: buckets 1 and 64, plus
# one W2 wall run). A variant is
#   before              the tree in build/before (`git archive REV | tar -x -C build/before`, with
#                       bench/step_time.py copied in): the commit before the changes
#   now                 this tree as it is
#   NAME@linear=JSON    this tree with {"N,K": {field: value}} merged into kernels/linear_tiles.json's
#                       entries for this GPU (e.g. 'silu@linear={"22016,2048": {"silu_tile": "unfused"}}')
#   NAME@attention=JSON the same for kernels/attention_launch.json (e.g. 'seg64@attention={"kv_split": 64}')
# STEP_ARGS: bench/step_time.py's options (e.g. --tokens 520: replays at ~550 tokens of context, as W2's end).
# PARTS (default check,ab) picks; VARIANTS (';'-separated, default before;now) the A/B runs; W1=1 adds
# bench/w1_throughput.py --runs 5, W2=1 bench/w2_latency.py --runs 3 and W4=1 W4-VL served at W4_LEVELS
# clients (default 1; carry build/w4wheels too) after each; w1 runs only W1 for
# each of W1_VARIANTS (a name starting with nondet runs it with --no-deterministic); tune runs
# bench/tune_linear.py --range large, mid (TUNE_RANGES) --write-table (before ab and w1, which then run
# with the new table; it lands in $OUT); also det
# (bench/check_determinism.py: run it with the winning patch applied), vl (bench/check_vl_gpu.py), tiletma
# (bench/check_tile_tma.py, before ab), profile
# (bench/profile_gpu.py --part w2 with VLSERVE_PDL=0: the batch-1 step's kernel durations, before ab).
# E.g. the flat TMA loop (kernels/matmul_tma.py) at large M for the four layer shapes, prefill-bound W1:
#   W1=1 VARIANTS='now;flat@linear={"2560,2048": {"large_tma_flat": true}, "2048,2048": {"large_tma_flat": true},
#     "22016,2048": {"large_tma_flat": true}, "2048,11008": {"large_tma_flat": true}}' PARTS=ab bash bench/gpu_fusion_call.sh
source bench/gpu_env.sh
PARTS=",${PARTS:-check,ab},"
[[ ${W4:-0} == 1 ]] && source bench/install_w4_packages.sh   # build/w4wheels carried too
if [[ $PARTS == *,check,* ]]; then
  timeout 150 python3 bench/check_kernels.py > "$OUT/check_kernels.log" 2>&1; echo "check_kernels rc=$?"
  grep -E "FAIL|fused|PDL|TMA|failure" "$OUT/check_kernels.log" | tail -8; stamp check
fi
patch_table() {  # file, JSON merged into this GPU's table (attention: fields; linear: {"N,K": fields})
  python3 -c "
import json, sys, torch
path, patch = sys.argv[1], json.loads(sys.argv[2]); table = json.load(open(path))
device = table.setdefault(torch.cuda.get_device_name(), {})
if path.endswith('attention_launch.json'): device.update(patch)
else: [device[shape].update(fields) for shape, fields in patch.items()]
json.dump(table, open(path, 'w'), indent=1)" "$@"
}
apply_variant() {  # sets $dir (the tree to run) and patches this tree's tables; restore_tables undoes it
  local spec=$1; dir=.
  cp kernels/linear_tiles.json /tmp/linear_tiles.json; cp kernels/attention_launch.json /tmp/attention_launch.json
  case $spec in
    before) dir=build/before ;;
    *@linear=*) patch_table kernels/linear_tiles.json "${spec#*@linear=}" ;;
    *@attention=*) patch_table kernels/attention_launch.json "${spec#*@attention=}" ;;
  esac
}
restore_tables() {
  cp /tmp/linear_tiles.json kernels/linear_tiles.json; cp /tmp/attention_launch.json kernels/attention_launch.json
}
run_w1() {  # W1 only (median of 5), for the W1_VARIANTS of PARTS=w1
  local name=${1%%@*}; apply_variant "$1"
  local flags=--no-hf; [[ $name == nondet* ]] && flags+=" --no-deterministic"   # 'nondet': cuBLAS products
  (cd $dir && PYTHONPATH=$(pwd):/tmp/site timeout 150 python3 bench/w1_throughput.py $flags --runs 5) > "$OUT/w1_$name.log" 2>&1
  echo "[$name] W1 $(grep -E 'runs \(s\)|output tokens/s' "$OUT/w1_$name.log" | tr '\n' ' ')"
  restore_tables; stamp "w1 $name"
}
run_variant() {
  local spec=$1 name=${1%%@*}
  apply_variant "$spec"
  (cd $dir && PYTHONPATH=$(pwd):/tmp/site timeout 120 python3 bench/step_time.py ${STEP_ARGS:-}) > "$OUT/step_$name.log" 2>&1
  echo "[$name] $(grep -E 'W2 wall|decode step' "$OUT/step_$name.log" | tr '\n' ' ')"
  if [[ ${W1:-0} == 1 ]]; then
    (cd $dir && PYTHONPATH=$(pwd):/tmp/site timeout 150 python3 bench/w1_throughput.py --no-hf --runs 5) > "$OUT/w1_$name.log" 2>&1
    echo "[$name] W1 $(grep -E 'runs \(s\)|output tokens/s' "$OUT/w1_$name.log" | tr '\n' ' ')"
  fi
  if [[ ${W2:-0} == 1 ]]; then
    (cd $dir && PYTHONPATH=$(pwd):/tmp/site timeout 100 python3 bench/w2_latency.py --no-hf --runs 3) > "$OUT/w2_$name.log" 2>&1
    echo "[$name] W2 $(grep -E 'engine ms/token' "$OUT/w2_$name.log")"
  fi
  if [[ ${W4:-0} == 1 ]]; then   # W4-VL served, deterministic default, at W4_LEVELS clients (default 1)
    (cd $dir && PYTHONPATH=$(pwd):/tmp/site timeout 150 python3 bench/w4_serving.py --levels ${W4_LEVELS:-1} --min-prompts 32) > "$OUT/w4_$name.log" 2>&1
    echo "[$name] W4 $(grep -E 'output tok/s|TPOT|TTFT' "$OUT/w4_$name.log" | tr -s ' ' | tr '\n' ';')"
  fi
  restore_tables; stamp "$name"
}
if [[ $PARTS == *,tune,* ]]; then   # TMA tiles (flat loop included) at large and mid M, winners into the table
  for range in ${TUNE_RANGES:-large mid}; do
    timeout 240 python3 bench/tune_linear.py --range $range --write-table > "$OUT/tune_$range.log" 2>&1
    echo "tune $range rc=$?"; grep -E "^==|invariant|wrote" "$OUT/tune_$range.log" | head -40; stamp "tune $range"
  done
  cp kernels/linear_tiles.json "$OUT/"
fi
if [[ $PARTS == *,profile,* ]]; then   # batch-1 kernel durations (PDL off: no waits inside them), this tree
  VLSERVE_PDL=0 timeout 120 python3 bench/profile_gpu.py --part w2 > "$OUT/profile_w2.log" 2>&1; echo "profile rc=$?"
  grep -v -i warn "$OUT/profile_w2.log" | head -32; stamp profile
fi
if [[ $PARTS == *,tiletma,* ]]; then   # TMA weight tiles in the swapped small-M product: bits and time
  (cd bench && timeout 150 python3 check_tile_tma.py) > "$OUT/tile_tma.log" 2>&1; echo "check_tile_tma rc=$?"
  grep -E "M=1 |M=64 |Error|error" "$OUT/tile_tma.log" | tail -14; stamp tiletma
fi
if [[ $PARTS == *,ab,* ]]; then
  IFS=';' read -ra variants <<< "${VARIANTS:-before;now}"
  for variant in "${variants[@]}"; do run_variant "$variant"; done
fi
if [[ $PARTS == *,w1,* ]]; then
  IFS=';' read -ra variants <<< "${W1_VARIANTS:-before;now}"
  for variant in "${variants[@]}"; do run_w1 "$variant"; done
fi
if [[ $PARTS == *,det,* ]]; then
  timeout 150 python3 bench/check_determinism.py > "$OUT/determinism.log" 2>&1; echo "check_determinism rc=$?"
  grep -v -i warn "$OUT/determinism.log" | tail -14; stamp determinism
fi
if [[ $PARTS == *,vl,* ]]; then
  timeout 120 python3 bench/check_vl_gpu.py > "$OUT/check_vl.log" 2>&1; echo "check_vl rc=$?"
  grep -E "tokens|OK|FAIL|Error|error" "$OUT/check_vl.log" | tail -10; stamp check_vl
fi
