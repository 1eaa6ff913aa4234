#!/usr/bin/env bash
# Device calls for the acceptance runs of issues 17/18/19 and the batch-invariant GEMM tile sweeps (issue 14).
#   bash bench/gpu_acceptance.sh tune,structured,beam      (carry build/h11wheels build/sowheels build/tools)
#   bash bench/gpu_acceptance.sh start,beamspy,qwen3        (carry build/h11wheels build/tools)
# Full logs go to $OUT/<part>.log; the tuned table (kernels/linear_tiles.json) is copied to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
wheels=$(ls build/h11wheels/*.whl build/sowheels/*.whl build/tools/*.whl 2>/dev/null)   # one call: --target skips dirs that exist
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels
export PYTHONPATH=$(pwd):/tmp/site PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
start=$(date +%s)
stamp() { echo "[$1 done at $(( $(date +%s) - start )) s]"; }
run() {  # name timeout command...: full log to $OUT/name.log, filtered tail to stdout
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "== $name rc=$?"
  grep -v -i "warn\|it/s\]" "$OUT/$name.log" | grep -v "^\s*$" | tail -${TAIL:-24}; stamp "$name"
}
parts=",$1,"
if [[ $parts == *,tune,* ]]; then
  TAIL=40 run tune_large 170 python3 bench/tune_linear.py --range large --write-table
  TAIL=40 run tune_mid 150 python3 bench/tune_linear.py --range mid --write-table
  cp kernels/linear_tiles.json "$OUT/"
fi
[[ $parts == *,structured,* ]] && run structured 200 python3 bench/structured_outputs.py --runs 2
[[ $parts == *,beam,* ]] && run beam 170 python3 bench/beam_search.py --runs 3
if [[ $parts == *,start,* ]]; then   # start-up phases and Triton compiles, deterministic (py-spy) and not
  run start_det 90 py-spy record -r 100 -f raw -o "$OUT/start_det.pyspy" -- python3 bench/start_profile.py
  run start_nondet 60 python3 bench/start_profile.py --no-deterministic
fi
if [[ $parts == *,beamspy,* ]]; then   # where a width-4 beam step goes (host), 20 prompts for the throughput part
  run beam_spy 120 py-spy record -r 200 -f raw -o "$OUT/beam.pyspy" -- python3 bench/beam_search.py --runs 2 --prompts 20
fi
if [[ $parts == *,qwen3,* ]]; then
  run q3_det 170 python3 bench/run_all.py --model qwen3_vl_8b --parts det --runs 3
  run q3_hf 110 python3 bench/run_all.py --model qwen3_vl_8b --parts hf
  run q3_w3 90 python3 bench/run_all.py --model qwen3_vl_8b --parts w3
  run q3_fp32 80 python3 bench/check_vl_gpu.py --models qwen3_vl
  run q3_bf16 80 python3 bench/check_vl_gpu.py --models qwen3_vl --dtype bfloat16 --scale bf16 --first-tokens 4 --atol 5e-2
  cp bench/results/run_all_*.json "$OUT/" 2>/dev/null
fi
stamp all
