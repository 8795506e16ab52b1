"""What a trial reports besides its loss: train_flops, trial_seconds, periodic eval records.

Resume: tests/test_pipeline_lambda.py (flops and seconds across a preemption); run_trial's
``metrics``: tests/test_pipeline.py::test_run_trial_writes_result_json."""

from __future__ import annotations

import json

import pytest
from test_pipeline import _cfg

from training.api import run_pipeline


def _tiny_shape(overrides):
    kv = dict(o.split("=", 1) for o in overrides if o.startswith("model.tiny."))
    return int(kv["model.tiny.num_layers"]), int(kv["model.tiny.hidden_size"]), int(kv["model.tiny.intermediate_size"])


def test_train_flops_follow_the_documented_formula(tiny_overrides, tmp_path):
    result = run_pipeline(_cfg(tiny_overrides, tmp_path, "stage1_9.max_steps=3", "stage2.max_steps=2",
                               "stage2.grad_accum=2"))
    assert result.status == "completed"
    layers, hidden, inter = _tiny_shape(tiny_overrides)
    n_t = result.params["teacher"]
    # The student is the teacher plus SubLN's two RMSNorms per layer (o_proj and down_proj inputs).
    assert result.params["student_trainable"] == n_t + layers * (hidden + inter)
    n_s = result.params["student_trainable"]
    tok19, tok2 = 3 * 4 * 64, 2 * 2 * 4 * 64  # steps x micro-batches x batch x seq_len
    assert (result.stages["stage1_9"].tokens, result.stages["stage2"].tokens) == (tok19, tok2)
    assert result.stages["stage1_9"].train_flops == 6 * n_s * tok19 + 2 * n_t * tok19
    assert result.stages["stage2"].train_flops == 6 * n_s * tok2
    assert result.train_flops == 6 * n_s * (tok19 + tok2) + 2 * n_t * tok19
    assert 0 < result.seconds <= result.trial_seconds


def test_eval_every_records_held_out_loss_at_lambda_1(tiny_overrides, tmp_path):
    # Stage 2's warmup (10 steps) never ends inside its 6 steps, yet the periodic eval is at lambda = 1:
    # its step-6 value is the final eval (same model, same batches, same lambda).
    result = run_pipeline(_cfg(tiny_overrides, tmp_path, "stage1_9.max_steps=4", "stage1_9.eval_every=2",
                               "stage2.max_steps=6", "stage2.eval_every=3", "stage2.lambda_warmup.warmup_steps=10"))
    assert [s for s, _ in result.stages["stage1_9"].eval_curve] == [2, 4]
    assert [s for s, _ in result.stages["stage2"].eval_curve] == [3, 6]
    assert result.stages["stage2"].eval_curve[-1][1] == pytest.approx(result.final_eval_loss, rel=1e-6)
    assert result.stages["stage1_9"].eval_curve[-1][1] == pytest.approx(result.stages["stage1_9"].eval_loss,
                                                                        rel=1e-6)
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r and r.get("stage") in ("stage1_9", "stage2")]
    assert [(r["stage"], r["step"], r["global_step"]) for r in evals] == [
        ("stage1_9", 2, 2), ("stage1_9", 4, 4), ("stage2", 3, 7), ("stage2", 6, 10)]
    for r in evals:
        assert "event" not in r and r["loss"] > 0 and r["eval_batch_sem"] > 0 and r["eval_seconds"] >= 0
    lam = [r["lambda"] for r in records if r.get("stage") == "stage2" and "lambda" in r]
    assert lam == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])  # training itself kept its lambda
