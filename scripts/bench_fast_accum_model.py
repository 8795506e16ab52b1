"""The modelled error of FP8 fast accumulation (``model.fp8_fast_accum``) on SmolLM2-135M's and one
Qwen3-4B projection shape, on the CPU: ``emulated_fast_accum_linear`` (exact 32-wide k-blocks, the
running sum rounded to 14 significant bits after each block; training/bitnet/fp8.py) against the
fp32-accumulated e4m3 result and against the exact BitLinear forward. A model of the hardware, not the
hardware: scripts/gpu_check.sh measures the real kernel.

    .venv/bin/python scripts/bench_fast_accum_model.py --out runs/fast_accum_model.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.bitnet.fp8 import emulated_fast_accum_linear, emulated_fp8_linear, reference_linear  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (2560, 9728)]


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("runs/fast_accum_model.json"))
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    print("| activations | K | N | e4m3 vs exact | fast-accum model vs e4m3 | max elementwise rel |")
    print("|---|---|---|---|---|---|")
    for kind in ("gaussian", "outliers"):
        for k, n in SHAPES:
            x = torch.randn(args.tokens, k, generator=g)
            if kind == "outliers":
                x[:, : max(1, k // 128)] *= 20.0
            w = torch.randn(n, k, generator=g) * 0.02
            exact = reference_linear(x, w).double()
            e4 = emulated_fp8_linear(x, w).double()
            fast = emulated_fast_accum_linear(x, w).double()
            r = {"activations": kind, "K": k, "N": n, "e4m3_vs_exact": rel_rms(e4, exact),
                 "fast_vs_e4m3": rel_rms(fast, e4),
                 "max_elem_rel": float(((fast - e4).abs() / e4.abs().clamp(min=1e-6)).max())}  # fmt: skip
            rows.append(r)
            print(f"| {kind} | {k} | {n} | {r['e4m3_vs_exact']:.3e} | {r['fast_vs_e4m3']:.3e} | {r['max_elem_rel']:.2e} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tokens": args.tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
