"""The tiny end-to-end sweep with the real pipeline: space -> store -> 2 local workers -> report."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_tiny_sweep_with_the_real_pipeline(tmp_path, tiny_overrides):
    space = {
        "name": "e2e",
        "objective": {"metric": "final_eval_loss", "goal": "minimize"},
        "budget": {"trials": 4, "sobol_trials": 2, "seed": 0},
        "base_overrides": [*tiny_overrides, "stage1_9.max_steps=4", "stage2.max_steps=4",
                           "stage2.lambda_warmup.warmup_steps=2"],
        "parameters": {
            "stage1_9_lr": {"type": "float", "low": 1e-3, "high": 8e-3, "log": True,
                            "override": "stage1_9.optimizer.lr"},
            "stage2_lr": {"type": "float", "low": 1e-3, "high": 8e-3, "log": True,
                          "override": "stage2.optimizer.lr"},
            "saliency": {"type": "bool", "override": "stage1_9.saliency.enabled"},
            "initial_k": {"type": "choice", "values": [0.05, 0.1], "ordered": True,
                          "override": "stage1_9.saliency.initial_k", "only_if": {"saliency": True}},
        },
        "trial": {"max_attempts": 2, "heartbeat_s": 5, "grace_s": 120},
    }
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    store = tmp_path / "store"
    sweep = [sys.executable, "-m", "sweep.cli"]
    subprocess.run([*sweep, "init", "--space", str(space_file), "--store", str(store)], check=True, timeout=120)
    run = subprocess.run([*sweep, "run", "--store", str(store / "e2e"), "--workers", "2", "--workdir",
                          str(tmp_path / "work"), "--poll", "1"], capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "best configuration" in run.stdout
    report = subprocess.run([*sweep, "report", "--store", str(store / "e2e"), "--out", str(tmp_path / "rep")],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "rep" / "trials.csv").open()))
    assert len(rows) == 4
    assert {r["state"] for r in rows} == {"completed"}
    losses = [float(r["final_eval_loss"]) for r in rows]
    best = json.loads((tmp_path / "rep" / "best.json").read_text())
    assert best["loss"] == pytest.approx(min(losses))
    assert best["command"].startswith("python scripts/train.py model.tiny.vocab_size=512 ")
    assert f"stage2.optimizer.lr={best['params']['stage2_lr']!r}" in best["command"]
    # The report page and its plots, referencing nothing but files beside it.
    rep = tmp_path / "rep"
    for name in ("report.html", "best_so_far.png", "loss_vs_parameters.png", "curves_stage1_9.png",
                 "curves_stage2.png"):
        assert (rep / name).is_file(), name
    page = (rep / "report.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert "curves_stage2.png" in refs and "trials.csv" in refs
    for ref in refs:
        assert "://" not in ref and not ref.startswith("/") and (rep / ref).is_file(), ref
