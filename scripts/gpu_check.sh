#!/usr/bin/env bash
# The one device check of issue 15 (scripts/gpu_check.py says what it measures): one table on stdout,
# the JSON at --json (default runs/gpu_check.json). Finishes inside GPU_CHECK_TIMEOUT seconds (480 by
# default: 8 minutes on one H200; the driver budgets 450 s and skips what does not fit).
#
#   scripts/gpu_check.sh                          # on the GPU machine
#   scripts/gpu_check.sh --json "$OUT/gpu_check.json"
#   scripts/gpu_check.sh --cpu-smoke --json /tmp/smoke.json   # tiny CPU shapes (tests/test_gpu_check.py)
#
# Python: $PYTHON, else this checkout's .venv, else python3 (a GPU image's, with the project's
# missing dependencies installed from wheels: docs/benchmarks.md, "Device check").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# gcsfs probes a gRPC endpoint for 60 s on import unless this is set.
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
export TOKENIZERS_PARALLELISM=false
export SWEEP_AX_LOG_LEVEL="${SWEEP_AX_LOG_LEVEL:-WARNING}"
exec timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT:-480}" "$PY" scripts/gpu_check.py "$@"
