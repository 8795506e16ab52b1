"""FP8 GEMM for BitLinear (training/bitnet/fp8.py) on a Hopper GPU: speed, and equivalence with bf16.

    python scripts/bench_fp8.py --out runs/bench_fp8.json

Needs CUDA compute capability >= 9.0 (H100/H200); anywhere else it prints one line and exits 0.
``--cpu-smoke`` runs every code path on tiny shapes on the CPU (numbers meaningless; it checks the
script itself before GPU time is spent on it). Sized to finish in about two minutes on an H200.

1. Layers, at SmolLM2-135M's projection shapes (plus one Qwen3-4B MLP shape, where GEMMs are large
   enough for FP8 to matter), M = batch x seq tokens, bf16 activations and weights:
   ``linear``        raw bf16 ``F.linear`` (the ceiling BitLinear cannot beat in bf16)
   ``bitlinear``     BitLinear's regular forward at lambda = 1 (quantisers + bf16 GEMM)
   ``fp8``           BitLinear's FP8 forward, bf16 output (quantisers + e4m3 casts + ``_scaled_mm``)
   ``fp8_f32out``    the same with fp32 output
   ``scaled_mm``     the raw e4m3 GEMM alone; ``scaled_mm_fast`` with ``use_fast_accum=True``
   ``int_mm``        the raw int8 GEMM (``torch._int_mm``, int32 accumulation): the exact alternative
   per variant: ms per call, TFLOP/s, speedup over ``bitlinear``; and the relative RMS error against
   the exact fp32 BitLinear forward (``reference_linear``) for bitlinear / fp8 / int8.
2. Model: a SmolLM2-135M-shaped Llama (random init, no download), SubLN + BitLinear, bf16, AdamW:
   fwd+bwd+step time and tokens/s with the FP8 GEMM off and on (``model.gemm=bf16`` / ``fp8``); ``--steps`` training steps from one
   init on the same batches (fp32, bf16, bf16 + FP8) with the loss curves and their largest relative
   gaps, and the logits' cosine similarity before training.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.bitnet import convert_model_to_bitnet, insert_subln  # noqa: E402
from training.bitnet.fp8 import (  # noqa: E402
    E4M3,
    activation_codes,
    enable_fp8,
    fp8_bitlinear,
    fp8_unavailable_reason,
    reference_linear,
    weight_codes,
)
from training.bitnet.functional import bitlinear_forward  # noqa: E402
from training.models import SMOLLM2_135M_SHAPE  # noqa: E402

SMOLLM2_135M = SMOLLM2_135M_SHAPE
# (name, in_features K, out_features N)
LAYERS = [
    ("q_proj/o_proj 576->576", 576, 576),
    ("k_proj/v_proj 576->192", 576, 192),
    ("gate/up_proj 576->1536", 576, 1536),
    ("down_proj 1536->576", 1536, 576),
    ("Qwen3-4B up 2560->9728", 2560, 9728),
]


def timer(device: torch.device):
    """ms per call of fn(): CUDA events on a GPU, perf_counter on the CPU; warm-up first."""

    def run(fn, iters: int, warmup: int = 5) -> float:
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters

    return run


def rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def bench_layers(device: torch.device, tokens: int, iters: int) -> list[dict]:
    time_it = timer(device)
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, k, n in LAYERS:
        x = torch.randn(tokens, k, generator=g).to(device, torch.bfloat16)
        x[:, : max(1, k // 128)] *= 20.0  # a few outlier channels, as in LLM activations
        w = (torch.randn(n, k, generator=g) * 0.02).to(device, torch.bfloat16)
        a, s_x = activation_codes(x)
        t, s_w = weight_codes(w)
        a8, t8 = a.to(E4M3), t.to(E4M3)
        inv = s_x.reciprocal().float().reshape(-1, 1).contiguous()
        sw = s_w.float().reshape(1, 1).expand(1, n).contiguous()
        a_i8, t_i8 = a.to(torch.int8), t.to(torch.int8)

        variants = _variants(x, w, a8, t8, inv, sw, a_i8, t_i8)
        flops = 2.0 * tokens * k * n
        ms = {v: time_it(fn, iters) for v, fn in variants.items()}
        exact = reference_linear(x, w)
        int_sums = torch._int_mm(a_i8, t_i8.t()).double()
        int_exact = float((int_sums - (a.double() @ t.double().t())).abs().max())
        err = {
            "bitlinear": rel_rms(bitlinear_forward(x, w, None, lam=1.0), exact),
            "fp8": rel_rms(fp8_bitlinear(x, w, None, out_dtype=torch.bfloat16), exact),
            "fp8_f32out": rel_rms(fp8_bitlinear(x, w, None, out_dtype=torch.float32), exact),
            "int_mm": rel_rms(int_sums * (s_w.double() / s_x.double()), exact),
        }
        rows.append(
            {
                "layer": name,
                "M": tokens,
                "K": k,
                "N": n,
                "ms": ms,
                "tflops": {v: flops / (t_ms * 1e-3) / 1e12 for v, t_ms in ms.items()},
                "speedup_vs_bitlinear": {v: ms["bitlinear"] / t_ms for v, t_ms in ms.items()},
                "rel_rms_error_vs_exact": err,
                "int_mm_max_abs_error_of_integer_sums": int_exact,
                "codes_above_16": float((a.abs() > 16).float().mean()),
            }
        )
    return rows


def _variants(x, w, a8, t8, inv, sw, a_i8, t_i8) -> dict:
    def scaled(fast: bool):
        return lambda: torch._scaled_mm(
            a8, t8.t(), scale_a=inv, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=fast
        )

    return {
        "linear": lambda: F.linear(x, w),
        "bitlinear": lambda: bitlinear_forward(x, w, None, lam=1.0),
        "fp8": lambda: fp8_bitlinear(x, w, None, out_dtype=torch.bfloat16),
        "fp8_f32out": lambda: fp8_bitlinear(x, w, None, out_dtype=torch.float32),
        "scaled_mm": scaled(False),
        "scaled_mm_fast": scaled(True),
        "int_mm": lambda: torch._int_mm(a_i8, t_i8.t()),
    }


def build_model(config: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(device=device, dtype=dtype)
    insert_subln(model)
    convert_model_to_bitnet(model)
    model.train()
    return model


def bench_model(device: torch.device, config: dict, batch: int, seq: int, steps: int, iters: int) -> dict:
    base = build_model(config, device, torch.float32)
    g = torch.Generator(device="cpu").manual_seed(1)
    batches = [
        torch.randint(0, config["vocab_size"], (batch, seq), generator=g).to(device) for _ in range(steps)
    ]
    held = torch.randint(0, config["vocab_size"], (batch, seq), generator=g).to(device)
    variants = {}
    for name, dtype, fp8 in (
        ("fp32", torch.float32, False),
        ("bf16", torch.bfloat16, False),
        ("bf16_fp8", torch.bfloat16, True),
    ):
        model = copy.deepcopy(base).to(dtype)
        if fp8:
            enable_fp8(model, torch.bfloat16)
        with torch.no_grad():
            logits = model(input_ids=held).logits.float()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)

        def step(ids, model=model, opt=opt) -> float:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        losses = [float(step(ids)) for ids in batches]
        # Timing after the curve (the optimizer state exists; the batches repeat).
        ms = timer(device)(lambda model=model, step=step: step(batches[0]), iters, warmup=2)
        variants[name] = {
            "losses": losses,
            "step_ms": ms,
            "tokens_per_s": batch * seq / (ms * 1e-3),
            "logits": logits,
        }
        del model, opt
    out = {"batch": batch, "seq": seq, "steps": steps}
    for name, v in variants.items():
        out[name] = {k: v[k] for k in ("losses", "step_ms", "tokens_per_s")}
        out[name]["logits_cosine_vs_fp32"] = float(
            F.cosine_similarity(
                v["logits"].flatten().double(), variants["fp32"]["logits"].flatten().double(), dim=0
            )
        )

    def gap(a: str, b: str) -> float:
        return max(abs(x - y) / abs(y) for x, y in zip(out[a]["losses"], out[b]["losses"]))

    out["max_rel_loss_gap"] = {"bf16_vs_fp32": gap("bf16", "fp32"), "bf16_fp8_vs_bf16": gap("bf16_fp8", "bf16"),
                               "bf16_fp8_vs_fp32": gap("bf16_fp8", "fp32")}  # fmt: skip
    out["speedup_fp8_vs_bf16"] = out["bf16"]["step_ms"] / out["bf16_fp8"]["step_ms"]
    return out


def print_tables(report: dict) -> None:
    print(f"\n{report['device']} | torch {report['torch']} | M = {report['layers'][0]['M']} tokens")
    names = list(report["layers"][0]["ms"])
    print("| layer | " + " | ".join(f"{v} ms (x)" for v in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for r in report["layers"]:
        cells = [f"{r['ms'][v]:.3f} ({r['speedup_vs_bitlinear'][v]:.2f})" for v in names]
        print(f"| {r['layer']} | " + " | ".join(cells) + " |")
    print("\n| layer | codes > 16 | rel RMS err bitlinear | fp8 | fp8_f32out | int_mm |")
    print("|---|---|---|---|---|---|")
    for r in report["layers"]:
        e = r["rel_rms_error_vs_exact"]
        print(
            f"| {r['layer']} | {r['codes_above_16']:.3f} | {e['bitlinear']:.2e} | {e['fp8']:.2e} | "
            f"{e['fp8_f32out']:.2e} | {e['int_mm']:.2e} |"
        )
    m = report["model"]
    print(f"\nmodel (SmolLM2-135M shape, batch {m['batch']} x {m['seq']}, {m['steps']} AdamW steps)")
    print("| variant | step ms | tokens/s | first loss | last loss | logits cos vs fp32 |")
    print("|---|---|---|---|---|---|")
    for v in ("fp32", "bf16", "bf16_fp8"):
        d = m[v]
        print(
            f"| {v} | {d['step_ms']:.1f} | {d['tokens_per_s']:.0f} | {d['losses'][0]:.4f} | {d['losses'][-1]:.4f} | "
            f"{d['logits_cosine_vs_fp32']:.6f} |"
        )
    print(
        f"max relative loss gaps: {m['max_rel_loss_gap']}; FP8 speedup over bf16: {m['speedup_fp8_vs_bf16']:.3f}x"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench_fp8.json")
    p.add_argument("--tokens", type=int, default=8192, help="M of the layer GEMMs (batch x seq)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script only")
    args = p.parse_args(argv)

    if args.cpu_smoke:
        device = torch.device("cpu")
        global LAYERS
        LAYERS = [("smoke 64->48", 64, 48), ("smoke 128->32", 128, 32)]
        config = dict(SMOLLM2_135M, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        args.tokens, args.iters, args.batch, args.seq, args.steps = 64, 2, 2, 32, 3
    else:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        reason = fp8_unavailable_reason(device)
        if reason is not None:
            print(f"bench_fp8: FP8 GEMM needs CUDA compute capability >= 9.0 but {reason}; nothing measured")
            return 0
        config = SMOLLM2_135M
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32

    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_smoke": args.cpu_smoke,
    }
    t0 = time.perf_counter()
    report["layers"] = bench_layers(device, args.tokens, args.iters)
    report["model"] = bench_model(device, config, args.batch, args.seq, args.steps, max(2, args.iters // 5))
    report["seconds"] = time.perf_counter() - t0
    print_tables(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwritten to {out} ({report['seconds']:.0f} s)")
    return 0 if all(math.isfinite(x) for x in report["model"]["bf16_fp8"]["losses"]) else 1


if __name__ == "__main__":
    sys.exit(main())
