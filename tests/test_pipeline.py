"""The Stage 1 -> 1.9 -> 2 pipeline on the tiny model, CPU, fp32."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from training.api import compose_config, run_pipeline, run_stage1_9
from training.runtime import STOP
from training.tracking import MetricsLogger


def _cfg(tiny_overrides, tmp_path, *extra):
    return compose_config([*tiny_overrides, f"run.out_dir={tmp_path}", *extra])


def test_pipeline_losses_fall_and_result_is_typed(tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides, tmp_path, "stage1_9.max_steps=12", "stage2.max_steps=12",
               "stage2.lambda_warmup.warmup_steps=4")
    result = run_pipeline(cfg)
    assert result.status == "completed"
    s19, s2 = result.stages["stage1_9"], result.stages["stage2"]
    assert s19.steps == 12 and s2.steps == 12
    first19, last19 = s19.curve[0][1], sum(v for _, v in s19.curve[-3:]) / 3
    first2, last2 = s2.curve[0][1], sum(v for _, v in s2.curve[-3:]) / 3
    assert last19 < first19, s19.curve
    assert last2 < first2, s2.curve
    assert result.final_eval_loss is not None and result.final_eval_loss_sem > 0
    assert result.tokens == (12 + 12) * 4 * 64
    assert result.conversion["layers_converted"] == 2 * 7
    # Only the final checkpoint survives a completed run.
    assert [c.rsplit("/", 1)[1] for c in result.checkpoints] == ["final.pt"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum(1 for ln in lines if json.loads(ln).get("stage") == "stage2") == 12


def _preempt_at(monkeypatch, stage: str, step: int) -> None:
    """Request a stop (as SIGTERM would) right after ``stage`` logs ``step``."""
    original = MetricsLogger.log

    def log(self, record):
        original(self, record)
        if record.get("stage") == stage and record.get("step") == step:
            STOP.request("SIGTERM")

    monkeypatch.setattr(MetricsLogger, "log", log)


@pytest.mark.parametrize(("stage", "step"), [("stage1_9", 3), ("stage2", 3)])
def test_resume_equals_uninterrupted_run(tiny_overrides, tmp_path, monkeypatch, stage, step):
    extra = ["stage1_9.max_steps=6", "stage2.max_steps=6", "stage2.lambda_warmup.warmup_steps=4",
             "stage1_9.saliency.enabled=true", "stage1_9.saliency.update_interval=2"]
    straight = run_pipeline(_cfg(tiny_overrides, tmp_path / "a", *extra))

    cfg_b = _cfg(tiny_overrides, tmp_path / "b", *extra)
    with monkeypatch.context() as m:
        _preempt_at(m, stage, step)
        try:
            first = run_pipeline(cfg_b)
        finally:
            STOP.clear()
    assert first.status == "preempted"
    assert first.reason == f"SIGTERM at {stage} step {step}"
    resumed = run_pipeline(cfg_b)
    assert resumed.status == "completed"
    # fp32 on CPU with restored RNG, data position, optimizer, scheduler, lambda and saliency state:
    # the resumed trajectory is the same computation, so the numbers agree to float precision.
    for name in ("stage1_9", "stage2"):
        a = [v for _, v in straight.stages[name].curve]
        b = [v for _, v in resumed.stages[name].curve]
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), name
    assert resumed.final_eval_loss == pytest.approx(straight.final_eval_loss, rel=1e-5)


def test_diverging_lr_is_a_result_not_a_crash(tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides, tmp_path, "stage1_9.max_steps=2", "stage2.max_steps=20",
               "optimizer@stage2.optimizer=adamw", "stage2.optimizer.lr=1e6", "stage2.grad_clip=0",
               "stage2.lambda_warmup.enabled=false")
    result = run_pipeline(cfg)
    assert result.status == "diverged"
    assert result.reason.startswith("diverged at stage2 step ")
    assert result.final_eval_loss is None


def test_run_stage1_9_alone(tiny_overrides, tmp_path):
    stage = run_stage1_9(_cfg(tiny_overrides, tmp_path, "stage1_9.max_steps=3"))
    assert stage.status == "completed" and stage.steps == 3 and stage.eval_loss is not None


def test_run_trial_writes_result_json(tiny_overrides, tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "training.run_trial", "--out", str(out), "--", *tiny_overrides,
           f"run.out_dir={tmp_path}", "stage1_9.max_steps=2", "stage2.max_steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["status"] == "completed"
    assert payload["final_eval_loss"] > 0 and payload["final_eval_loss_sem"] >= 0
    assert set(payload["stages"]) == {"stage1_9", "stage2"}
    # What the sweep can use as objectives (training/results.py); the eval-batch sem is a diagnostic.
    m = payload["metrics"]
    assert set(m) == {"final_eval_loss", "eval_batch_sem", "train_flops", "trial_seconds"}
    assert m["final_eval_loss"] == payload["final_eval_loss"]
    assert m["eval_batch_sem"] == payload["final_eval_loss_sem"]
    assert m["train_flops"] == payload["train_flops"] > 0 and m["trial_seconds"] > 0


def test_run_trial_bad_override_exits_2_with_one_line(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "training.run_trial", "--out", str(out), "--",
                           "stage2.optimizer.lrr=1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key 'stage2.optimizer.lrr' (misspelt? see " \
                                  "training/conf/schema.py for the allowed keys)"
    assert json.loads(out.read_text())["status"] == "failed"
