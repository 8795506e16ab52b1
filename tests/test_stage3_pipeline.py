"""Stage 3 in the pipeline: the CLI command, running after Stage 2, resume, the stage selector."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.api import compose_config, run_pipeline, run_stage3
from training.data.tasks import write_task_jsonl
from training.runtime import STOP
from training.stages.pipeline import stages_to_run
from training.tracking import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]


def _curve(metrics: Path, stage: str) -> list[dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r for r in rows if r.get("stage") == stage and "loss" in r and "event" not in r]


def test_stage_selector():
    assert stages_to_run(compose_config([])) == ["stage1_9", "stage2"]
    assert stages_to_run(compose_config(["stage3=classification"])) == ["stage1_9", "stage2", "stage3"]
    assert stages_to_run(compose_config(["stage=stage3"])) == ["stage3"]  # whatever stage3.enabled says
    assert stages_to_run(compose_config(["stage=stage2", "stage2.max_steps=0"])) == []
    cfg = compose_config(["stage=stage3", "stage3=summarization"])
    assert cfg.stage3.data.task == "summarization" and cfg.stage3.loss.distill_layer == -1
    assert cfg.stage3.loss.use_relation_distill is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage=stage4", "stage: got 'stage4', allowed: pipeline, stage1_9, stage2, stage3"),
        ("stage3.data.task=qa", "stage3.data.task: got 'qa', allowed: lm, classification, summarization"),
        ("stage3.loss.temperature=0", "stage3.loss.temperature: must be > 0, got 0"),
        ("stage3.loss.attention_weight=-1", "stage3.loss.attention_weight: must be >= 0, got -1"),
        ("stage3.loss.gamma=1", "unknown config key 'stage3.loss.gamma'"),
        ("stage3.auto_batch_size=maybe", "stage3.auto_batch_size: got 'maybe', allowed: auto, true, false"),
    ],
)
def test_bad_stage3_overrides_give_one_line(override, message):
    from training.config import ConfigError

    with pytest.raises(ConfigError) as err:
        compose_config(["stage3=classification", override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^stage3.data.prompt: 'Topic:' needs an \{input\} placeholder$"):
        compose_config(["stage3=classification", "stage3.data.prompt=Topic:"])


@pytest.mark.slow
def test_train_cli_stage3_classification_runs_offline_and_loss_falls(tiny_overrides, tmp_path):
    """The issue's command, on the tiny test spec: Stage 1 conversion, then Stage 3 on the built-in
    labelled task (paragraph -> part of the Python reference); CE + KD + relation loss falls."""
    cmd = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "model=tiny", "stage=stage3", "stage3=classification",
        *tiny_overrides, f"run.out_dir={tmp_path}", "stage3.max_steps=12", "stage3.batch_size=8",
        "stage3.optimizer.lr=3e-3", "stage3.log_every=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "classification task, 940 train / 64 eval examples" in proc.stdout
    summary = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    assert summary["status"] == "completed" and set(summary["stages"]) == {"stage3"}
    assert summary["stages"]["stage3"]["eval_loss"] > 0
    rows = _curve(tmp_path / "metrics.jsonl", "stage3")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(r["kd"] > 0 and r["attn"] > 0 and r["ce"] > 0 for r in rows)
    loss = [r["loss"] for r in rows]
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.2, loss
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (final,) = [r for r in records if r.get("stage") == "stage3" and r.get("event") == "eval"]
    assert final["eval_loss"] == pytest.approx(summary["stages"]["stage3"]["eval_loss"])
    assert 0.0 <= final["accuracy"] <= 1.0 and 0.25 < final["majority_rate"] < 1.0


@pytest.mark.slow
def test_stage3_runs_after_stage2_with_its_own_data_and_eval(tiny_overrides, tmp_path):
    data = tmp_path / "summ.jsonl"
    write_task_jsonl("summarization", data)
    cfg = compose_config([
        *tiny_overrides, f"run.out_dir={tmp_path / 'run'}", "stage3=summarization", f"stage3.data.path={data}",
        "stage1_9.max_steps=2", "stage2.max_steps=2", "stage2.lambda_warmup.warmup_steps=1",
        "stage3.max_steps=3", "stage3.batch_size=4", "stage3.log_every=1", "stage3.data.eval_examples=8",
    ])  # fmt: skip
    result = run_pipeline(cfg)
    assert result.status == "completed", result.reason
    assert list(result.stages) == ["stage1_9", "stage2", "stage3"]
    s2, s3 = result.stages["stage2"], result.stages["stage3"]
    # Stage 2's eval is taken before Stage 3 changes the model; Stage 3's is on the task's held-out answers.
    assert s2.eval_loss is not None and s3.eval_loss is not None and s3.eval_loss != result.final_eval_loss
    assert s3.steps == 3 and s3.tokens == 3 * 4 * 64
    rows = _curve(tmp_path / "run" / "metrics.jsonl", "stage3")
    assert [r["global_step"] for r in rows] == [5, 6, 7]
    assert [c.rsplit("/", 1)[1] for c in result.checkpoints] == ["final.pt"]


@pytest.mark.slow
def test_stage3_resume_equals_uninterrupted_run(tiny_overrides, tmp_path, monkeypatch):
    extra = [*tiny_overrides, "stage3=classification", "stage3.max_steps=4", "stage3.batch_size=4",
             "stage3.log_every=1", "run.checkpoint_every=2"]  # fmt: skip
    straight = run_stage3(compose_config([*extra, f"run.out_dir={tmp_path / 'a'}"]))
    cfg_b = compose_config([*extra, f"run.out_dir={tmp_path / 'b'}", "stage=stage3"])
    original = MetricsLogger.log

    def log(self, record):
        original(self, record)
        if record.get("stage") == "stage3" and record.get("step") == 2:
            STOP.request("SIGTERM")

    with monkeypatch.context() as m:
        m.setattr(MetricsLogger, "log", log)
        try:
            first = run_pipeline(cfg_b)
        finally:
            STOP.clear()
    assert first.status == "preempted" and first.reason == "SIGTERM at stage3 step 2"
    resumed = run_pipeline(cfg_b)
    assert resumed.status == "completed"
    a = [v for _, v in straight.curve]
    b = [v for _, v in resumed.stages["stage3"].curve]
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert resumed.stages["stage3"].eval_loss == pytest.approx(straight.eval_loss, rel=1e-5)


def test_stage3_init_checkpoint_loads_a_student_and_names_mismatches(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.checkpoint import CheckpointManager
    from training.stages.stage3 import load_init_checkpoint

    def model(layers):
        config = LlamaConfig(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
        )
        return LlamaForCausalLM(config)

    trained = model(2)
    CheckpointManager(str(tmp_path / "ckpt")).save("final", {"stage": "final", "model": trained.state_dict()})
    fresh = model(2)
    load_init_checkpoint(fresh, str(tmp_path / "ckpt" / "final.pt"))
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(
        ValueError, match=r"^stage3.init_checkpoint: .*final.pt' does not match this student \(Error"
    ):
        load_init_checkpoint(model(1), str(tmp_path / "ckpt" / "final.pt"))
    with pytest.raises(ValueError, match=r"^stage3.init_checkpoint: 'x/final' is not a .pt checkpoint file"):
        load_init_checkpoint(fresh, "x/final")
