#!/usr/bin/env bash
# Download, on this machine (package registries reachable), the wheels that bench/run_gpu.sh installs on
# the device machine, whose image (Python 3.12, torch 2.11, triton, transformers, pillow) lacks them:
#   build/h11wheels  av, msgspec, transformers 5.23 (the version the CPU suite pins) -> /tmp/site
#   build/w4wheels   litestar, uvicorn, httpx, prometheus_client, swagger-ui-bundle and their dependencies (W4),
#                    installed with --find-links so only what the image lacks is added.
#   build/sowheels   llguidance, xgrammar, apache-tvm-ffi (structured outputs; bench/structured_outputs.py)
# Both fit the device tool's 64 MiB carry together (~55 MiB): carry ["build/h11wheels", "build/w4wheels"].
# Usage (repo root):  bash bench/fetch_gpu_wheels.sh
set -euo pipefail
platform=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux2014_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
mkdir -p build/h11wheels build/w4wheels build/sowheels
pip download -q --no-deps -d build/h11wheels "${platform[@]}" av msgspec "transformers==5.23.*"
pip download -q -d build/w4wheels "${platform[@]}" litestar uvicorn httpx prometheus_client swagger-ui-bundle
pip download -q --no-deps -d build/sowheels "${platform[@]}" llguidance xgrammar apache-tvm-ffi
du -sh build/h11wheels build/w4wheels build/sowheels
