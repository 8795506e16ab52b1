# Sourced by test.sh / demo.sh: create or reuse .venv and install the project into it.
# torch is pinned to the local CPU build first, so the project's torch range never pulls a CUDA wheel.
VENV="${VENV:-$PWD/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "== installing (first run takes a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # The CPU build that ships on this machine kind; elsewhere pip resolves the range in pyproject.toml.
    "$VENV/bin/pip" install -q "torch==2.13.0" || "$VENV/bin/pip" install -q "torch>=2.5,<2.15"
  fi
  "$VENV/bin/pip" install -q -e ".[dev]"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# gcsfs probes a gRPC endpoint for 60 s on import unless this is set (measured here).
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
export TOKENIZERS_PARALLELISM=false
