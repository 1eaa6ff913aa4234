# Sourced by the device-call scripts that carry build/h11wheels: their Python packages in /tmp/site,
# the repo and those on PYTHONPATH, $OUT made, and `stamp NAME` printing the seconds since the start.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site build/h11wheels/*.whl
export PYTHONPATH=$(pwd):/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "[$1 done at $(( $(date +%s) - start )) s]"; }
