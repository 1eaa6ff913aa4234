#!/usr/bin/env bash
# One device call: bench/check_kernels.py (CHECK=0 skips), bench/tune_decode.py parts ($TUNE_PARTS,
# default attention,silu), then W2 and W1 (median of
# $W1_RUNS) for each attention launch in $LAUNCHES (';'-separated JSON objects written to
# kernels/attention_launch.json for the device, "-" = no table). Carry build/h11wheels.
source bench/gpu_env.sh
if [[ ${CHECK:-1} == 1 ]]; then
  timeout 150 python3 bench/check_kernels.py > "$OUT/check_kernels.log" 2>&1; echo "check_kernels rc=$?"
  grep -E "FAIL|linear|failure" "$OUT/check_kernels.log" | tail -6; stamp check
fi
if [[ -n ${TUNE_PARTS-attention,silu} ]]; then
  timeout 240 python3 bench/tune_decode.py --part ${TUNE_PARTS:-attention,silu} > "$OUT/tune2.log" 2>&1; echo "tune rc=$?"
  grep -E "compiled|AttentionLaunch|silu|rror" "$OUT/tune2.log" | head -40; stamp tune
fi
IFS=';' read -ra launches <<< "${LAUNCHES:--}"
i=0
for launch in "${launches[@]}"; do
  i=$((i + 1))
  if [[ $launch == - ]]; then rm -f kernels/attention_launch.json
  else python3 -c "import json,sys,torch; json.dump({torch.cuda.get_device_name(): json.loads(sys.argv[1])}, open('kernels/attention_launch.json','w'))" "$launch"; fi
  timeout 90 python3 bench/w2_latency.py --no-hf --runs 3 > "$OUT/w2_$i.log" 2>&1
  echo "[$i $launch] W2 $(grep -E 'engine ms/token' "$OUT/w2_$i.log")"
  timeout 150 python3 bench/w1_throughput.py --no-hf --runs ${W1_RUNS:-3} > "$OUT/w1_$i.log" 2>&1
  echo "[$i] W1 $(grep -E 'runs \(s\)|output tokens/s' "$OUT/w1_$i.log" | tr '\n' ' ')"; stamp "launch $i"
done
