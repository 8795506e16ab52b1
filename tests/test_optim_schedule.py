"""LR schedule shape: warmup, cosine/linear/constant, end values."""

import math

import pytest
import torch

from training.optim import OptimizerSpec, build_scheduler, lr_factor


def factors(schedule, total=7, warmup=2, min_ratio=0.1):
    return [
        lr_factor(s, total_steps=total, warmup_steps=warmup, schedule=schedule, min_lr_ratio=min_ratio)
        for s in range(total + 2)
    ]


def test_warmup_is_linear_without_a_zero_step():
    assert factors("constant", total=6, warmup=4)[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_cosine_shape_and_end_value():
    # W=2, total=7: decay spans steps 2..6 (4 intervals); progress 1/4 at step 3, 1/2 at step 4.
    f = factors("cosine")
    assert f[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert f[3] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f[4] == pytest.approx(0.55)
    assert f[6:] == pytest.approx([0.1, 0.1, 0.1])  # min at the last step, and held after


def test_linear_shape_and_end_value():
    f = factors("linear")
    assert f[2:] == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1, 0.1, 0.1])


def test_constant_after_warmup():
    assert factors("constant")[1:] == pytest.approx([1.0] * 8)


def test_no_warmup_single_step():
    assert lr_factor(0, total_steps=1, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0) == 1.0


def test_scheduler_on_a_real_optimizer_reaches_min_lr():
    param = torch.nn.Parameter(torch.zeros(3))
    spec = OptimizerSpec(name="adamw", lr=1e-3, warmup_steps=1, schedule="cosine", min_lr_ratio=0.2)
    opt = torch.optim.AdamW([param], lr=spec.lr)
    sched = build_scheduler(opt, spec, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # W=1, total=4: decay over steps 1..3, halfway (cos = 0) at step 2.
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3 * (0.2 + 0.8 * 0.5), 2e-4])


def test_scheduler_errors():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="total_steps=0"):
        build_scheduler(opt, OptimizerSpec(name="adamw", lr=1e-3), 0)
    with pytest.raises(ValueError, match="warmup_steps=5 exceeds total_steps=3"):
        build_scheduler(opt, OptimizerSpec(name="adamw", lr=1e-3, warmup_steps=5), 3)
