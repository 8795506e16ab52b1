"""Quantiser numerics against float64 references written out here from the BitNet b1.58 definitions."""

import pytest
import torch

from training.bitnet import activation_quant, ternarize, weight_quant
from training.bitnet.quant import weight_quant_protected


def weight_quant_f64(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    w = w.double()
    scale = w.abs().mean().clamp(min=eps)
    return (w / scale).round().clamp(-1, 1) * scale


def activation_quant_f64(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.double()
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    return (x * s).round().clamp(-128, 127) / s


@pytest.mark.parametrize("shape", [(16, 32), (96, 64), (3, 5)])
def test_weight_quant_matches_float64_reference(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = weight_quant(w)
    assert out.dtype == w.dtype and out.shape == w.shape
    # fp32 vs fp64 differ only in the last bits of the scale (no rounding decision flips for this seed).
    torch.testing.assert_close(out.double(), weight_quant_f64(w), rtol=1e-6, atol=1e-7)


def test_weight_quant_has_three_levels_and_ternarize_agrees():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    out = weight_quant(w)
    codes, scale = ternarize(w)
    assert codes.dtype == torch.int8
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    assert torch.equal(out, codes.float() * scale)
    assert torch.equal(out.unique(), torch.stack([-scale, torch.zeros(()), scale]))
    assert scale.item() == pytest.approx(w.abs().mean().item(), rel=1e-6)


def test_weight_quant_eps_floor_keeps_zero_weights_finite():
    out = weight_quant(torch.zeros(4, 4))
    assert torch.equal(out, torch.zeros(4, 4))
    codes, scale = ternarize(torch.zeros(4, 4), eps=1e-3)
    assert scale.item() == pytest.approx(1e-3) and not codes.any()


def test_activation_quant_matches_float64_reference_per_token():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 40, generator=gen) * torch.tensor([0.1, 10.0]).view(2, 1, 1)
    out = activation_quant(x)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), activation_quant_f64(x), rtol=1e-6, atol=1e-7)
    # Per token: each row maps to at most 256 integer levels of its own scale, with the max hitting 127.
    s = 127.0 / x.abs().amax(-1, keepdim=True)
    levels = out * s
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert torch.allclose(levels.abs().amax(-1), torch.full((2, 7), 127.0), atol=1e-4)


def test_activation_quant_zero_token_stays_zero():
    x = torch.zeros(3, 8)
    x[1] = torch.linspace(-1, 1, 8)
    out = activation_quant(x)
    assert torch.equal(out[0], torch.zeros(8)) and torch.equal(out[2], torch.zeros(8))


def test_bf16_quantisers_compute_in_float32_and_return_bf16():
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(4)).bfloat16()
    assert weight_quant(w).dtype == torch.bfloat16 and activation_quant(x).dtype == torch.bfloat16
    assert torch.equal(weight_quant(w), weight_quant(w.float()).bfloat16())
    assert torch.equal(activation_quant(x), activation_quant(x.float()).bfloat16())


def test_protected_columns_stay_full_precision_and_scale_ignores_them():
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    w[:, 2] *= 50.0
    protected = torch.zeros(8, dtype=torch.bool)
    protected[2] = True
    out = weight_quant_protected(w, protected)
    assert torch.equal(out[:, 2], w[:, 2])
    rest = w[:, ~protected]
    scale = rest.abs().mean()
    expected = (rest / scale).round().clamp(-1, 1) * scale
    torch.testing.assert_close(out[:, ~protected], expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(weight_quant_protected(w, None), weight_quant(w))
    assert torch.equal(weight_quant_protected(w, torch.ones(8, dtype=torch.bool)), w)
