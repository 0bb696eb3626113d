#!/usr/bin/env bash
# headstart on a CUDA GPU, prepared: one markdown table (what | headstart | reference | ratio | notes) of
#   extraction images/s against the backbone's pure forward (Lite0 and resnet50; fp32, fp16 and bf16 autocast),
#   a head epoch on DoF features against a bare PyTorch loop, image training with mixed precision against 32-true,
#   ONNX Runtime's CUDA provider against PyTorch, stacked sweep jobs per minute against the basic launcher.
# Runs benchmarks/gpu.py (its docstring says how each row is measured) under an overall timeout of 8 minutes.
#
#   benchmarks/gpu.sh [gpu.py options, e.g. --root DIR --workers 16]
#   PYTHON=/path/to/python GPU_BENCH_LIMIT=480 benchmarks/gpu.sh
#
# Without a GPU: .venv/bin/python benchmarks/gpu.py --device cpu --quick   (every row on the CPU, tiny sizes)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
LIMIT="${GPU_BENCH_LIMIT:-480}"   # seconds for the whole run; gpu.py starts no row after LIMIT - 60

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu.sh: no NVIDIA GPU here (nvidia-smi is missing or sees none). For a CPU smoke run of every row:" >&2
  echo "  $PYTHON benchmarks/gpu.py --device cpu --quick" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,utilization.gpu --format=csv,noheader | sed 's/^/gpu: /'
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu.sh: $PYTHON's torch sees no CUDA device (a CPU-only build? torch.version.cuda is" \
    "$("$PYTHON" -c 'import torch; print(torch.version.cuda)'))" >&2
  exit 2
fi
# The tree this script lies in is what gets measured (its src/ first on the path, for train.py's subprocesses too).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# SIGINT first: rows printed so far stay on screen; then SIGKILL if it does not stop within 20 s.
timeout --signal=INT --kill-after=20 "$LIMIT" "$PYTHON" benchmarks/gpu.py --device cuda --budget $((LIMIT - 60)) "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu.sh: stopped after $LIMIT s (GPU_BENCH_LIMIT); the rows above are those that finished" >&2
exit $rc
