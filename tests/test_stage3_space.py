"""The Stage 3 search spaces: one learning-rate range per optimizer (a shared override in exclusive
branches), and the tiny space run end to end through the real worker and pipeline."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweep.space import SpaceError, load_space

ROOT = Path(__file__).resolve().parents[1]
LR = {"muon": "muon_lr", "adamw": "adamw_lr", "apollo": "apollo_lr"}


@pytest.mark.parametrize("name", ["stage3_bitdistill", "tiny_stage3"])
def test_each_optimizer_brings_its_own_learning_rate_range(name):
    space = load_space(ROOT / "search_spaces" / f"{name}.yaml")
    assert space.parameter("optimizer").domain == ("muon", "adamw", "apollo")
    base = {"lambda_logits": 10.0, "temperature": 5.0, "gamma": 1.0, "distill_layer": -1}
    for opt, lr_name in LR.items():
        p = space.parameter(lr_name)
        assert p.override == "stage3.optimizer.lr" and p.only_if.parent == "optimizer" and p.only_if.value == opt
        lr = (p.low * p.high) ** 0.5
        overrides = space.overrides({**base, "optimizer": opt, **{n: 1e-4 for n in LR.values()}, lr_name: lr})
        assert f"stage3.optimizer.name={opt}" in overrides
        assert [o for o in overrides if o.startswith("stage3.optimizer.lr=")] == [f"stage3.optimizer.lr={lr!r}"]
    # The ranges differ (Muon's matrix lr is far above AdamW's and APOLLO's).
    assert space.parameter("muon_lr").low > space.parameter("adamw_lr").low
    assert space.objective.metric in ("stage3_accuracy", "stage3_eval_loss")


def test_a_shared_override_is_refused_unless_the_branches_exclude_each_other():
    def space(extra):
        return {
            "name": "s", "objective": {"metric": "m", "goal": "minimize"}, "budget": {"trials": 4},
            "parameters": {"opt": {"type": "choice", "values": ["a", "b"], "override": "x.name"}, **extra},
        }  # fmt: skip

    ok = {"lr_a": {"type": "float", "low": 1e-3, "high": 1e-2, "override": "x.lr", "only_if": {"opt": "a"}},
          "lr_b": {"type": "float", "low": 1e-5, "high": 1e-4, "override": "x.lr", "only_if": {"opt": "b"}}}  # fmt: skip
    load_space(yaml.safe_dump(space(ok), sort_keys=False))
    same_branch = {**ok, "lr_b": {**ok["lr_b"], "only_if": {"opt": "a"}}}
    with pytest.raises(SpaceError, match=r"^parameters.lr_b.override: 'x.lr' is already set by parameter 'lr_a'$"):
        load_space(yaml.safe_dump(space(same_branch), sort_keys=False))
    unconditional = {**ok, "lr_b": {k: v for k, v in ok["lr_b"].items() if k != "only_if"}}
    with pytest.raises(SpaceError, match="already set by parameter 'lr_a'"):
        load_space(yaml.safe_dump(space(unconditional), sort_keys=False))


def _tiny_space_for_the_suite(tiny_overrides: list[str]) -> dict:
    """tiny_stage3.yaml at test size: the tiny test teacher, 3 steps, 2 trials; APOLLO only if installed."""
    raw = yaml.safe_load((ROOT / "search_spaces" / "tiny_stage3.yaml").read_text())
    base = dict(o.split("=", 1) for o in raw["base_overrides"])
    base.update(dict(o.split("=", 1) for o in tiny_overrides))
    base.update({"stage3.max_steps": "3", "stage3.batch_size": "4", "stage3.log_every": "1",
                 "stage3.data.eval_examples": "8", "run.checkpoint_every": "2"})  # fmt: skip
    raw["base_overrides"] = [f"{k}={v}" for k, v in base.items()]
    raw["budget"] = {"trials": 2, "sobol_trials": 2, "seed": 0}
    raw["trial"]["heartbeat_s"] = 5
    if importlib.util.find_spec("apollo_torch") is None:  # the shipped space offers it; this machine lacks it
        raw["parameters"]["optimizer"]["values"].remove("apollo")
        del raw["parameters"]["apollo_lr"]
    return raw


@pytest.mark.slow
def test_tiny_stage3_space_end_to_end_through_the_worker(tmp_path, tiny_overrides):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(_tiny_space_for_the_suite(tiny_overrides), sort_keys=False))
    store, sweep = tmp_path / "store", [sys.executable, "-m", "sweep.cli"]
    subprocess.run([*sweep, "init", "--space", str(space_file), "--store", str(store)], check=True, timeout=300)
    run = subprocess.run([*sweep, "run", "--store", str(store / "tiny_stage3"), "--workers", "1", "--workdir",
                          str(tmp_path / "work"), "--poll", "1"], capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = subprocess.run([*sweep, "report", "--store", str(store / "tiny_stage3"), "--out", str(tmp_path / "rep"), "--no-ax"],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    trials = json.loads((tmp_path / "rep" / "trials.json").read_text())
    assert len(trials) == 2 and {t["state"] for t in trials} == {"completed"}, trials
    for t in trials:
        assert t["stage3_eval_loss"] > 0  # the objective, from training.run_trial's metrics
        assert 0.0 <= t["metrics"]["stage3_accuracy"] <= 1.0
        opt = t["params"]["optimizer"]
        assert LR[opt] in t["params"] and not any(n in t["params"] for n in LR.values() if n != LR[opt])
    # Each trial really trained with its optimizer and learning rate (the trial's own result file).
    results = sorted((tmp_path / "work").rglob("result.json"))
    assert len(results) == 2
    for path in results:
        r = json.loads(path.read_text())
        assert r["status"] == "completed" and r["stages"]["stage3"]["steps"] == 3
        assert any(o.startswith("stage3.optimizer.name=") for o in r["overrides"])
