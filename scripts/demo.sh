#!/usr/bin/env bash
# The main job, offline, on the embedded default: a tiny BitNet sweep (Sobol then BoTorch) run by
# two local workers against a local-directory store, then the report with the best recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
STORE="${DEMO_STORE:-./sweeps}"
NAME="${DEMO_NAME:-tiny_cpu-demo-$(date +%Y%m%d-%H%M%S)}"
echo "== building the tiny teacher (once; cached afterwards)"
python -m training.models --build-tiny
echo "== sweep init"
sweep init --space search_spaces/tiny_cpu.yaml --store "$STORE" --name "$NAME"
echo "== sweep run (2 local workers)"
sweep run --store "$STORE/$NAME" --workers 2 --workdir "$STORE/.workers/$NAME"
echo "== sweep report"
sweep report --store "$STORE/$NAME" --out "$STORE/$NAME-report"
