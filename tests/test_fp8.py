"""FP8 (e4m3) GEMM for BitLinear (training/bitnet/fp8.py), checked on CPU.

CPU torch casts to float8_e4m3fn and back and also runs ``torch._scaled_mm``, so both the scaling math
(by emulation: e4m3 round trip + an exact fp32 matmul of integers) and the real call are exercised.
Tolerances are derived, not guessed: the FP8 result must equal the emulation up to the output's
rounding, and differ from the exact BitLinear forward by at most the e4m3 error bound of the codes
(``fp8_error_bound``) plus rounding. No GPU here: scripts/bench_fp8.py is the check for one.
"""

from __future__ import annotations

import logging

import pytest
import torch

from training.bitnet import BitLinear, LambdaController
from training.bitnet.fp8 import (
    E4M3,
    activation_codes,
    emulated_fast_accum_linear,
    emulated_fp8_linear,
    enable_fp8,
    fp8_bitlinear,
    fp8_error_bound,
    reference_linear,
    weight_codes,
)
from training.bitnet.functional import bitlinear_forward
from training.bitnet.gemm import CodeGemm, configure_gemm

F32_EPS = 2.0**-23  # twice fp32's unit roundoff
BF16_U = 2.0**-8  # bf16 unit roundoff: 8 significant bits, round to nearest


def _data(kind: str, rows: int = 48, k: int = 128, n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    if kind == "outliers":  # a few channels set max|x|, as in LLM activations: most codes are small
        x[:, :4] *= 30.0
    w = torch.randn(n, k, generator=g) * 0.02
    return x.reshape(2, rows // 2, k), w


def test_e4m3_holds_small_codes_exactly_and_rounds_the_rest_by_at_most_1_in_17():
    codes = torch.arange(-128, 128, dtype=torch.float32)
    err = codes.to(E4M3).to(torch.float32) - codes
    small = codes.abs() <= 16
    assert torch.all(err[small] == 0)
    assert torch.any(err[~small] != 0)
    # Half a unit in the last place of the binade: 1 in [16, 32), 2 in [32, 64), 4 in [64, 128].
    half_ulp = torch.where(codes.abs() >= 64, 4.0, torch.where(codes.abs() >= 32, 2.0, 1.0))
    assert torch.all(err[~small].abs() <= half_ulp[~small])
    rel = err.abs() / codes.abs().clamp(min=1)
    assert rel.max().item() == pytest.approx(1 / 17)
    assert set(codes[rel == rel.max()].tolist()) == {-68.0, -34.0, -17.0, 17.0, 34.0, 68.0}
    assert float(torch.tensor(127.0).to(E4M3)) == 128.0 and float(torch.tensor(-128.0).to(E4M3)) == -128.0


def test_codes_rebuild_bitlinear_quantisers_bit_for_bit():
    from training.bitnet.quant import activation_quant, weight_quant

    x, w = _data("gaussian")
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd = x.to(dtype), w.to(dtype)
        a, s_x = activation_codes(xd)
        assert torch.equal((a / s_x).to(dtype), activation_quant(xd))
        assert torch.all(a == a.round()) and a.abs().max() <= 128
        t, s_w = weight_codes(wd)
        assert set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert torch.equal((t * s_w).to(dtype), weight_quant(wd))


@pytest.mark.parametrize("kind", ["gaussian", "outliers"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_equals_emulation_and_stays_within_the_e4m3_bound(kind, out_dtype):
    x, w = _data(kind)
    y = fp8_bitlinear(x, w, None, out_dtype=out_dtype)  # the real torch._scaled_mm, on CPU
    emulated = emulated_fp8_linear(x, w)
    exact = reference_linear(x, w)
    bound = fp8_error_bound(x, w)
    a, s_x = activation_codes(x)
    t, s_w = weight_codes(w)
    magnitude = (a.abs() @ t.abs().t()) * (s_w / s_x)  # sum of |products|: scale of rounding errors
    # The GEMM itself: integer sums are exact in fp32 (CUDA); CPU's _scaled_mm scales the operands
    # before an fp32 GEMM, hence the fp32 term. Then the output's rounding.
    out_round = (BF16_U if out_dtype == torch.bfloat16 else 0.0) * emulated.abs()
    assert torch.all((y.float() - emulated).abs() <= out_round + 8 * F32_EPS * magnitude)
    # Against BitLinear's exact forward: the e4m3 rounding of the activation codes, and no more.
    err = (y.float() - exact).abs()
    assert torch.all(err <= bound + out_round + 8 * F32_EPS * magnitude)
    # The bound is reached in kind, not only in theory: the error is real and of the analysed size.
    rel_rms = ((emulated - exact).pow(2).mean() / exact.pow(2).mean()).sqrt().item()
    assert 0.005 < rel_rms < 0.04, rel_rms


def test_only_the_max_code_is_rounded_when_the_rest_are_small():
    """Codes <= 16 are exact; the per-token max (127) becomes 128: the error is one closed-form term."""
    g = torch.Generator().manual_seed(1)
    k, n = 64, 32
    x = torch.randint(-16, 17, (8, k), generator=g).float()
    x[:, 5] = 127.0  # max|x| = 127, so s_x = 1 and the codes are x itself
    w = torch.randn(n, k, generator=g) * 0.02
    y = fp8_bitlinear(x, w, None, out_dtype=torch.float32)
    t, s_w = weight_codes(w)
    expected_err = (128.0 - 127.0) * t[:, 5] * s_w  # (fp8(A) - A) at the max column, times T and the scales
    torch.testing.assert_close(y - reference_linear(x, w), expected_err.expand(8, n), rtol=0, atol=1e-5)


def test_bitlinear_fp8_forward_and_straight_through_backward():
    torch.manual_seed(0)
    plain = BitLinear(128, 96, bias=True)
    fast = BitLinear(128, 96, bias=True)
    fast.load_state_dict(plain.state_dict())
    assert enable_fp8(fast, torch.float32) == (1, 1)
    x, _ = _data("gaussian")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), fast(xb)
    bound = fp8_error_bound(x, plain.weight)
    assert torch.all((yb - ya).abs() <= bound + 1e-5)
    assert not torch.equal(ya, yb)  # the FP8 path really ran
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(2))
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    # Same upstream gradient -> identical gradients: the backward uses the exact int8-grid x_q.
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(plain.weight.grad, fast.weight.grad)
    assert torch.equal(plain.bias.grad, fast.bias.grad)


def test_bf16_inputs_give_bf16_outputs_within_bound():
    x, w = _data("outliers")
    xb, wb = x.bfloat16(), w.bfloat16()
    y = fp8_bitlinear(xb, wb, None, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    regular = bitlinear_forward(xb, wb, None, lam=1.0).float()
    a, s_x = activation_codes(xb)
    t, s_w = weight_codes(wb)
    magnitude = (a.abs() @ t.abs().t()) * (s_w / s_x)
    # The regular bf16 path rounds x_q, w_q and its output (2^-8 each); the FP8 path its output.
    slack = 4 * BF16_U * magnitude
    assert torch.all((y.float() - regular).abs() <= fp8_error_bound(xb, wb) + slack)


def test_regular_matmul_where_operands_are_not_on_a_grid():
    torch.manual_seed(0)
    x, _ = _data("gaussian")
    lam = LambdaController(value=0.5)
    layer = BitLinear(128, 96, lambda_ctrl=lam)
    enable_fp8(layer, torch.float32)
    expected = bitlinear_forward(x, layer.weight, layer.bias, lam=0.5)
    assert torch.equal(layer(x), expected)  # lambda < 1: full-precision blend, not a grid
    lam.set_value(1.0)
    layer.quantize_activations = False
    assert torch.equal(
        layer(x), bitlinear_forward(x, layer.weight, layer.bias, lam=1.0, quantize_activations=False)
    )
    layer.quantize_activations = True
    # Under autocast (run.precision=bf16-mixed) the FP8 path runs on the float32 codes, bf16 output.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = layer(x)
    assert auto.dtype == torch.bfloat16
    exact = reference_linear(x, layer.weight) + layer.bias
    slack = BF16_U * exact.abs() + 1e-5
    assert torch.all((auto.float() - exact).abs() <= fp8_error_bound(x, layer.weight) + slack)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        regular = bitlinear_forward(x, layer.weight, layer.bias, lam=1.0)
    assert not torch.equal(auto, regular)  # the FP8 GEMM ran, not the regular bf16 matmul


def test_saliency_protected_columns_keep_the_regular_matmul():
    from training.bitnet.saliency import SaliencyBitLinear

    torch.manual_seed(0)
    layer = SaliencyBitLinear(128, 96)
    layer.protect_k = 0.1
    enable_fp8(layer, torch.float32)
    x, _ = _data("gaussian")
    protected = layer.protected_columns()
    assert protected is not None and protected.any()
    assert torch.equal(layer(x), bitlinear_forward(x, layer.weight, layer.bias, lam=1.0, protected=protected))


def test_layers_whose_sizes_scaled_mm_cannot_take_stay_regular():
    model = torch.nn.Sequential(BitLinear(64, 48), BitLinear(48, 20), torch.nn.Linear(16, 16))
    assert enable_fp8(model, torch.bfloat16) == (1, 2)
    assert model[0].gemm == CodeGemm("fp8", torch.bfloat16, False) and model[1].gemm is None


def test_configure_gemm_fp8_refuses_without_hopper_and_bf16_is_the_regular_matmul(caplog):
    model = torch.nn.Sequential(BitLinear(64, 48))
    cpu = torch.device("cpu")
    enable_fp8(model)
    with caplog.at_level(logging.INFO, logger="training"):
        assert configure_gemm(model, "bf16", cpu) == "bf16"
    assert caplog.records == [] and model[0].gemm is None
    with pytest.raises(ValueError) as info:
        configure_gemm(model, "fp8", cpu)
    assert str(info.value) == (
        "model.gemm: 'fp8' needs CUDA compute capability >= 9.0 but the device is cpu, not a CUDA GPU; "
        "use model.gemm=auto (falls back to the regular matmul) or bf16"
    )
    assert model[0].gemm is None


def test_fp8_config_keys(tiny_overrides, tmp_path):
    from training.api import compose_config, run_stage2
    from training.config import ConfigError

    with pytest.raises(ConfigError, match=r"^model.gemm: got 'yes', allowed: auto, bf16, int8, fp8$"):
        compose_config([*tiny_overrides, "model.gemm=yes"])
    with pytest.raises(
        ConfigError, match=r"^model.fp8_out_dtype: got 'float16', allowed: bfloat16, float32$"
    ):
        compose_config([*tiny_overrides, "model.fp8_out_dtype=float16"])
    # The pipeline applies the key: fp8 without a Hopper GPU stops before training, naming the fix.
    cfg = compose_config([*tiny_overrides, "model.gemm=fp8", "stage2.max_steps=1", f"run.out_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"^model.gemm: 'fp8' needs CUDA compute capability >= 9.0"):
        run_stage2(cfg)


def test_fast_accum_passes_through_and_its_modelled_error_is_within_the_14_bit_bound():
    """``use_fast_accum`` reaches ``torch._scaled_mm`` (the CPU kernel ignores it: same result), and the
    14-bit accumulator model differs from exact e4m3 sums by at most 2^-14 per k-block addition."""
    x, w = _data("gaussian", k=576)
    slow = fp8_bitlinear(x, w, None, out_dtype=torch.float32)
    fast = fp8_bitlinear(x, w, None, out_dtype=torch.float32, fast_accum=True)
    assert torch.equal(slow, fast)
    layer = BitLinear(576, 96, bias=False)
    enable_fp8(layer, torch.float32, fast_accum=True)
    assert layer.gemm.fp8_fast_accum is True
    exact_e4m3 = emulated_fp8_linear(x, w)
    modelled = emulated_fast_accum_linear(x, w)
    a, s_x = activation_codes(x)
    t, s_w = weight_codes(w)
    magnitude = (a.abs() @ t.abs().t()) * (s_w / s_x)
    blocks = 576 // 32
    assert torch.all((modelled - exact_e4m3).abs() <= blocks * 2.0**-14 * magnitude + 1e-6)
    # With this few products per output the running sums stay small: the model finds the error tiny.
    rel = ((modelled - exact_e4m3).pow(2).mean() / exact_e4m3.pow(2).mean()).sqrt().item()
    assert rel < 2.0**-12, rel
    # The model is not vacuous: a narrower accumulator does round these sums.
    coarse = emulated_fast_accum_linear(x, w, bits=8)
    assert ((coarse - exact_e4m3).pow(2).mean() / exact_e4m3.pow(2).mean()).sqrt().item() > 1e-3


def test_bench_script_without_a_hopper_gpu_prints_one_line_and_exits_0():
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even on a machine that has one
    proc = subprocess.run(
        [sys.executable, str(repo / "scripts" / "bench_fp8.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "bench_fp8: FP8 GEMM needs CUDA compute capability >= 9.0 but the device is cpu, not a CUDA GPU; "
        "nothing measured"
    ]
