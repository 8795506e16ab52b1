"""search_spaces/tiny_pareto.yaml end to end on the real tiny pipeline: its two objectives (final eval
loss, train FLOPs) and its Stage 1.9 length parameter, shrunk to 4 short trials on the small test
teacher, through ``sweep init`` / ``sweep run --workers 2`` / ``sweep report``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_cli import sweep
from test_report_support import stored_results

from sweep.pareto import pareto_optimal
from sweep.space import load_space
from sweep.store import open_store

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def shrunk_tiny_pareto(tiny_overrides: list[str]) -> dict:
    """tiny_pareto.yaml with the test teacher, 4 trials, Stage 1.9 for 1..6 steps and 4 of Stage 2."""
    doc = yaml.safe_load((REPO / "search_spaces" / "tiny_pareto.yaml").read_text())
    keep = {"model", "data"}  # the space's choice of model and data; sizes and steps come from here
    base = [o for o in doc["base_overrides"] if o.split("=", 1)[0] in keep]
    doc["base_overrides"] = [*base, *tiny_overrides, "stage2.max_steps=4", "stage2.lambda_warmup.warmup_steps=2"]
    doc["budget"] = {"trials": 4, "sobol_trials": 3, "seed": 0}
    doc["parameters"]["stage1_9_steps"].update(low=1, high=6)
    doc["trial"] = {"max_attempts": 2, "heartbeat_s": 5, "grace_s": 300}
    return doc


def test_tiny_pareto_sweep_on_the_real_pipeline(tmp_path, tiny_overrides):
    doc = shrunk_tiny_pareto(tiny_overrides)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    space = load_space(tmp_path / "space.yaml")
    assert space.ax_objective == "-final_eval_loss, -train_flops"
    assert sweep("init", "--space", "space.yaml", "--store", "sweeps", cwd=tmp_path, timeout_s=120).rc == 0
    run = sweep("run", "--store", "sweeps/tiny_pareto", "--workers", "2", "--poll", "1", "--workdir", "work",
                cwd=tmp_path, timeout_s=1500)
    assert run.rc == 0, run.out[-3000:] + run.err[-3000:]

    results = stored_results(open_store(str(tmp_path / "sweeps" / "tiny_pareto")))
    done = {i: r for i, r in results.items() if r["status"] == "completed"}
    assert len(done) == 4, {i: (r["status"], r.get("reason")) for i, r in results.items()}
    for r in done.values():
        steps = next(int(o.split("=")[1]) for o in r["overrides"] if o.startswith("stage1_9.max_steps="))
        # The pipeline's own FLOP estimate (training/compute.py) and measured time, per trial.
        assert r["metrics"]["train_flops"] > 0 and r["metrics"]["trial_seconds"] > 0
        assert r["stages"]["stage1_9"]["steps"] == steps  # the searched length is what ran
    by_steps = sorted(done.values(), key=lambda r: r["stages"]["stage1_9"]["steps"])
    flops = [r["metrics"]["train_flops"] for r in by_steps]
    assert flops == sorted(flops)  # more Stage 1.9 steps, more compute (Stage 2 is fixed)

    rep = sweep("report", "--store", "sweeps/tiny_pareto", "--out", "rep", "--no-ax", cwd=tmp_path, timeout_s=300)
    assert rep.rc == 0, rep.err[-2000:]
    order = sorted(done)
    points = [(done[i]["metrics"]["final_eval_loss"], done[i]["metrics"]["train_flops"]) for i in order]
    front = {order[k] for k in pareto_optimal(points, [True, True])}
    listed = json.loads((tmp_path / "rep" / "pareto.json").read_text())
    assert {t["trial"] for t in listed} == front
    assert all(t["command"].startswith("python scripts/train.py model=tiny data=builtin ") for t in listed)
    assert (tmp_path / "rep" / "pareto_front.png").is_file()
    assert "Pareto front (final_eval_loss vs train_flops)" in rep.out
