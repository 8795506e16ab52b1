"""Exact int8 GEMM for BitLinear's forward at lambda = 1 (``model.gemm=int8``), via ``torch._int_mm``.

At lambda = 1 BitLinear multiplies grid values (see fp8.py for the notation):

    x_q = A / s_x    A = clamp(round(x * s_x), -128, 127) in int8     (per token, s_x = 127 / max|x|)
    w_q = T * s_w    T in {-1, 0, 1} in int8                          (per tensor, s_w = mean|w|)
    y   = (A @ T^T) * s_w / s_x

``torch._int_mm`` multiplies the int8 codes with int32 accumulation, so ``A @ T^T`` is exact (each
product is at most 128 in magnitude, so no int32 overflow for K < 2^24); the only roundings are the
int32 -> float32 conversion (exact while |sum| < 2^24, i.e. any K up to 131072) and the two float32
multiplications by the scales. Unlike the e4m3 path (fp8.py: 3 mantissa bits, codes above 16 are
rounded) and the bf16 path (operands rounded to 8 bits), the forward is the integer computation
the BitNet b1.58 paper describes, up to float32 rounding of the rescale. On Hopper the dense int8
tensor-core rate equals the FP8 rate (989 TFLOPS-class dense bf16, ~2x that for int8/fp8).

Shape rules. CUDA's ``_int_mm`` needs more than 16 rows and K, N multiples of 8: layers whose in/out
features are not multiples of 8 keep the regular matmul (``gemm.enable_code_gemm``), and a call with
16 rows or fewer is padded with zero rows (their outputs are dropped). CPU torch takes any shape
(measured here: ~20x slower than a float32 matmul, so ``model.gemm=auto`` never picks it on CPU).
"""

from __future__ import annotations

import torch

INT8_MIN_ROWS_CUDA = 17  # torch._int_mm on CUDA: "self.size(0) needs to be greater than 16"
INT8_MULTIPLE = 8  # K and N must be multiples of 8 on CUDA


def int8_unavailable_reason(device: torch.device) -> str | None:
    """Why ``torch._int_mm`` cannot run on ``device`` (None when it can). On CUDA a 32x32x32 probe
    runs once per device (a GPU or build without int8 tensor-core support raises there)."""
    if not hasattr(torch, "_int_mm"):
        return f"torch {torch.__version__} has no torch._int_mm"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"the device is {device.type}, where torch._int_mm is not supported"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return _cuda_probe(torch.cuda.current_device() if device.index is None else device.index)


_PROBED: dict[int, str | None] = {}


def _cuda_probe(index: int) -> str | None:
    if index not in _PROBED:
        dev = torch.device("cuda", index)
        try:
            a = torch.ones(32, 32, dtype=torch.int8, device=dev)
            out = torch._int_mm(a, a.t())
            ok = int(out[0, 0]) == 32
            _PROBED[index] = None if ok else "torch._int_mm returned a wrong result in a probe"
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _PROBED[index] = f"torch._int_mm fails on {torch.cuda.get_device_name(dev)}: {first}"
    return _PROBED[index]


def int8_shape_ok(in_features: int, out_features: int) -> bool:
    return in_features % INT8_MULTIPLE == 0 and out_features % INT8_MULTIPLE == 0


def int8_accumulate(a_codes: torch.Tensor, t_codes: torch.Tensor) -> torch.Tensor:
    """``A @ T^T`` in int32 through ``torch._int_mm``. A: [M, K] integer-valued (any dtype, values in
    [-128, 127]); T: [N, K] in {-1, 0, 1}. Rows are zero-padded to 17 on CUDA when M <= 16."""
    a8 = a_codes.to(torch.int8).contiguous()
    t8 = t_codes.to(torch.int8).contiguous()
    m = a8.shape[0]
    if a8.is_cuda and m < INT8_MIN_ROWS_CUDA:
        a8 = torch.cat([a8, a8.new_zeros(INT8_MIN_ROWS_CUDA - m, a8.shape[1])])
    # t8.t() is column-major [K, N], the layout cuBLASLt's int8 kernel wants for the second operand.
    return torch._int_mm(a8, t8.t())[:m]


def rescale(acc: torch.Tensor, inv_sx: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """``acc * (1/s_x) * s_w`` in float32 (acc: [M, N] integers, inv_sx: [M, 1], s_w: 0-dim)."""
    return acc.to(torch.float32).mul_(inv_sx.to(torch.float32).reshape(-1, 1)).mul_(s_w.to(torch.float32))


def int8_mm_codes(
    a_codes: torch.Tensor, inv_sx: torch.Tensor, t_codes: torch.Tensor, s_w: torch.Tensor
) -> torch.Tensor:
    """BitLinear's lambda = 1 product from the codes: the exact int32 GEMM, then the scales (float32)."""
    return rescale(int8_accumulate(a_codes, t_codes), inv_sx, s_w)


def int8_reference(a_codes: torch.Tensor, inv_sx: torch.Tensor, t_codes: torch.Tensor, s_w: torch.Tensor):
    """The integer oracle: the same product with an int64 matmul (no ``_int_mm``), same rescale."""
    acc = a_codes.to(torch.int64) @ t_codes.to(torch.int64).t()
    return rescale(acc, inv_sx, s_w)
