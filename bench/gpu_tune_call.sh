#!/usr/bin/env bash
# One device call for the decode-path tuning (carry build/h11wheels): W2 with today's table, then
# bench/tune_decode.py (cold-memory sweep of the small-M linear, swapped product included, and of paged
# attention's launch; winners bit-checked, linear winners written to kernels/linear_tiles.json, copied to
# $OUT), then the W2 profile with the new table (bench/profile_gpu.py --part w2).
source bench/gpu_env.sh
PARTS=",${PARTS:-w2old,tune,w2new},"
if [[ $PARTS == *,w2old,* ]]; then
  timeout 90 python3 bench/w2_latency.py --no-hf --runs 3 > "$OUT/w2_old.log" 2>&1
  echo "W2 today's table: $(grep -E 'engine ms/token' "$OUT/w2_old.log")"; stamp w2old
fi
if [[ $PARTS == *,tune,* ]]; then
  timeout ${TUNE_TIMEOUT:-330} python3 bench/tune_decode.py --part ${TUNE_PARTS:-linear,attention} --write-table \
    > "$OUT/tune.log" 2>&1; echo "tune rc=$?"
  grep -E "^==|invariant=|compiled|wrote|Error|error" "$OUT/tune.log" | grep -v "invariant=False" | head -50
  grep -E "split ==" "$OUT/tune.log" | sort -t' ' -k1,1 | head -40
  cp kernels/linear_tiles.json "$OUT/"; stamp tune
fi
if [[ $PARTS == *,w2new,* ]]; then
  timeout 120 python3 bench/profile_gpu.py --part w2 > "$OUT/w2_new.log" 2>&1
  grep -E "W2 \[|us/step|compiles" "$OUT/w2_new.log" | head -24; stamp w2new
fi
