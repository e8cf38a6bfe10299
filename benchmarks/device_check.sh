#!/usr/bin/env bash
# One device check of the paper profile's pieces (issue 13), at most ~8 minutes on a CUDA machine.
# Needs only the project's set-up (`make setup` or `pip install -e .`). Without CUDA it runs at
# reduced size on the CPU and says so (on a busy CPU pass a larger --budget-s). Arguments go to benchmarks/device_check.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/device_check.py "$@"  # stops starting parts after --budget-s (default 450 s)
