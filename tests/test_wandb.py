"""Weights & Biases: offline runs in a temp dir carry the experiment as group, the trial and its
parameters as config and each stage as a tag; the worker wires it from the space; the API key
never reaches the store; without wandb there is one log line and nothing else."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from sweep.experiment import Experiment
from sweep.space import SpaceError, load_space
from sweep.store import open_store
from sweep.trial_tracking import TRIAL_ENV, redact, trial_env, wandb_overrides
from sweep.worker import Worker, WorkerOptions
from training.tracking import MetricsLogger, wandb_mode

SECRET = "wandb-secret-key-0123456789abcdef"


def run_records(run_dir: Path, timeout_s: float = 30.0) -> dict[str, Any]:
    """The last run record (name, group, tags, config) and history rows of an offline run file.

    wandb's service may still be writing the file when ``finish()`` returns: read it again until
    it holds the run's exit record.
    """
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        ds = datastore.DataStore()
        ds.open_for_scan(str(path))
        run, history, exited = None, [], False
        while (data := ds.scan_data()) is not None:
            rec = pb.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run = rec.run
            elif kind == "exit":
                exited = True
            elif kind == "history":
                history.append(
                    {
                        item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
                        for item in rec.history.item
                    }
                )
        if exited or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert run is not None, f"no run record in {path}"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    return {
        "group": run.run_group,
        "name": run.display_name,
        "project": run.project,
        "tags": list(run.tags),
        "config": config,
        "history": history,
    }


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def wandb_cfg(**kw: Any):
    base = {
        "enabled": True,
        "project": "bitnet-test",
        "entity": None,
        "group": "exp-a",
        "name": "trial-3",
        "mode": "auto",
        "tags": ["sweep", "Sobol"],
    }
    return OmegaConf.create({**base, **kw})


def test_offline_run_has_group_config_and_stage_tags(offline, monkeypatch):
    trial = {
        "experiment": "exp-a",
        "trial_index": 3,
        "attempt": 1,
        "phase": "Sobol",
        "params": {"stage2_lr": 0.002, "saliency": True},
    }
    monkeypatch.setenv(TRIAL_ENV, json.dumps(trial))
    out = offline / "trial"
    logger = MetricsLogger(out / "metrics.jsonl", wandb_cfg(), {"model": {"name": "tiny"}}, out)
    logger.log({"stage": "stage1_9", "step": 1, "global_step": 1, "loss": 2.5})
    logger.log({"stage": "stage2", "step": 1, "global_step": 2, "loss": 2.0})
    logger.log({"stage": "pipeline", "event": "completed", "final_eval_loss": 1.9})
    logger.finish()
    got = run_records(out)
    assert (got["group"], got["name"], got["project"]) == ("exp-a", "trial-3", "bitnet-test")
    assert got["tags"] == ["sweep", "Sobol", "stage1_9", "stage2"]
    assert got["config"]["trial_index"] == 3
    assert got["config"]["params"] == {"stage2_lr": 0.002, "saliency": True}
    assert got["config"]["sweep"]["experiment"] == "exp-a" and got["config"]["model"] == {"name": "tiny"}
    assert any(row.get("stage2/loss") == 2.0 for row in got["history"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in lines] == ["stage1_9", "stage2", "pipeline"]


def test_mode_is_offline_unless_an_api_key_is_set(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # an explicit W&B setting wins
    assert wandb_mode("auto") == "offline"
    assert wandb_mode("disabled") == "disabled"


def test_without_wandb_one_log_line_and_nothing_else(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with caplog.at_level(logging.DEBUG):
        logger = MetricsLogger(tmp_path / "m.jsonl", wandb_cfg(), {}, tmp_path)
        logger.log({"stage": "stage2", "step": 1, "loss": 1.0})
        logger.finish()
    assert [r.getMessage() for r in caplog.records] == [
        "wandb is not installed: W&B logging is off (pip install wandb to enable it)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


def test_disabled_wandb_starts_nothing(offline):
    logger = MetricsLogger(offline / "m.jsonl", wandb_cfg(enabled=False), {}, offline)
    logger.log({"stage": "stage2", "step": 1, "loss": 1.0})
    logger.finish()
    assert not list(offline.glob("**/*.wandb"))


SPACE = """
name: wb
objective: {metric: final_eval_loss, goal: minimize}
budget: {trials: 2, sobol_trials: 2}
base_overrides: [function=branin, steps=2]
parameters:
  x1: {type: float, low: -5, high: 10, override: x1}
  x2: {type: float, low: 0, high: 15, override: x2}
trial: {entrypoint: sweep.testing.synthetic_trial}
"""


def test_space_tracking_key_is_validated_and_off_by_default():
    assert load_space(SPACE).tracking.wandb is False
    space = load_space(SPACE + "tracking: {wandb: true, project: bitnet-runs, entity: my-team}\n")
    assert (space.tracking.wandb, space.tracking.project, space.tracking.entity) == (
        True,
        "bitnet-runs",
        "my-team",
    )
    assert load_space(space.to_yaml()) == space
    with pytest.raises(SpaceError, match=r"^tracking\.wandb: must be true or false, got 'yes'$"):
        load_space(SPACE + "tracking: {wandb: 'yes'}\n")
    with pytest.raises(
        SpaceError, match=r"^tracking: unknown key 'api_key'; allowed: wandb, project, entity$"
    ):
        load_space(SPACE + "tracking: {wandb: true, api_key: abc}\n")
    with pytest.raises(SpaceError, match=r"^tracking\.project: must start with a letter"):
        load_space(SPACE + "tracking: {project: 'my project'}\n")


def test_worker_adds_wandb_overrides_only_at_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    exp = Experiment.init(
        open_store(str(tmp_path)), load_space(SPACE + "tracking: {wandb: true, project: p1}\n")
    )
    claim = exp.claim("w").claim
    overrides = Worker(exp, "w")._tracking_overrides(claim)
    assert overrides == [
        "run.wandb.enabled=true",
        "run.wandb.project=p1",
        "run.wandb.group=wb",
        f"run.wandb.name=trial-{claim.trial_index}",
        "run.wandb.tags=[sweep,Sobol]",
    ]
    env = json.loads(trial_env("wb", claim, "w")[TRIAL_ENV])
    assert env["trial_index"] == claim.trial_index and env["params"] == claim.params
    stored = json.loads(exp.store.read(f"trials/{claim.trial_index}/claim.json")[0])
    assert not any("wandb" in o for o in stored["overrides"])
    assert wandb_overrides(load_space(SPACE), "wb", claim) == []


def test_worker_never_reports_the_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert redact({"log_tail": [f"key={SECRET}"], "n": 1}) == {"log_tail": ["key=***"], "n": 1}
    space = SPACE.replace("steps=2", "steps=2, crash=true") + "tracking: {wandb: true}\n"
    exp = Experiment.init(open_store(str(tmp_path / "store")), load_space(space))
    # The trial's Python echoes this setting (with the key in it) to stderr at startup, then the
    # trial crashes: its log tail, key included, goes into the result the worker reports.
    monkeypatch.setenv("PYTHONWARNINGS", f"ignore::NoSuchWarning{SECRET}")
    worker = Worker(exp, "w", WorkerOptions(poll_s=0.1, workdir=tmp_path / "work"))
    claim = exp.claim("w").claim
    outcome = worker.run_trial(claim)
    trial_log = (tmp_path / "work" / f"trial-{claim.trial_index}-a1" / "trial.log").read_text()
    assert SECRET in trial_log  # the local scratch log has it: the test would catch a leak
    exp.report_result(claim.trial_index, claim.attempt, outcome)
    assert outcome["status"] == "failed" and any("***" in line for line in outcome["log_tail"])
    for path in (tmp_path / "store").rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
