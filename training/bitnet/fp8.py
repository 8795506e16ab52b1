"""FP8 (e4m3) GEMM for BitLinear's forward on Hopper and later GPUs (compute capability >= 9.0).

``model.fp8``: ``off`` (default), ``auto`` (on where supported, else one log line and the regular
matmul), ``on`` (a ValueError where unsupported). ``model.fp8_out_dtype``: ``bfloat16`` (the
notebook's faster choice) or ``float32``. FP8 is used for compute only: master weights, gradients,
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
in/out features are not multiples of 16 (``torch._scaled_mm``'s requirement).
"""

from __future__ import annotations

import logging
import threading
import weakref

import torch
import torch.nn.functional as F

from .quant import ACT_QMAX, ACT_QMIN, absmean_scale, activation_scale

log = logging.getLogger("training")

FP8_MODES = ("off", "auto", "on")
OUT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
E4M3 = getattr(torch, "float8_e4m3fn", None)
# e4m3 holds every integer in [-16, 16] exactly; int8 codes beyond that are rounded (see above).
E4M3_EXACT_INT = 16


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


def enable_fp8(model: torch.nn.Module, out_dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """Switch every eligible BitLinear of ``model`` to the FP8 forward; returns (switched, total).

    No hardware check (tests use it on CPU, where ``torch._scaled_mm`` also runs); ``configure_fp8``
    is the config-driven entry point.
    """
    from .bitlinear import bitlinear_modules

    if out_dtype not in OUT_DTYPES.values():
        raise ValueError(f"model.fp8_out_dtype: got {out_dtype}, allowed: {', '.join(OUT_DTYPES)}")
    layers = list(bitlinear_modules(model))
    on = 0
    for layer in layers:
        if layer.in_features % 16 == 0 and layer.out_features % 16 == 0:
            layer.fp8_out_dtype = out_dtype
            on += 1
    return on, len(layers)


def disable_fp8(model: torch.nn.Module) -> None:
    from .bitlinear import bitlinear_modules

    for layer in bitlinear_modules(model):
        layer.fp8_out_dtype = None


def configure_fp8(
    model: torch.nn.Module, mode: str, device: torch.device, out_dtype: str = "bfloat16"
) -> int:
    """Apply ``model.fp8`` (off | auto | on); returns how many BitLinear layers use the FP8 GEMM.

    ``auto`` where unsupported logs one line saying what it fell back to; ``on`` raises instead.
    """
    if mode not in FP8_MODES:
        raise ValueError(f"model.fp8: got {mode!r}, allowed: {', '.join(FP8_MODES)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"model.fp8_out_dtype: got {out_dtype!r}, allowed: {', '.join(OUT_DTYPES)}")
    if mode == "off":
        disable_fp8(model)
        return 0
    reason = fp8_unavailable_reason(device)
    if reason is not None:
        if mode == "on":
            raise ValueError(
                f"model.fp8: 'on' needs CUDA compute capability >= 9.0 but {reason}; "
                "use model.fp8=auto (falls back to the regular matmul) or off"
            )
        log.info("model.fp8=auto: FP8 GEMM unavailable (%s); BitLinear uses the regular matmul", reason)
        disable_fp8(model)
        return 0
    on, total = enable_fp8(model, OUT_DTYPES[out_dtype])
    log.info(
        "FP8 GEMM on for %d of %d BitLinear forwards at lambda=1 (e4m3 codes, row-wise scales, %s output, "
        "fp32 accumulation); backward, embeddings, norms and lm_head unchanged",
        on,
        total,
        out_dtype,
    )
    return on


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
) -> torch.Tensor:
    """``(fp8(A) @ T^T) * s_w / s_x`` through ``torch._scaled_mm``; A is [M, K], T is [N, K], inv_sx [M, 1].

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
            use_fast_accum=False,
        )
    one = torch.ones((), dtype=torch.float32, device=a8.device)
    out = torch._scaled_mm(
        a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=False
    )
    return out.mul_(inv_sx.to(torch.float32).reshape(-1, 1)).mul_(s_w.to(torch.float32))


class _CodeCache(threading.local):
    """One-entry memo of the last input's codes (q/k/v and gate/up share one input), keyed by the
    tensor's identity and version; weak references only, like functional._InputQuantCache."""

    def __init__(self) -> None:
        self.x_ref = self.codes_ref = self.scale_ref = self.key = None

    def get(self, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling() or x.is_inference():
            return activation_codes(x, eps)
        key = (x._version, eps)
        if self.x_ref is not None and self.x_ref() is x and self.key == key:
            codes, scale = self.codes_ref(), self.scale_ref()
            if codes is not None and scale is not None:
                return codes, scale
        codes, scale = activation_codes(x, eps)
        self.x_ref, self.codes_ref, self.scale_ref, self.key = (
            weakref.ref(x),
            weakref.ref(codes),
            weakref.ref(scale),
            key,
        )
        return codes, scale


_code_cache = _CodeCache()


class _FP8BitLinear(torch.autograd.Function):
    """Forward: the FP8 GEMM above. Backward: BitLinear's straight-through backward with the exact
    int8-grid ``x_q`` (rebuilt from the saved int8 codes: 1 byte per element instead of x's 2 or 4)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        with torch.no_grad():
            codes, scale = _code_cache.get(x.detach(), eps)
            t_codes, s_w = weight_codes(weight, eps)
            k = x.shape[-1]
            y = scaled_mm_codes(
                codes.reshape(-1, k), scale.reshape(-1, 1).reciprocal(), t_codes, s_w, out_dtype
            )
            y = y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)
            if bias is not None:
                y = y + bias
        ctx.save_for_backward(codes.to(torch.int8), scale, weight)
        ctx.eps, ctx.x_dtype, ctx.has_bias = eps, x.dtype, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        from .functional import quantized_weight

        codes, scale, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w_q = quantized_weight(weight, lam=1.0, eps=ctx.eps)
            grad_x = grad_out @ w_q
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            g2d = grad_out.reshape(-1, grad_out.shape[-1])
            if ctx.needs_input_grad[1]:
                x_q = codes.to(scale.dtype).div_(scale).to(ctx.x_dtype)
                grad_w = g2d.t() @ x_q.reshape(-1, x_q.shape[-1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g2d.sum(0)
        return grad_x, grad_w, grad_b, None, None


def fp8_bitlinear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    eps: float = 1e-5,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """BitLinear's lambda = 1 forward (quantised activations, no protected columns) with the FP8 GEMM.

    Under autocast it returns the regular path (a custom Function's backward would see mixed dtypes).
    """
    if torch.is_autocast_enabled(x.device.type):
        from .functional import bitlinear_forward

        return bitlinear_forward(x, weight, bias, lam=1.0, quantize_activations=True, eps=eps)
    return _FP8BitLinear.apply(x, weight, bias, eps, out_dtype)


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
