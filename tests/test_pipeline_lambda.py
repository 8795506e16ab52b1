"""stage1_9.lambda_warmup and stage2.lambda_start on the tiny pipeline (CPU, fp32)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_pipeline import _cfg, _preempt_at

from training.api import run_pipeline
from training.config import ConfigError
from training.runtime import STOP


def _lambdas(path, stage):
    return [r["lambda"] for r in map(json.loads, path.read_text().splitlines())
            if r.get("stage") == stage and "lambda" in r]


@pytest.mark.parametrize("mode", ["restart", "continue"])
def test_stage2_lambda_start_resumes_exactly_after_preemption(tiny_overrides, tmp_path, monkeypatch, mode):
    extra = ["stage1_9.max_steps=6", "stage2.max_steps=6", "stage1_9.lambda_warmup.enabled=true",
             "stage1_9.lambda_warmup.warmup_steps=4", "stage2.lambda_warmup.warmup_steps=4",
             f"stage2.lambda_start={mode}", "stage2.eval_every=2"]
    straight = run_pipeline(_cfg(tiny_overrides, tmp_path / "a", *extra))
    assert straight.status == "completed"
    # Stage 1.9 warms lambda 0 -> 1 over 4 steps; Stage 2 restarts at 0 or continues at Stage 1.9's end (1).
    assert _lambdas(tmp_path / "a" / "metrics.jsonl", "stage1_9") == pytest.approx([0, .25, .5, .75, 1, 1])
    s2_expected = [0, .25, .5, .75, 1, 1] if mode == "restart" else [1.0] * 6
    assert _lambdas(tmp_path / "a" / "metrics.jsonl", "stage2") == pytest.approx(s2_expected)

    cfg_b = _cfg(tiny_overrides, tmp_path / "b", *extra)
    with monkeypatch.context() as m:
        _preempt_at(m, "stage2", 3)
        try:
            first = run_pipeline(cfg_b)
        finally:
            STOP.clear()
    assert first.status == "preempted" and first.reason == "SIGTERM at stage2 step 3"
    resumed = run_pipeline(cfg_b)
    assert resumed.status == "completed"
    for name in ("stage1_9", "stage2"):
        a = [v for _, v in straight.stages[name].curve]
        b = [v for _, v in resumed.stages[name].curve]
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), name
    ea = [v for _, v in straight.stages["stage2"].eval_curve]
    eb = [v for _, v in resumed.stages["stage2"].eval_curve]
    assert [s for s, _ in resumed.stages["stage2"].eval_curve] == [2, 4, 6]
    assert eb == pytest.approx(ea, rel=1e-5)
    assert resumed.final_eval_loss == pytest.approx(straight.final_eval_loss, rel=1e-5)
    # The resumed attempt logged steps 4..6 at the lambdas the straight run had there.
    assert _lambdas(tmp_path / "b" / "metrics.jsonl", "stage2")[-3:] == pytest.approx(s2_expected[-3:])
    # Compute is deterministic and counted once; the seconds include the first attempt's up to its checkpoint.
    assert first.train_flops > 0 and resumed.train_flops == straight.train_flops
    assert resumed.trial_seconds > resumed.seconds


def test_stage1_9_warmup_longer_than_the_stage_is_a_config_error(tiny_overrides, tmp_path):
    bad = ["stage1_9.max_steps=10", "stage1_9.lambda_warmup.enabled=true", "stage1_9.lambda_warmup.warmup_steps=11"]
    with pytest.raises(ConfigError, match=r"^stage1_9\.lambda_warmup\.warmup_steps: 11 is larger than "
                                          r"stage1_9\.max_steps=10"):
        _cfg(tiny_overrides, tmp_path, *bad)
    _cfg(tiny_overrides, tmp_path, *bad[:2], "stage1_9.lambda_warmup.warmup_steps=10")  # equal is fine
    _cfg(tiny_overrides, tmp_path, *bad[::2])  # a disabled warmup is not checked
    with pytest.raises(ConfigError, match=r"^stage2\.lambda_start: got 'resume', allowed: restart, continue"):
        _cfg(tiny_overrides, tmp_path, "stage2.lambda_start=resume")


def test_run_trial_exits_2_on_a_stage1_9_warmup_past_max_steps(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "training.run_trial", "--out", str(out), "--",
                           "stage1_9.max_steps=50", "stage1_9.lambda_warmup.enabled=true",
                           "stage1_9.lambda_warmup.warmup_steps=100"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stage1_9.lambda_warmup.warmup_steps: 100 is larger")
    assert json.loads(out.read_text())["status"] == "failed"
