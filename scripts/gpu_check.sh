#!/usr/bin/env bash
# The device check for a GPU machine: the pipeline with SmolLM2 from the wheel on one GPU and the
# official vLLM (<= 8 min), each stage's time, vLLM against transformers tokens/s, the weight-sync time.
#   scripts/gpu_check.sh            # GPU
#   scripts/gpu_check.sh --dry      # CPU, tiny model, seconds (tests/bench/test_gpu.py runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
mkdir -p bench/out
exec "$PY" bench/gpu.py "$@" 2>&1 | tee "bench/out/gpu_check$([[ " $* " == *" --dry "* ]] && echo -dry).log"
