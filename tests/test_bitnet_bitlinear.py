"""BitLinear: lambda semantics, straight-through gradients, fast path vs reference, dtype handling."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.bitnet import BitLinear, LambdaController, activation_quant, bitlinear_modules, weight_quant
from training.bitnet.functional import bitlinear_forward, bitlinear_reference


def make_pair(seed=0, bias=True, lam=1.0):
    torch.manual_seed(seed)
    linear = nn.Linear(24, 16, bias=bias)
    ctrl = LambdaController(value=lam)
    return linear, BitLinear.from_linear(linear, lambda_ctrl=ctrl), ctrl


def f64_forward(x, w, b, lam):
    """Float64 reference of the BitLinear forward value: F.linear(lerp(x, Q(x)), lerp(w, Q(w)), b)."""
    x64, w64 = x.double(), w.double()
    s = 127.0 / x64.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = (x64 * s).round().clamp(-128, 127) / s
    scale = w64.abs().mean().clamp(min=1e-5)
    wq = (w64 / scale).round().clamp(-1, 1) * scale
    return F.linear(x64 + lam * (xq - x64), w64 + lam * (wq - w64), None if b is None else b.double())


def test_lambda_zero_is_exactly_nn_linear_including_gradients():
    linear, bit, _ = make_pair(lam=0.0)
    x = torch.randn(3, 5, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out_ref, out = linear(x), bit(x2)
    assert torch.equal(out, out_ref)
    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(linear.weight.grad, bit.weight.grad)
    assert torch.equal(linear.bias.grad, bit.bias.grad)


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.1])
def test_forward_matches_float64_reference(lam):
    _, bit, _ = make_pair(seed=1, lam=lam)
    x = torch.randn(4, 6, 24, generator=torch.Generator().manual_seed(2))
    out = bit(x)
    torch.testing.assert_close(out.double(), f64_forward(x, bit.weight, bit.bias, lam), rtol=1e-5, atol=1e-6)


def test_lambda_one_weights_have_exactly_three_values():
    _, bit, _ = make_pair(seed=3)
    w = bit.effective_weight()
    assert w.unique().numel() == 3
    assert torch.equal(w, weight_quant(bit.weight))


def test_intermediate_lambda_interpolates_weights():
    _, bit, ctrl = make_pair(seed=4, lam=0.3)
    w, wq = bit.weight.detach(), weight_quant(bit.weight.detach())
    torch.testing.assert_close(bit.effective_weight(), w + 0.3 * (wq - w))
    ctrl.set_value(1.0)
    assert torch.equal(bit.effective_weight(), wq)


@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_straight_through_gradient_of_weight_is_identity(lam):
    # With x = I and no activation quantisation, out = w_q^T, so d<out, G>/dw is G^T iff dw_q/dw = I.
    w = torch.randn(6, 6, requires_grad=True)
    g = torch.randn(6, 6)
    for impl in (bitlinear_forward, bitlinear_reference):
        w.grad = None
        out = impl(torch.eye(6), w, None, lam=lam, quantize_activations=False)
        out.backward(g)
        assert torch.equal(w.grad, g.t()), impl.__name__


@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_straight_through_gradient_of_input_is_identity(lam):
    # Gradient w.r.t. x is G @ w_q: the activation quantiser passes gradients unchanged.
    _, bit, _ = make_pair(seed=5, bias=False, lam=lam)
    x = torch.randn(8, 24, requires_grad=True)
    g = torch.randn(8, 16)
    bit(x).backward(g)
    torch.testing.assert_close(x.grad, g @ bit.effective_weight())


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.05])
@pytest.mark.parametrize("quantize_activations", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
def test_fast_path_matches_reference_values_and_gradients(lam, quantize_activations, with_mask):
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(16, 24, generator=gen).requires_grad_(True)
    b = torch.randn(16, generator=gen).requires_grad_(True)
    x = torch.randn(2, 5, 24, generator=gen).requires_grad_(True)
    protected = (torch.arange(24) % 5 == 0) if with_mask else None
    g = torch.randn(2, 5, 16, generator=gen)
    results = []
    for impl in (bitlinear_forward, bitlinear_reference):
        for t in (w, b, x):
            t.grad = None
        out = impl(x, w, b, lam=lam, quantize_activations=quantize_activations, protected=protected)
        out.backward(g)
        results.append((out.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone()))
    # The reference's ``w + lam * (q - w)`` and the fast path's lerp differ in the last bits only.
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_controller_is_shared_and_read_on_every_forward():
    linear, bit, ctrl = make_pair(seed=7)
    other = BitLinear.from_linear(linear, lambda_ctrl=ctrl)
    x = torch.randn(2, 24)
    quantised = bit(x)
    ctrl.set_value(0.0)
    assert torch.equal(bit(x), linear(x)) and torch.equal(other(x), linear(x))
    ctrl.set_value(1.0)
    assert torch.equal(bit(x), quantised)
    assert BitLinear(4, 4).lam == 1.0


def test_from_linear_copies_weights_dtype_and_flags():
    torch.manual_seed(8)
    linear = nn.Linear(8, 4, bias=False).double()
    linear.weight.requires_grad_(False)
    bit = BitLinear.from_linear(linear, quantize_activations=False)
    assert bit.weight.dtype == torch.float64 and bit.bias is None
    assert torch.equal(bit.weight, linear.weight) and bit.weight.data_ptr() != linear.weight.data_ptr()
    assert not bit.weight.requires_grad and not bit.quantize_activations
    assert set(bit.state_dict()) == set(linear.state_dict())


def test_shared_input_memo_is_invalidated_by_in_place_change():
    # q/k/v-style layers fed one tensor share a quantised copy; an in-place edit must not reuse it.
    _, a, _ = make_pair(seed=9)
    _, b, _ = make_pair(seed=10)
    x = torch.randn(3, 24)
    out_a = a(x)
    x.mul_(3.0).add_(1.0)
    assert torch.equal(b(x), F.linear(activation_quant(x), weight_quant(b.weight), b.bias))
    assert torch.equal(a(x), F.linear(activation_quant(x), weight_quant(a.weight), a.bias))
    assert not torch.equal(a(x), out_a)


def test_inference_mode_and_no_grad_forward():
    _, bit, _ = make_pair(seed=11)
    x = torch.randn(2, 24)
    with torch.no_grad():
        expected = bit(x)
    with torch.inference_mode():
        assert torch.equal(bit(x), expected)


def test_autocast_fast_path_equals_the_reference_and_gives_float32_gradients():
    """run.precision=bf16-mixed: float32 master weights, bf16 GEMMs. The custom Function quantises the
    float32 values and casts only the GEMM operands, which is what autocast does to the reference."""
    _, bit, _ = make_pair(seed=12)
    x = torch.randn(4, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bit(x)
        ref = bitlinear_reference(x, bit.weight, bit.bias, lam=1.0)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).bfloat16()
    fast_grads = torch.autograd.grad(out, (x, bit.weight, bit.bias), g)
    ref_grads = torch.autograd.grad(ref, (x, bit.weight, bit.bias), g)
    for fast, slow in zip(fast_grads, ref_grads):
        assert fast.dtype == torch.float32  # autograd casts the bf16 GEMM gradients to the parameters'
        assert torch.equal(fast, slow)


def test_bf16_training_smoke():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).bfloat16()
    ctrl = LambdaController(value=1.0)
    for i in (0, 2):
        model[i] = BitLinear.from_linear(model[i], lambda_ctrl=ctrl)
    assert len(list(bitlinear_modules(model))) == 2
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 32).bfloat16(), torch.randint(0, 8, (16,))
    before = copy.deepcopy(model.state_dict())
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(
            p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in model.parameters()
        )
        opt.step()
    assert model[0].weight.dtype == torch.bfloat16
    assert not torch.equal(before["0.weight"], model[0].weight)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"^lambda_ctrl must be a LambdaController or None, got float$"):
        BitLinear(4, 4, lambda_ctrl=0.5)
    with pytest.raises(ValueError, match=r"^eps must be > 0, got 0$"):
        BitLinear(4, 4, eps=0)
    with pytest.raises(ValueError, match=r"^from_linear expects an nn.Linear, got Conv1d$"):
        BitLinear.from_linear(nn.Conv1d(2, 2, 1))
