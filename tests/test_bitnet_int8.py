"""The exact int8 GEMM of BitLinear (training/bitnet/int8.py, model.gemm=int8), checked on CPU.

CPU torch 2.13 runs ``torch._int_mm`` for any shape (no M > 16 or multiple-of-8 rule there), so the
integer accumulation is compared bit for bit with an int64 matmul of the same codes, and the layer's
forward with the same rescale of that integer product. CUDA's shape rules (row padding) are exercised
only by the CUDA test at the end, which says why it cannot run here.
"""

from __future__ import annotations

import logging

import pytest
import torch

from training.bitnet import BitLinear, LambdaController
from training.bitnet.fp8 import activation_codes, reference_linear, weight_codes
from training.bitnet.functional import bitlinear_forward
from training.bitnet.gemm import CodeGemm, configure_gemm, enable_code_gemm
from training.bitnet.int8 import int8_accumulate, int8_mm_codes, int8_reference, int8_unavailable_reason

F32_U = 2.0**-24


def _data(rows=48, k=128, n=96, seed=0, outliers=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    if outliers:
        x[:, :4] *= 30.0
    return x.reshape(2, rows // 2, k), torch.randn(n, k, generator=g) * 0.02


@pytest.mark.parametrize(("m", "k", "n"), [(48, 128, 96), (3, 20, 7), (17, 576, 192), (1, 8, 8)])
def test_int_mm_accumulates_the_codes_exactly(m, k, n):
    g = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(-128, 128, (m, k), generator=g).float()
    a[0, :] = -128.0  # the extremes of the int8 range
    t = torch.randint(-1, 2, (n, k), generator=g).float()
    acc = int8_accumulate(a, t)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), a.long() @ t.long().t())


@pytest.mark.parametrize("outliers", [False, True])
def test_int8_bitlinear_forward_is_the_integer_computation(outliers):
    x, w = _data(outliers=outliers)
    layer = BitLinear(128, 96, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    assert enable_code_gemm(layer, CodeGemm("int8")) == (1, 1)
    y = layer(x)
    a, s_x = activation_codes(x)
    t, s_w = weight_codes(w)
    inv = s_x.reshape(-1, 1).reciprocal()
    oracle = int8_reference(a.reshape(-1, 128), inv, t, s_w).reshape(2, 24, 96)
    assert torch.equal(y, oracle)  # bit for bit: same integers, same float32 rescale
    assert torch.equal(int8_mm_codes(a.reshape(-1, 128), inv, t, s_w).reshape(2, 24, 96), oracle)
    # Against the real-number product (float64): only the float32 rescale's roundings remain, where
    # the regular float32 path also rounds K products and sums.
    exact = (a.double() / s_x.double()) @ (t.double() * s_w.double()).t()
    mag = (a.abs().double() / s_x.double()) @ (t.abs().double() * s_w.double()).t()
    assert torch.all((y.double() - exact).abs() <= 4 * F32_U * exact.abs() + 1e-12)
    regular = reference_linear(x, w).double()
    assert torch.all((regular - exact).abs() <= 2 * 128 * F32_U * mag)  # the bound the int path beats


def test_int8_backward_is_the_straight_through_backward():
    torch.manual_seed(0)
    plain, fast = BitLinear(128, 96), BitLinear(128, 96)
    fast.load_state_dict(plain.state_dict())
    enable_code_gemm(fast, CodeGemm("int8"))
    x, _ = _data()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), fast(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)  # float32: the two differ by roundings
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(2))
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(plain.weight.grad, fast.weight.grad)
    assert torch.equal(plain.bias.grad, fast.bias.grad)


def test_int8_under_autocast_gives_bf16_outputs_and_float32_gradients():
    torch.manual_seed(1)
    layer = BitLinear(64, 32)
    enable_code_gemm(layer, CodeGemm("int8"))
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    a, s_x = activation_codes(x.detach())
    t, s_w = weight_codes(layer.weight)
    expected = (int8_reference(a, s_x.reciprocal(), t, s_w).bfloat16() + layer.bias.bfloat16())
    assert torch.equal(y, expected)
    y.float().sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float32
    assert torch.isfinite(layer.weight.grad).all()


def test_regular_path_where_operands_are_not_on_the_grid_or_sizes_do_not_fit():
    lam = LambdaController(value=0.5)
    layer = BitLinear(64, 32, lambda_ctrl=lam)
    enable_code_gemm(layer, CodeGemm("int8"))
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), bitlinear_forward(x, layer.weight, layer.bias, lam=0.5))
    odd = torch.nn.Sequential(BitLinear(64, 32), BitLinear(60, 20))
    assert enable_code_gemm(odd, CodeGemm("int8")) == (1, 2)  # CUDA's _int_mm needs K, N % 8 == 0
    assert odd[1].gemm is None


def test_configure_gemm_int8_explicit_on_cpu_and_auto_falls_back_with_one_line(caplog):
    cpu = torch.device("cpu")
    assert int8_unavailable_reason(cpu) is None  # CPU torch runs _int_mm
    model = torch.nn.Sequential(BitLinear(64, 48))
    assert configure_gemm(model, "int8", cpu) == "int8" and model[0].gemm == CodeGemm("int8")
    with caplog.at_level(logging.INFO, logger="training"):
        assert configure_gemm(model, "auto", cpu) == "bf16"
    assert model[0].gemm is None
    assert [r.getMessage() for r in caplog.records] == [
        "model.gemm=auto on cpu: BitLinear uses the regular matmul (the exact int8 GEMM is chosen on CUDA "
        "only; torch._int_mm on CPU is ~20x slower than float32)"
    ]
    with pytest.raises(ValueError, match=r"^model.gemm: got 'int4', allowed: auto, bf16, int8, fp8$"):
        configure_gemm(model, "int4", cpu)


def test_int8_refuses_where_the_device_has_no_int_mm(monkeypatch):
    import training.bitnet.gemm as gemm

    monkeypatch.setattr(gemm, "int8_unavailable_reason", lambda device: "torch 2.0 has no torch._int_mm")
    with pytest.raises(ValueError) as err:
        configure_gemm(torch.nn.Sequential(BitLinear(64, 48)), "int8", torch.device("cpu"))
    assert str(err.value) == (
        "model.gemm: 'int8' needs torch._int_mm but torch 2.0 has no torch._int_mm; "
        "use model.gemm=auto (falls back to the regular matmul) or bf16"
    )


@pytest.mark.slow
def test_pipeline_trains_with_the_int8_gemm(tiny_overrides, tmp_path):
    from training.api import compose_config, run_pipeline

    cfg = compose_config([*tiny_overrides, f"run.out_dir={tmp_path}", "stage=stage2", "stage2.max_steps=4",
                          "stage2.lambda_warmup.enabled=false", "model.gemm=int8"])  # fmt: skip
    result = run_pipeline(cfg)
    assert result.status == "completed"
    curve = [v for _, v in result.stages["stage2"].curve]
    assert curve[-1] < curve[0], curve


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the M > 16 padding and "
                    "cuBLASLt's int8 kernel exist only there (scripts/gpu_check.sh runs this on the device)")
def test_int8_gemm_on_cuda_is_exact_including_padded_rows():
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    for m in (1, 16, 17, 8192):
        a = torch.randint(-128, 128, (m, 576), generator=g).float()
        t = torch.randint(-1, 2, (192, 576), generator=g).float()
        acc = int8_accumulate(a.to(dev), t.to(dev)).cpu()
        assert torch.equal(acc.long(), a.long() @ t.long().t()), m
