"""Early stopping and W&B on the real tiny pipeline: a worker runs `training.run_trial` for a trial
that is clearly worse than the completed ones, Ax stops it during stage 2, the SIGTERM path of
the trainer ends it, and it is recorded as early-stopped with its last loss; its offline W&B run
carries the experiment as group, the trial as config and both stages as tags; the API key, set
in the environment, is nowhere in the store."""

from __future__ import annotations

import json

import pytest
import yaml
from test_report_support import curve
from test_wandb import run_records

from sweep.early_stopping import stage_curve
from sweep.experiment import Experiment
from sweep.ledger import Ledger
from sweep.space import load_space
from sweep.store import open_store
from sweep.worker import Worker, WorkerOptions

pytestmark = pytest.mark.slow

SECRET = "wandb-e2e-secret-0123456789abcdef"
STAGE2_STEPS = 300


def test_real_trial_is_early_stopped_and_tracked(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)  # would mean online; WANDB_MODE keeps the test offline
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    space = load_space(
        yaml.safe_dump(
            {
                "name": "es-real",
                "objective": {"metric": "final_eval_loss", "goal": "minimize"},
                "budget": {"trials": 4, "sobol_trials": 4, "seed": 0},
                "base_overrides": [
                    *tiny_overrides,
                    "stage1_9.max_steps=2",
                    f"stage2.max_steps={STAGE2_STEPS}",
                    "stage2.lambda_warmup.warmup_steps=5",
                    "run.device=cpu",
                ],
                "parameters": {
                    "stage2_lr": {
                        "type": "float",
                        "low": 1e-3,
                        "high": 8e-3,
                        "log": True,
                        "override": "stage2.optimizer.lr",
                    },
                },
                "trial": {"max_attempts": 1, "heartbeat_s": 1, "grace_s": 600},
                "early_stopping": {"percentile": 50, "min_progression": 4, "min_curves": 3},
                "tracking": {"wandb": True, "project": "bitnet-e2e"},
            }
        )
    )
    exp = Experiment.init(open_store(str(tmp_path / "store")), space)
    for k in range(3):  # three finished trials whose stage-2 loss was far lower all along
        claim = exp.claim("planter").claim
        exp.heartbeat(claim.trial_index, 1, curve("stage2", STAGE2_STEPS, 0.05 + k / 100, 0.01 + k / 100))
        exp.report_result(claim.trial_index, 1, {"status": "completed", "final_eval_loss": 0.5 + k / 10})

    work = tmp_path / "work"
    summary = Worker(exp, "w-real", WorkerOptions(max_trials=1, poll_s=0.2, workdir=work)).run()
    assert (summary.trials_run, summary.early_stopped) == (1, 1), summary

    result = json.loads(exp.store.read("trials/3/result-1.json")[0])
    assert result["status"] == "early_stopped", result.get("reason")
    step = result["metrics"]["stopped_at_step"]
    assert 4 <= step < STAGE2_STEPS
    uploaded = stage_curve(exp.progress(3))
    assert uploaded[-1] == (step, pytest.approx(result["metrics"]["last_loss"]))
    # Ax sees the last loss moved onto the objective's scale: worse than every completed trial here.
    offset = result["metrics"]["objective_offset"]
    assert 0.4 < offset < 0.7  # planted: objectives 0.5-0.7 over losses 0.01-0.05
    assert result["metrics"]["final_eval_loss"] == pytest.approx(result["metrics"]["last_loss"] + offset)
    assert result["metrics"]["final_eval_loss"] > 0.7
    exp.ingest()
    record = Ledger.from_snapshot(json.loads(exp.store.read("experiment.json")[0])).trials[3]
    assert record.state == "early_stopped"

    run = run_records(work / "trial-3-a1")
    assert (run["group"], run["name"], run["project"]) == ("es-real", "trial-3", "bitnet-e2e")
    assert run["config"]["trial_index"] == 3
    assert run["config"]["params"] == record.params
    assert {"sweep", "Sobol", "stage1_9", "stage2"} <= set(run["tags"])
    # Nowhere in the store, nor in the worker's scratch: trial log, metrics, W&B's own logs and run.
    for path in [*(tmp_path / "store").rglob("*"), *work.rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
