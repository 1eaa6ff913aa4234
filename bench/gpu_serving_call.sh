#!/usr/bin/env bash
# One device call for issue 14 (carry build/h11wheels build/w4wheels build/tools): the float32 VL parity
# check on the GPU (CUDA graphs, mixed steps included), W4-VL served at 1/16/64 clients (vlserve bench serve,
# deterministic default; py-spy of the server 10 s into the 64-client level), W2 + W1 (median of 5) +
# determinism, then --no-deterministic: W4-VL at 64 clients and W1 (median of 3). PARTS selects
# (default check,w4,det,nondet; NONDET_W4=0 skips the served half of nondet; w4pen: W4-VL at 1 and 64
# clients with repetition_penalty 1.05 from the generation config, as Qwen's published configs set it;
# also tune (large-M GEMM tiles, first), ab (small-M fusion choices,
# bench/fusion_ab.py), hf (transformers baselines), structured, beam).
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls build/h11wheels/*.whl build/tools/*.whl build/sowheels/*.whl build/lgwheels/*.whl 2>/dev/null)
source bench/install_w4_packages.sh
export PYTHONPATH=$(pwd):/tmp/site PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; PARTS=",${PARTS:-check,w4,det,nondet},"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
stamp() { echo "[$1 done at $(( $(date +%s) - start )) s]"; }
if [[ $PARTS == *,tune,* ]]; then   # large-M tiles first: the benchmarks below read the table it writes
  timeout 80 python3 bench/tune_linear.py --range large --write-table > "$OUT/tune_large.log" 2>&1; echo "tune rc=$?"
  grep -E "==|invariant" "$OUT/tune_large.log" | head -16; cp kernels/linear_tiles.json "$OUT/"; stamp tune
fi
if [[ $PARTS == *,ab,* ]]; then   # small-M fusion choices (bench/fusion_ab.py) before anything is timed
  PYTHONPATH=$PYTHONPATH:$(pwd)/bench timeout 150 python3 bench/fusion_ab.py --write-table > "$OUT/fusion_ab.log" 2>&1
  echo "ab rc=$?"; grep -E "==|wrote" "$OUT/fusion_ab.log"; cp kernels/linear_tiles.json "$OUT/"; stamp ab
fi
if [[ $PARTS == *,check,* ]]; then
  timeout 100 python3 bench/check_vl_gpu.py > "$OUT/check.log" 2>&1; echo "check rc=$?"
  grep -E "tokens|OK|FAIL|Error|error" "$OUT/check.log" | tail -8; stamp check
fi
[[ $PARTS == *,structured,* ]] && { timeout 150 python3 bench/structured_outputs.py --runs ${STRUCT_RUNS:-2} > "$OUT/structured.log" 2>&1; tail -14 "$OUT/structured.log"; stamp structured; }
if [[ $PARTS == *,w4,* ]]; then
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 250 > "$OUT/gpu_util_w4.txt" &
  smi=$!
  (sleep 55; mkdir -p /tmp/pyspy; for pid in $(pgrep -f "spawn_main|-m app"); do
     py-spy record -d 10 -r 50 -f raw -o /tmp/pyspy/pid_$pid.txt --pid $pid >/dev/null 2>&1 &
   done; wait; ps -eo pid,args | grep -E "spawn_main|-m app" > /tmp/pyspy/ps.txt
   tar czf "$OUT/pyspy.tgz" /tmp/pyspy 2>/dev/null) &
  timeout 200 python3 bench/w4_serving.py --levels 1,16,64 --min-prompts 32 > "$OUT/w4_det.log" 2>&1
  grep -v -i "warn\|INFO\|it/s\]" "$OUT/w4_det.log" | tail -16
  kill $smi 2>/dev/null; cp bench/results/w4_serving.json "$OUT/w4_det.json" 2>/dev/null; stamp "W4 det"
fi
if [[ $PARTS == *,w4pen,* ]]; then   # the repetition penalty Qwen's generation configs give every request
  timeout 120 python3 bench/w4_serving.py --levels 1,64 --min-prompts 32 \
    --server-args "--load-format dummy --max-model-len 8000 --gpu-memory-utilization 0.9 --override-generation-config {\"repetition_penalty\":1.05}" \
    > "$OUT/w4_penalty.log" 2>&1
  grep -v -i "warn\|INFO\|it/s\]" "$OUT/w4_penalty.log" | tail -10; stamp "W4 penalty"
fi
[[ $PARTS == *,beam,* ]] && { timeout 120 python3 bench/beam_search.py --runs 3 > "$OUT/beam.log" 2>&1; tail -10 "$OUT/beam.log"; stamp beam; }
if [[ $PARTS == *,det,* ]]; then
  timeout 150 python3 bench/run_all.py --parts det --runs ${DET_RUNS:-5} > "$OUT/det.log" 2>&1
  grep -v -i "warn" "$OUT/det.log" | grep -E "W1|W2|stage|determinism|start|median|runs|output tokens|graphs" | head -30
  stamp det
fi
if [[ $PARTS == *,nondet,* && ${NONDET_W4:-1} == 1 ]]; then
  timeout 90 python3 bench/w4_serving.py --levels 64 --min-prompts 32 \
    --server-args "--load-format dummy --max-model-len 8000 --gpu-memory-utilization 0.9 --no-deterministic" \
    > "$OUT/w4_nondet.log" 2>&1
  grep -v -i "warn\|INFO\|it/s\]" "$OUT/w4_nondet.log" | tail -6; stamp "W4 nondet"
fi
if [[ $PARTS == *,nondet,* ]]; then
  timeout 90 python3 bench/run_all.py --parts nondet --runs $(( 2 * ${NONDET_RUNS:-3} )) > "$OUT/nondet.log" 2>&1
  grep -E "W1 out|median|runs \(s\)|start" "$OUT/nondet.log" | head -6; stamp nondet
fi
if [[ $PARTS == *,hf,* ]]; then
  timeout 80 python3 bench/run_all.py --parts hf > "$OUT/hf.log" 2>&1; grep -v -i warn "$OUT/hf.log" | tail -4; stamp hf
fi
cp bench/results/*.json "$OUT/" 2>/dev/null
stamp all
