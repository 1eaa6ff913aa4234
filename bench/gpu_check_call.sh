#!/usr/bin/env bash
# One device call that validates kernel changes before the long benchmarks (carry build/h11wheels):
# mid-M GEMM tiles (TMA candidates included; written to kernels/linear_tiles.json and copied to $OUT),
# every Triton kernel against its torch reference at real sizes (bench/check_kernels.py), row
# invariance (bench/check_determinism.py: linear across M, in-kernel split sums vs two launches, fused SiLU, engine), float32 VL parity against transformers
# on the GPU (bench/check_vl_gpu.py), then the W2 kernel profile (deterministic).
source bench/gpu_env.sh
if [[ ${TUNE_MID:-1} == 1 ]]; then
  timeout 150 python3 bench/tune_linear.py --range mid --write-table > "$OUT/tune_mid.log" 2>&1; echo "tune rc=$?"
  grep -E "==|invariant" "$OUT/tune_mid.log" | head -30; cp kernels/linear_tiles.json "$OUT/"; stamp tune
fi
timeout 120 python3 bench/check_kernels.py > "$OUT/check_kernels.log" 2>&1; echo "check_kernels rc=$?"
grep -v -i warn "$OUT/check_kernels.log" | tail -30; stamp kernels
timeout 150 python3 bench/check_determinism.py > "$OUT/linear.log" 2>&1; echo "check_determinism rc=$?"
grep -v -i warn "$OUT/linear.log" | tail -30; stamp determinism
timeout 120 python3 bench/check_vl_gpu.py > "$OUT/check.log" 2>&1; echo "check_vl rc=$?"
grep -E "tokens|OK|FAIL|Error|error" "$OUT/check.log" | tail -10; stamp check_vl
timeout 90 python3 bench/profile_gpu.py --part w2 2>&1 | grep -v -i warn | head -16; stamp w2
