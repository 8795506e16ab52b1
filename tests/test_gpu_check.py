"""scripts/gpu_check.sh --cpu-smoke: the device check's every section on tiny CPU shapes (the numbers
mean nothing on a CPU; what is checked is that each code path runs and reports what it should)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # ~1.5 min on 2 idle cores: two trial processes, a sweep and a report


def test_cpu_smoke_runs_every_section_and_prints_one_table(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_TIMEOUT": "1500"}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--json", str(out), "--scratch",
         str(tmp_path / "scratch")],
        capture_output=True, text=True, timeout=1600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = [ln for ln in proc.stdout.splitlines() if ln.startswith("| section | variant |")]
    assert len(header) == 1  # one table
    data = json.loads(out.read_text())
    assert set(data["sections"]) == {"gemm", "train", "batch", "sweep"}
    rows = data["rows"]
    assert not [r for r in rows if str(r.get("note", "")).startswith("failed")], rows

    gemm = {r["variant"]: r for r in rows if r["section"] == "gemm"}
    assert len(gemm) == 4 * 11  # 4 projection shapes x (8 GEMM variants + 3 fwd+bwd steps)
    for name, r in gemm.items():
        assert r["ms"] > 0, name
    for shape in ("q 64->64", "down 128->64"):
        assert gemm[f"{shape} raw _int_mm"]["max_abs_err"] == 0.0  # integer sums exact
        # bf16 outputs round by 2^-9: every variant carries that; FP8's code rounding comes on top.
        assert gemm[f"{shape} bitlinear_int8"]["rel_err"] < 2.5e-3
        assert gemm[f"{shape} bitlinear_int8"]["rel_err"] < gemm[f"{shape} bitlinear_bf16"]["rel_err"]
        assert 5e-3 < gemm[f"{shape} bitlinear_fp8"]["rel_err"] < 4e-2

    train = {r["variant"]: r for r in rows if r["section"] == "train"}
    for stage in ("stage2", "stage1_9"):
        for prec in ("bf16-mixed", "bf16-pure"):
            assert train[f"{stage} {prec} eager"]["tokens_per_s"] > 0
    assert train["stage2 bf16-mixed compiled"]["tokens_per_s"] > 0  # dynamo captured the mixed student
    assert "mfu_pct" not in train["stage2 bf16-mixed eager"]  # no GPU peak on a CPU

    batch = [r for r in rows if r["section"] == "batch"]
    assert [r["micro_batch"] for r in batch] == [8, 8]  # the simulated OOM above 8

    assert data["sections"]["sweep"]["ok"], data["sections"]["sweep"]
    targets = [r for r in rows if r["section"] == "target"]
    assert len(targets) == 3 and all("measured" in r for r in targets)
