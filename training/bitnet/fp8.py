"""FP8 (e4m3) GEMM for BitLinear's forward on Hopper and later GPUs (compute capability >= 9.0).

Selected with ``model.gemm=fp8`` (training/bitnet/gemm.py: refuses to start where unsupported);
``model.gemm=auto`` picks the exact int8 GEMM instead (int8.py). ``model.fp8_out_dtype``: ``bfloat16``
(the notebook's faster choice) or ``float32``. ``model.fp8_fast_accum`` (below). FP8 is used for
compute only: master weights, gradients,
optimizer state and the activations between layers keep their dtype; only BitLinear's forward GEMM
changes, so embeddings, norms and lm_head (never BitLinear) are untouched.

What the GEMM computes. At lambda = 1 BitLinear multiplies grid values:

    x_q = A / s_x    A = clamp(round(x * s_x), -128, 127)   (per token, s_x = 127 / max|x|)
    w_q = T * s_w    T in {-1, 0, 1}                        (per tensor, s_w = mean|w|)
    y   = x_q @ w_q^T = (A @ T^T) * s_w / s_x

so the FP8 path feeds ``torch._scaled_mm`` the integer codes A and T in e4m3 with the row-wise
scales 1/s_x (per token) and s_w (broadcast per output row), and accumulates in fp32
(``use_fast_accum=False``: the sum of K products of integers is exact in fp32 while it stays below
2^24, i.e. for any K up to 2^24 / 128 = 131072).

``model.fp8_fast_accum=true`` passes ``use_fast_accum=True`` (the notebook's "bf16 accumulation", 1.10x
on an H100 PCIe for SmolLM2-135M Stage 2, same final loss). Hopper's FP8 tensor cores then keep the
running sum in their own accumulator without promoting it to fp32 every few k-blocks; DeepSeek-V3
(arXiv:2412.19437, section 3.3.2) measured that accumulator at about 14 significant bits. On
integer codes that means: every partial sum below 2^14 = 16384 is still exact, larger ones are
rounded to 14 bits (2^-14 relative per addition). For SmolLM2's K = 576 a partial sum reaches at most
128 * 576 = 73728 (all codes at the maximum and all weights of one sign), typically a few thousand,
so the extra error is zero or of order 2^-14; ``emulated_fast_accum_linear`` models it (14-bit
rounding of the running sum after each 32-wide k-block) and scripts/bench_fp8.py reports both the
emulated and, on a GPU, the measured error (docs/benchmarks.md).

Error analysis (the part that is not free). T is exact in e4m3. A is not: e4m3 has 3 mantissa
bits, so it holds the integers 0..16 exactly, then every 2nd up to 32, every 4th up to 64 and every
8th up to 128 (round-to-nearest-even: 17 -> 16, 19 -> 20, 34 -> 32, 68 -> 64, 127 -> 128). The
per-element error e = fp8(A) - A is 0 for |A| <= 16, |e| <= 1, 2, 4 in the three binades above,
and at most 1/17 (5.9%) relative (at 17, 34, 68). No choice of per-row scale helps: scaling by a
power of two moves values between binades without adding mantissa bits, and any other scale makes
the values non-integers that round the same way. The output error is therefore exactly

    y_fp8 - y = (s_w / s_x_i) * sum_k e_ik T_jk,   |y_fp8 - y|_ij <= (s_w / s_x_i) * sum_k |e_ik| |T_jk|

(plus the output rounding: 2^-8 relative for ``bfloat16``, 2^-24 for ``float32``). Measured on random
ternary weights with K = 576 (SmolLM2-135M's width): relative RMS output error 2.7% for Gaussian
activations (two thirds of the codes above 16), 2.6% for Student-t(3), 1.8% when a few outlier
channels set max|x| (1.4% of the codes above 16); the bf16 path's operand rounding gives 0.17%. So
this FP8 path is about 10-16x less exact than bf16 on the activations; the forward it trains is
BitLinear's up to that error, and the backward (straight-through, bf16/fp32 GEMMs, unchanged) uses
the exact int8-grid ``x_q``. An exact low-precision alternative on the same hardware is an int8 GEMM
(``torch._int_mm``, int32 accumulation; Hopper's dense int8 rate equals its FP8 rate):
scripts/bench_fp8.py measures both.

Where FP8 is not used (the regular matmul runs): lambda < 1 (the operands are then not on a grid),
``quantize_activations=False``, saliency-protected columns, autocast regions, and layers whose
in/out features are not multiples of 16 (``torch._scaled_mm``'s requirement). Autocast
(``run.precision=bf16-mixed``) is supported: the codes come from the float32 values and the output is
cast to the autocast dtype (gemm.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import ACT_QMAX, ACT_QMIN, absmean_scale, activation_scale

OUT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
E4M3 = getattr(torch, "float8_e4m3fn", None)
# e4m3 holds every integer in [-16, 16] exactly; int8 codes beyond that are rounded (see above).
E4M3_EXACT_INT = 16
# Significant bits of Hopper's FP8 accumulator without fp32 promotion (DeepSeek-V3, section 3.3.2).
FAST_ACCUM_BITS = 14
FAST_ACCUM_BLOCK = 32  # k-width of one FP8 WGMMA instruction


def fp8_shape_ok(in_features: int, out_features: int) -> bool:
    return in_features % 16 == 0 and out_features % 16 == 0


def fp8_unavailable_reason(device: torch.device) -> str | None:
    """Why the FP8 GEMM cannot run on ``device`` (None when it can)."""
    if E4M3 is None or not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no float8_e4m3fn/_scaled_mm"
    if device.type != "cuda":
        return f"the device is {device.type}, not a CUDA GPU"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor} (needs >= 9.0)"
    return None


def fp8_bitlinear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    eps: float = 1e-5,
    out_dtype: torch.dtype = torch.bfloat16,
    fast_accum: bool = False,
) -> torch.Tensor:
    """BitLinear's lambda = 1 forward (quantised activations, no protected columns) with the FP8 GEMM
    and BitLinear's straight-through backward (gemm.code_gemm_bitlinear)."""
    from .gemm import CodeGemm, code_gemm_bitlinear

    return code_gemm_bitlinear(x, weight, bias, eps=eps, gemm=CodeGemm("fp8", out_dtype, fast_accum))


def enable_fp8(
    model: torch.nn.Module, out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = False
) -> tuple[int, int]:
    """Switch every eligible BitLinear of ``model`` to the FP8 forward; returns (switched, total).
    No hardware check (tests use it on CPU, where ``torch._scaled_mm`` also runs); the config entry
    point is ``gemm.configure_gemm``."""
    from .gemm import CodeGemm, enable_code_gemm

    if out_dtype not in OUT_DTYPES.values():
        raise ValueError(f"model.fp8_out_dtype: got {out_dtype}, allowed: {', '.join(OUT_DTYPES)}")
    return enable_code_gemm(model, CodeGemm("fp8", out_dtype, fast_accum))


# -- the GEMM -------------------------------------------------------------------------------------
def activation_codes(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, s_x): the int8-grid codes (float32 or x's dtype, integer-valued) and the per-token scale,
    computed as ``activation_quant`` does, so ``(A / s_x).to(x.dtype) == activation_quant(x)`` bit for bit."""
    scale = activation_scale(x, eps)
    return (x * scale).round_().clamp_(ACT_QMIN, ACT_QMAX), scale


def weight_codes(w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, s_w): ternary codes in {-1, 0, 1} (w's compute dtype) and the absmean scale, as ``weight_quant``."""
    w_c = w.detach().to(torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else w.dtype)
    scale = absmean_scale(w_c, eps)
    return (w_c / scale).round_().clamp_(-1, 1), scale


def scaled_mm_codes(
    a_codes: torch.Tensor,
    inv_sx: torch.Tensor,
    t_codes: torch.Tensor,
    s_w: torch.Tensor,
    out_dtype: torch.dtype,
    fast_accum: bool = False,
) -> torch.Tensor:
    """``(fp8(A) @ T^T) * s_w / s_x`` through ``torch._scaled_mm``; A is [M, K], T is [N, K], inv_sx [M, 1].
    ``fast_accum``: ``use_fast_accum`` (see the module doc; the CPU kernel ignores it).

    ``bfloat16``: the scales are applied in the GEMM's epilogue (row-wise scaling). ``float32``: unit
    tensor-wise scales, fp32 output (exact integer sums), scales applied after in fp32; row-wise
    scaling with an fp32 output exists only on some cuBLAS versions.
    """
    a8 = a_codes.to(E4M3)
    b8 = t_codes.to(E4M3)
    n = b8.shape[0]
    if out_dtype == torch.bfloat16:
        return torch._scaled_mm(
            a8,
            b8.t(),
            scale_a=inv_sx.to(torch.float32).reshape(-1, 1).contiguous(),
            scale_b=s_w.to(torch.float32).reshape(1, 1).expand(1, n).contiguous(),
            out_dtype=torch.bfloat16,
            use_fast_accum=fast_accum,
        )
    one = torch.ones((), dtype=torch.float32, device=a8.device)
    out = torch._scaled_mm(
        a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=fast_accum
    )
    return out.mul_(inv_sx.to(torch.float32).reshape(-1, 1)).mul_(s_w.to(torch.float32))


def emulated_fp8_linear(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """What the FP8 GEMM computes, without ``torch._scaled_mm``: codes cast to e4m3 and back, an fp32
    matmul (exact: integer products and sums), then the scales. float32 result."""
    codes, scale = activation_codes(x.float(), eps)
    t_codes, s_w = weight_codes(weight, eps)
    a = codes.to(E4M3).to(torch.float32)
    return (a @ t_codes.t()) * (s_w / scale)


def fp8_error_bound(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Elementwise bound on |FP8 forward - exact BitLinear forward| from e4m3's rounding of the codes:
    ``(s_w / s_x_i) * sum_k |fp8(A_ik) - A_ik| * |T_jk|`` (float32, y's shape, no output rounding)."""
    codes, scale = activation_codes(x.float(), eps)
    t_codes, s_w = weight_codes(weight, eps)
    err = (codes.to(E4M3).to(torch.float32) - codes).abs()
    return (err @ t_codes.abs().t()) * (s_w / scale)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The exact BitLinear lambda = 1 forward in float32 (the oracle the FP8 path is compared with)."""
    codes, scale = activation_codes(x.float(), eps)
    t_codes, s_w = weight_codes(weight, eps)
    return F.linear(codes / scale, t_codes * s_w)


def emulated_fast_accum_linear(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, bits: int = FAST_ACCUM_BITS
) -> torch.Tensor:
    """A model of ``use_fast_accum=True``: the e4m3 codes' products summed exactly within each
    ``FAST_ACCUM_BLOCK``-wide k-block, the running sum over blocks rounded to ``bits`` significant
    bits after every addition (float32 result, then the scales). A model of the hardware, not the
    hardware: the GPU measurement is scripts/bench_fp8.py's."""
    codes, scale = activation_codes(x.float(), eps)
    t_codes, s_w = weight_codes(weight, eps)
    a = codes.to(E4M3).to(torch.float64).reshape(-1, codes.shape[-1])
    t = t_codes.to(torch.float64)
    acc = torch.zeros(a.shape[0], t.shape[0], dtype=torch.float64)
    for k0 in range(0, a.shape[1], FAST_ACCUM_BLOCK):
        acc = _round_significant(acc + a[:, k0 : k0 + FAST_ACCUM_BLOCK] @ t[:, k0 : k0 + FAST_ACCUM_BLOCK].t(), bits)
    out = acc.to(torch.float32).reshape(*codes.shape[:-1], t.shape[0])
    return out * (s_w / scale)


def _round_significant(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to ``bits`` significant binary digits (round half to even), elementwise."""
    mant, exp = torch.frexp(v)  # v = mant * 2^exp, 0.5 <= |mant| < 1
    return torch.ldexp(torch.round(torch.ldexp(mant, torch.full_like(exp, bits))), exp - bits)
