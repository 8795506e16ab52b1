"""Saliency curriculum: k schedule, EMA updates, protected columns, and lambda honoured by the layer."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.bitnet import (
    LambdaController,
    SaliencyBitLinear,
    SaliencyCurriculum,
    activation_quant,
    weight_quant,
)


def salient_layer(lam=1.0, k=0.0):
    """A layer whose input columns 3 and 7 have by far the largest L-inf norm."""
    torch.manual_seed(0)
    linear = nn.Linear(20, 12)
    with torch.no_grad():
        linear.weight[:, 3] *= 40.0
        linear.weight[:, 7] *= 20.0
    layer = SaliencyBitLinear.from_linear(linear, lambda_ctrl=LambdaController(value=lam))
    layer.protect_k = k
    return linear, layer


def test_k_schedule_linear_and_cosine():
    lin = SaliencyCurriculum(0.2, 0.0, total_steps=110, warmup_steps=10, schedule="linear")
    assert [lin.k(s) for s in (0, 10, 60, 110, 500)] == pytest.approx([0.2, 0.2, 0.1, 0.0, 0.0])
    cos = SaliencyCurriculum(0.1, 0.02, total_steps=100, schedule="cosine")
    assert cos.k(0) == 0.1 and cos.k(100) == 0.02
    assert cos.k(50) == pytest.approx(0.06)
    assert cos.k(25) == pytest.approx(0.02 + 0.08 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_protected_columns_are_the_most_salient_and_stay_full_precision():
    _, layer = salient_layer(k=0.1)  # floor(0.1 * 20) = 2 columns
    assert layer.num_protected == 2
    mask = layer.protected_columns()
    assert mask.nonzero().flatten().tolist() == [3, 7]
    w_eff = layer.effective_weight()
    assert torch.equal(w_eff[:, mask], layer.weight[:, mask].detach())
    assert w_eff[:, ~mask].unique().numel() == 3
    layer.protect_k = 0.0
    assert layer.protected_columns() is None
    assert torch.equal(layer.effective_weight(), weight_quant(layer.weight.detach()))


def test_lambda_zero_is_exactly_nn_linear_with_protection_on():
    linear, layer = salient_layer(lam=0.0, k=0.2)
    x = torch.randn(4, 20)
    assert torch.equal(layer(x), linear(x))


def test_lambda_is_honoured_by_the_saliency_layer():
    # The seed code's SaliencyAwareBitLinear ignored lambda; here lambda = 0.5 must interpolate.
    _, layer = salient_layer(lam=0.5, k=0.1)
    x = torch.randn(3, 20)
    mask = layer.protected_columns()
    w = layer.weight.detach()
    free = w[:, ~mask]
    scale = free.abs().mean()
    wq = w.clone()
    wq[:, ~mask] = (free / scale).round().clamp(-1, 1) * scale
    expected = F.linear(x + 0.5 * (activation_quant(x) - x), w + 0.5 * (wq - w), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    full = layer.lambda_ctrl
    full.set_value(1.0)
    assert not torch.allclose(layer(x), expected)


def test_curriculum_step_updates_ema_every_interval_and_sets_k():
    _, layer = salient_layer()
    model = nn.Sequential(layer)
    cur = SaliencyCurriculum(0.1, 0.0, total_steps=100, ema_decay=0.9, update_interval=5)
    start = layer.saliency_ema.clone()
    assert torch.equal(start, layer.weight.detach().abs().amax(0))
    with torch.no_grad():
        layer.weight[:, 0] = 100.0
    assert cur.step(model, 0) == pytest.approx(0.1)
    assert layer.protect_k == pytest.approx(0.1)
    after_update = start.clone()
    after_update[0] = 0.9 * start[0] + 0.1 * 100.0
    torch.testing.assert_close(layer.saliency_ema, after_update)
    cur.step(model, 3)  # 3 % 5 != 0: no EMA update, k still set
    torch.testing.assert_close(layer.saliency_ema, after_update)
    assert layer.protect_k == pytest.approx(cur.k(3))
    cur.step(model, 5)
    assert layer.saliency_ema[0] == pytest.approx(0.9 * after_update[0].item() + 10.0)
    assert cur.last_step == 5


def test_curriculum_step_requires_saliency_layers():
    cur = SaliencyCurriculum(total_steps=10)
    with pytest.raises(
        ValueError, match=r"^SaliencyCurriculum.step: Sequential has no SaliencyBitLinear layers"
    ):
        cur.step(nn.Sequential(nn.Linear(2, 2)), 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_k": 1.5}, r"^initial_k must be in \[0, 1\], got 1.5$"),
        ({"final_k": -0.1}, r"^final_k must be in \[0, 1\], got -0.1$"),
        ({"ema_decay": 1.0}, r"^ema_decay must be in \(0, 1\), got 1.0$"),
        ({"ema_decay": 0}, r"^ema_decay must be in \(0, 1\), got 0$"),
        ({"update_interval": 0}, r"^update_interval must be an integer >= 1, got 0$"),
        ({"schedule": "step"}, r"^schedule must be one of \('linear', 'cosine'\), got 'step'$"),
        ({"warmup_steps": 20}, r"^total_steps must be >= warmup_steps \(20\), got 10$"),
        ({"total_steps": 0}, r"^total_steps must be an integer >= 1, got 0$"),
    ],
)
def test_curriculum_rejects_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SaliencyCurriculum(**({"total_steps": 10} | kwargs))


def test_protect_k_outside_unit_interval_is_rejected():
    _, layer = salient_layer()
    with pytest.raises(ValueError) as err:
        layer.protect_k = 1.5
    assert str(err.value) == "protect_k must be in [0, 1], got 1.5"


def test_curriculum_state_dict_round_trip():
    cur = SaliencyCurriculum(0.15, 0.01, total_steps=300, warmup_steps=50, schedule="linear", ema_decay=0.95)
    cur.step(nn.Sequential(salient_layer()[1]), 10)
    resumed = SaliencyCurriculum(total_steps=1)
    resumed.load_state_dict(cur.state_dict())
    assert resumed.state_dict() == cur.state_dict()
    assert resumed.k(175) == cur.k(175) and resumed.last_step == 10


def test_saliency_ema_is_checkpointed_with_the_model():
    _, layer = salient_layer()
    with torch.no_grad():
        layer.saliency_ema.fill_(2.0)
    fresh = SaliencyBitLinear(20, 12)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.saliency_ema, torch.full((20,), 2.0))
