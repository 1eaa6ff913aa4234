#!/usr/bin/env bash
# The served load's packages from build/w4wheels (carried): sourced by the device-call scripts that start
# `vlserve serve` (bench/gpu_serving_call.sh, bench/gpu_fusion_call.sh with W4=1).
python3 -m pip install -q --no-index --find-links build/w4wheels litestar uvicorn httpx prometheus_client swagger-ui-bundle 2>/dev/null \
  || python3 -m pip install -q --break-system-packages --no-index --find-links build/w4wheels litestar uvicorn httpx prometheus_client swagger-ui-bundle
