#!/usr/bin/env bash
# Install the project (with the dev extra) into .venv, then lint and run the whole test suite.
# Works on a fresh clone: the only prerequisite is Python >= 3.10 with venv.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
echo "== ruff"
"$VENV/bin/ruff" check sweep training tests scripts
echo "== pytest"
set +e
"$VENV/bin/python" -m pytest -q -rfE --durations=15 "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure for CI, not a pass.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
