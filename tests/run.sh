#!/usr/bin/env bash
# The README's test command: install (torch pinned to the local build first), then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e '.[test]'
python -m pytest -q --durations=15 "$@"
