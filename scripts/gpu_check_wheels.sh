#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh needs on the device machine (Python 3.12, x86-64, no index
# there) into .whl/ (git-ignored), from scripts/gpu_check_wheels.txt. Run it here, where pip reaches PyPI;
# then carry .whl to the device (docs/benchmarks.md, "Device check", has the whole command).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64; do
  plat+=(--platform "$p")
done
grep -v '^#' scripts/gpu_check_wheels.txt | grep -v '^$' | while read -r req; do
  if ! $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${plat[@]}" -d .whl "$req" 2>/dev/null; then
    # A pure-Python sdist-only release: any wheel of it, or build one here (no compiled code).
    $PIP download -q --no-deps -d .whl "$req"
  fi
done
for sdist in .whl/*.tar.gz; do
  [ -e "$sdist" ] || continue
  $PIP wheel -q --no-deps -w .whl "$sdist" && rm -f "$sdist"
done
du -sh .whl
ls .whl
