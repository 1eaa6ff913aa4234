#!/usr/bin/env bash
# Lint (ruff) and type check (mypy) of the product code: app, vision, engine, kernels. The rule
# sets and mypy settings are in pyproject.toml ([tool.ruff], [tool.mypy]). Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m ruff check app vision engine kernels
python -m mypy
