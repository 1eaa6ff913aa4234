#!/usr/bin/env bash
# One device call: Nsight Compute on the batch-1 decode step's kernels (bench/ncu_decode.py), the report
# and its details page in $OUT. Carry build/h11wheels. NCU_SET (default full) picks the sections.
source bench/gpu_env.sh
cd bench
timeout 400 ncu --clock-control none --set "${NCU_SET:-full}" -k regex:'_paged_attention_kernel|_linear_kernel' \
  --launch-skip 5 --launch-count 5 -f -o "$OUT/decode" python3 ncu_decode.py > "$OUT/ncu.log" 2>&1
echo "ncu rc=$?"; tail -5 "$OUT/ncu.log"
ncu -i "$OUT/decode.ncu-rep" --page details > "$OUT/details.txt" 2>&1
ncu -i "$OUT/decode.ncu-rep" --page source --csv --print-source sass > "$OUT/source.csv" 2>&1
gzip -f "$OUT/source.csv"
grep -E "^  [_a-z]|Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Memory Throughput|DRAM Throughput" \
  "$OUT/details.txt" | head -60
stamp ncu
