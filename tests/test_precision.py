"""run.precision (training/precision.py): bf16-mixed keeps small updates that bf16-pure rounds away,
the dtypes each mode gives, bad names, and resuming a checkpoint under another mode."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from training.api import compose_config, run_pipeline
from training.bitnet import bitlinear_modules, convert_model_to_bitnet, insert_subln
from training.config import ConfigError
from training.precision import resolve_precision
from training.runtime import STOP
from training.stages.common import optimizer_for
from training.stages.compute_setup import setup_compute
from training.tracking import MetricsLogger

CPU = torch.device("cpu")


def _student_and_teacher(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    teacher = LlamaForCausalLM(config).eval()
    student = LlamaForCausalLM(config)
    student.load_state_dict(teacher.state_dict())
    insert_subln(student)
    convert_model_to_bitnet(student)
    return student.train(), teacher


def _train(precision: str, lr: float, steps: int = 3):
    """``steps`` AdamW steps on a tiny BitNet student prepared as run_pipeline prepares it."""
    cfg = compose_config([f"run.precision={precision}", "optimizer@stage2.optimizer=adamw",
                          f"stage2.optimizer.lr={lr}", "stage2.optimizer.schedule=constant"])  # fmt: skip
    student, teacher = _student_and_teacher()
    plan = resolve_precision(cfg.run.precision, CPU)
    setup_compute(cfg, student, teacher, CPU, plan)
    opt, _ = optimizer_for(cfg.stage2, student)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = student(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return student, teacher, opt, before


def _fraction_moved(student, before) -> float:
    """Share of BitLinear weight entries (every one gets a gradient) that changed."""
    moved = total = 0
    for name, p in student.named_parameters():
        if name.endswith("weight") and any(p is m.weight for m in bitlinear_modules(student)):
            moved += int((p.detach() != before[name]).sum())
            total += p.numel()
    return moved / total


def test_bf16_pure_rounds_small_updates_away_and_bf16_mixed_keeps_them():
    """lr 1e-6: an Adam step moves a weight by ~1e-6, under half a bf16 ulp of any weight above
    ~2.4e-4 in magnitude (init std 0.02), so a bf16 parameter does not change; the float32 master
    copy of bf16-mixed moves by that much."""
    pure, _, _, before_pure = _train("bf16-pure", lr=1e-6)
    mixed, _, _, before_mixed = _train("bf16-mixed", lr=1e-6)
    lost = _fraction_moved(pure, before_pure)
    kept = _fraction_moved(mixed, before_mixed)
    assert lost < 0.05, lost  # only the few weights within ~2.4e-4 of zero can move in bf16
    assert kept > 0.99, kept
    # The updates have Adam's size (about lr per step) in the master weights.
    q = next(m for m in bitlinear_modules(mixed))
    delta = (q.weight.detach() - before_mixed[next(n for n, p in mixed.named_parameters() if p is q.weight)]).abs()
    assert 1e-6 < delta.median().item() < 4e-6
    # At a normal lr both modes train (the mode matters for the small late-schedule updates).
    pure_hi, _, _, before_hi = _train("bf16-pure", lr=1e-3, steps=1)
    assert _fraction_moved(pure_hi, before_hi) > 0.9


def test_each_mode_gives_its_dtypes():
    mixed, teacher, opt, _ = _train("bf16-mixed", lr=1e-3, steps=1)
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    states = [v for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert states and {v.dtype for v in states} == {torch.float32}
    ids = torch.randint(0, 64, (2, 8))
    assert mixed(input_ids=ids).logits.dtype == torch.bfloat16  # autocast compute
    assert teacher(input_ids=ids).logits.dtype == torch.bfloat16
    pure, teacher_p, opt_p, _ = _train("bf16-pure", lr=1e-3, steps=1)
    assert {p.dtype for p in pure.parameters()} == {torch.bfloat16}
    assert {v.dtype for s in opt_p.state.values() for k, v in s.items() if k == "exp_avg"} == {torch.bfloat16}
    fp32, teacher32, _, _ = _train("fp32", lr=1e-3, steps=1)
    assert {p.dtype for p in fp32.parameters()} == {p.dtype for p in teacher32.parameters()} == {torch.float32}
    assert fp32(input_ids=ids).logits.dtype == torch.float32


def test_auto_is_fp32_on_cpu_with_one_line_and_bad_names_fail_in_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="training"):
        assert resolve_precision("auto", CPU).name == "fp32"
    assert [r.getMessage() for r in caplog.records] == [
        "run.precision=auto on cpu: training in fp32 (bf16-mixed is the CUDA default; bf16 matmul is "
        "~10x slower on CPUs)"
    ]
    assert resolve_precision("auto", torch.device("cuda")).name == "bf16-mixed"  # no GPU needed to decide
    with pytest.raises(ConfigError) as err:
        compose_config(["run.precision=bf16"])
    assert str(err.value) == "run.precision: got 'bf16', allowed: auto, bf16-mixed, bf16-pure, fp32"
    with pytest.raises(ValueError, match=r"^run.precision: got 'fp16', allowed: auto, bf16-mixed"):
        resolve_precision("fp16", CPU)


def _preempt_at(monkeypatch, stage: str, step: int) -> None:
    original = MetricsLogger.log

    def log(self, record):
        original(self, record)
        if record.get("stage") == stage and record.get("step") == step:
            STOP.request("SIGTERM")

    monkeypatch.setattr(MetricsLogger, "log", log)


@pytest.mark.parametrize(("first", "second"), [("bf16-pure", "bf16-mixed"), ("bf16-mixed", "bf16-pure")])
def test_a_checkpoint_resumes_under_another_precision(tiny_overrides, tmp_path, monkeypatch, caplog, first, second):
    common = [*tiny_overrides, f"run.out_dir={tmp_path}", "stage=stage2", "stage2.max_steps=2",
              "stage2.batch_size=2", "stage2.lambda_warmup.enabled=false", "data.eval_blocks=2",
              "data.eval_batch_size=2"]  # fmt: skip
    with monkeypatch.context() as m:
        _preempt_at(m, "stage2", 1)
        try:
            stopped = run_pipeline(compose_config([*common, f"run.precision={first}"]))
        finally:
            STOP.clear()
    assert stopped.status == "preempted"
    with caplog.at_level(logging.INFO, logger="training"):
        resumed = run_pipeline(compose_config([*common, f"run.precision={second}"]))
    assert resumed.status == "completed" and resumed.stages["stage2"].steps == 2
    saved = {"bf16-pure": torch.bfloat16, "bf16-mixed": torch.float32}[first]
    live = {"bf16-mixed": torch.float32, "bf16-pure": torch.bfloat16}[second]
    messages = [r.getMessage() for r in caplog.records]
    assert saved != live
    assert (
        f"resuming a {saved} checkpoint under run.precision={second}: weights and optimizer moments are "
        f"cast to {live}"
    ) in messages
    assert math.isfinite(resumed.final_eval_loss)
