"""The one device check of the training half (issue 15): throughput, MFU, GEMM speed and error, the
largest micro-batch, and a 2-trial sweep through the real worker. One table, one JSON.

    scripts/gpu_check.sh                      # on the GPU machine; finishes inside 8 minutes on one H200
    scripts/gpu_check.sh --cpu-smoke          # the same code paths on tiny CPU shapes (the test suite runs it)

Sections (each writes its rows into the JSON as soon as it is done, so a kill keeps what ran):

1. ``gemm``: SmolLM2-135M's projection shapes (q/o 576->576, k/v 576->192, gate/up 576->1536, down
   1536->576) at 8192 tokens, bf16 activations with a few outlier channels, weights N(0, 0.02):
   forward time and TFLOP/s of bf16 ``F.linear``, BitLinear's regular bf16 forward, BitLinear with the
   int8 GEMM (``model.gemm=int8``), with the FP8 GEMM (``fp8``) and FP8 with fast accumulation
   (``model.fp8_fast_accum``), plus the raw ``torch._int_mm`` / ``torch._scaled_mm`` kernels; each with
   its relative RMS error against the float32 reference of what it computes (``F.linear`` in fp32 for
   the dense layer, the exact BitLinear forward ``reference_linear`` for the BitLinear variants).
   Then one fwd+bwd "step" of nn.Linear vs BitLinear (bf16, and with the int8 GEMM).
2. ``train``: a SmolLM2-135M-shaped BitNet (random init from ``training.models.SMOLLM2_135M_SHAPE``: no
   hub on the device), Stage 2 and Stage 1.9 (with the same-shaped frozen teacher) wired as
   ``run_pipeline`` wires them (``setup_compute``, the stage loss functions, ``Trainer``), at the
   notebook's effective batch 32 x 512 tokens, for bf16-mixed and bf16-pure, eager and compiled,
   ``model.gemm=auto``: tokens/s, step peak memory and MFU against the GPU's dense bf16 peak.
   FLOPs per token: 6 N + 12 L d T for a trained model (N: all unique parameters, the tied
   embedding counted once as the lm_head GEMM; the attention term of PaLM's MFU, T the sequence
   length), plus 2 N + 4 L d T for the teacher's forward in Stage 1.9.
3. ``batch``: the largest micro-batch that fits (Stage 2 and Stage 1.9, bf16-mixed, eager), searched by
   ``training.batch_size.auto_micro_batch`` over powers of two up to 1024 with real OOMs.
4. ``sweep``: ``sweep run`` of a 2-trial space over a local store, trials on the GPU through the real
   worker (``training.run_trial``): the tiny test model, 10 + 10 steps, run.compile=false (compiling is
   section 2's job), everything else at its CUDA defaults (bf16-mixed, int8 GEMM, auto batch size).

Time budget (``--budget-s``, default 450 s of the 480 s the shell script allows): sections 1, 3 and 4
are small; section 2 runs its variants in priority order (Stage 2 bf16-mixed eager and compiled first)
and reports any it had no time for as "skipped: budget". Targets (issue 15; recorded, never asserted):
Stage 2 compiled >= 25% MFU; a BitLinear step <= 1.15x an nn.Linear step in bf16; the int8 GEMM >= 1.5x
bf16 ``F.linear``.

``--cpu-smoke``: tiny shapes (hidden 64, 2 layers, 64 tokens per GEMM, batch 4 x 32), every section,
one compiled variant (Stage 2 bf16-mixed) with ``backend="eager"`` (dynamo's graph capture of the
autocast wrapper and BitLinear's autograd Functions; inductor's C++ build takes minutes on a CPU), the
micro-batch search against a simulated OOM above 8, and the sweep on the CPU with 2 + 2 steps per trial. Its numbers mean nothing; it proves the script before device time is spent.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.api import compose_config  # noqa: E402
from training.batch_size import auto_micro_batch, peek_batch, tile_batch  # noqa: E402
from training.bitnet import BitLinear  # noqa: E402
from training.bitnet.fp8 import (  # noqa: E402
    E4M3,
    activation_codes,
    emulated_fp8_linear,
    fp8_unavailable_reason,
    reference_linear,
    weight_codes,
)
from training.bitnet.functional import bitlinear_forward  # noqa: E402
from training.bitnet.gemm import CodeGemm, code_gemm_bitlinear, enable_code_gemm  # noqa: E402
from training.bitnet.int8 import int8_unavailable_reason  # noqa: E402
from training.models import SMOLLM2_135M_SHAPE  # noqa: E402
from training.precision import resolve_precision  # noqa: E402
from training.runtime import resolve_device, seed_everything  # noqa: E402
from training.stages import stage1_9 as s19  # noqa: E402
from training.stages import stage2 as s2  # noqa: E402
from training.stages.common import build_data, build_student, maybe_compile, optimizer_for  # noqa: E402
from training.stages.compute_setup import setup_compute  # noqa: E402
from training.stages.trainer import LoopSpec, Trainer  # noqa: E402

log = logging.getLogger("gpu_check")

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name();
# first match wins, so the specific names come first. From NVIDIA's data sheets.
DENSE_BF16_PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.2),  # bf16 with fp32 accumulation
    ("A10G", 70.0),  # AWS's A10 variant; NVIDIA lists 125 for the A10 (the A10G runs lower clocks)
    ("A10", 125.0),
]
SMOLLM2_LAYERS = [
    ("q_proj/o_proj 576->576", 576, 576),
    ("k_proj/v_proj 576->192", 576, 192),
    ("gate/up_proj 576->1536", 576, 1536),
    ("down_proj 1536->576", 1536, 576),
]
SMOKE_LAYERS = [("q 64->64", 64, 64), ("k 64->32", 64, 32), ("up 64->128", 64, 128), ("down 128->64", 128, 64)]
SMOKE_SHAPE = {**SMOLLM2_135M_SHAPE, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 64}  # fmt: skip
# The tiny test spec of tests/conftest.py (builds in seconds, cached by its hash like model=tiny).
TINY_SPEC = ["model.tiny.vocab_size=512", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=192",
             "model.tiny.num_layers=2", "model.tiny.num_heads=4", "model.tiny.num_kv_heads=2",
             "model.tiny.seq_len=64", "model.tiny.pretrain_steps=60", "model.tiny.batch_size=16",
             "data.seq_len=64", "data.eval_blocks=8", "data.eval_batch_size=4"]  # fmt: skip


# -- helpers ----------------------------------------------------------------------------------------
def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no GPU: no MFU"
    name = torch.cuda.get_device_name(device)
    for key, value in DENSE_BF16_PEAK_TFLOPS:
        if key in name:
            return value, f"dense bf16 peak of {key}"
    return None, f"unknown GPU {name!r}: pass --peak-tflops for MFU"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median-free mean ms per call: CUDA events on a GPU, perf_counter on a CPU; warm-up first."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    return float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp(min=1e-30))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def row(section: str, variant: str, **fields: Any) -> dict[str, Any]:
    return {"section": section, "variant": variant, **fields}


class Report:
    """The rows and the JSON file, rewritten after every section (atomically)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.data = path, {**meta, "rows": [], "sections": {}}
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        self.data["rows"].extend(rows)
        self.data["sections"][section] = {"rows": len(rows), **(extra or {})}
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


# -- 1. GEMMs ---------------------------------------------------------------------------------------
def gemm_section(device: torch.device, smoke: bool, peak: float | None) -> list[dict[str, Any]]:
    tokens = 64 if smoke else 8192
    iters = 3 if smoke else 50
    layers = SMOKE_LAYERS if smoke else SMOLLM2_LAYERS
    int8_reason, fp8_reason = int8_unavailable_reason(device), fp8_unavailable_reason(device)
    if smoke:
        fp8_reason = None  # CPU torch runs _scaled_mm (fp8_unavailable_reason speaks for model.gemm=fp8)
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, k, n in layers:
        x = torch.randn(tokens, k, generator=g)
        x[:, : max(1, k // 128)] *= 20.0  # a few outlier channels, as in LLM activations
        w = torch.randn(n, k, generator=g) * 0.02
        rows.extend(_shape_rows(name, x, w, device, iters, peak, int8_reason, fp8_reason))
    return rows


def _shape_rows(name, x, w, device, iters, peak, int8_reason, fp8_reason) -> list[dict[str, Any]]:
    """Every GEMM variant on one projection shape (see the module doc)."""
    rows: list[dict[str, Any]] = []
    (tokens, k), n = x.shape, w.shape[0]
    xb, wb = x.to(device, torch.bfloat16), w.to(device, torch.bfloat16)
    flops = 2.0 * tokens * k * n
    dense_ref = F.linear(xb.float(), wb.float())
    exact = reference_linear(xb, wb)  # BitLinear's exact lambda = 1 forward, float32
    a, s_x = activation_codes(xb)
    t, s_w = weight_codes(wb)
    a_i8, t_i8 = a.to(torch.int8), t.to(torch.int8)
    inv = s_x.reciprocal().float().reshape(-1, 1).contiguous()
    sw = s_w.float().reshape(1, 1).expand(1, n).contiguous()
    variants: dict[str, tuple[Any, Any, str | None]] = {
        # name: (callable, reference for the error or None, reason it cannot run)
        "linear_bf16": (lambda: F.linear(xb, wb), dense_ref, None),
        "bitlinear_bf16": (lambda: bitlinear_forward(xb, wb, None, lam=1.0), exact, None),
        "bitlinear_int8": (
            lambda: code_gemm_bitlinear(xb, wb, None, eps=1e-5, gemm=CodeGemm("int8")), exact, int8_reason),
        "bitlinear_fp8": (
            lambda: code_gemm_bitlinear(xb, wb, None, eps=1e-5, gemm=CodeGemm("fp8")), exact, fp8_reason),
        "bitlinear_fp8_fast_accum": (
            lambda: code_gemm_bitlinear(xb, wb, None, eps=1e-5, gemm=CodeGemm("fp8", fp8_fast_accum=True)),
            exact, fp8_reason),
        "raw _int_mm": (lambda: torch._int_mm(a_i8, t_i8.t()), None, int8_reason),
        "raw _scaled_mm": (lambda: _scaled(a, t, inv, sw, False), None, fp8_reason),
        "raw _scaled_mm fast_accum": (lambda: _scaled(a, t, inv, sw, True), None, fp8_reason),
    }  # fmt: skip
    base_ms = None
    for vname, (fn, ref, reason) in variants.items():
        r = row("gemm", f"{name} {vname}", M=tokens, K=k, N=n)
        if reason is not None:
            r["note"] = f"skipped: {reason}"
            rows.append(r)
            continue
        try:
            ms = time_ms(fn, device, iters)
            out = fn()
            r.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
            if peak:
                r["pct_of_peak"] = 100 * r["tflops"] / peak
            if vname == "linear_bf16":
                base_ms = ms
            if base_ms:
                r["x_baseline"] = base_ms / ms  # speed-up over bf16 F.linear (>1: faster)
            if ref is not None:
                r["rel_err"] = rel_rms(out, ref)  # bf16 outputs: includes their 2^-9 relative rounding
            elif vname == "raw _int_mm":
                exact_sums = a.double().cpu() @ t.double().cpu().t()
                r["max_abs_err"] = float((out.double().cpu() - exact_sums).abs().max())
                r["note"] = f"integer sums vs float64 sums of the codes: max abs err {r['max_abs_err']:g}"
            else:
                r["rel_err"] = rel_rms(out, emulated_fp8_linear(xb, wb))
                r["note"] = "error vs exact sums of the e4m3 codes"
        except Exception as exc:  # a kernel that fails on this device is a result
            r["note"] = f"failed: {first_line(exc)}"
        rows.append(r)
    rows.extend(_step_rows(name, k, n, xb, device, iters, int8_reason))
    return rows


def _scaled(a, t, inv, sw, fast: bool) -> torch.Tensor:
    return torch._scaled_mm(a.to(E4M3), t.to(E4M3).t(), scale_a=inv, scale_b=sw, out_dtype=torch.bfloat16,
                            use_fast_accum=fast)  # fmt: skip


def _step_rows(name, k, n, xb, device, iters, int8_reason) -> list[dict[str, Any]]:
    """One fwd+bwd of a bf16 nn.Linear vs BitLinear (regular, and with the int8 GEMM): the <= 1.15x target."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(k, n, bias=False).to(device, torch.bfloat16)
    bit = BitLinear.from_linear(dense)
    bit8 = BitLinear.from_linear(dense)
    enable_code_gemm(bit8, CodeGemm("int8"))
    x = xb.detach().clone().requires_grad_()
    g = torch.randn(xb.shape[0], n, device=device, dtype=torch.bfloat16)
    out, base = [], None
    for label, layer, reason in (("nn.Linear step", dense, None), ("BitLinear step", bit, None),
                                 ("BitLinear int8 step", bit8, int8_reason)):  # fmt: skip
        r = row("gemm", f"{name} {label}", M=xb.shape[0], K=k, N=n)
        if reason:
            r["note"] = f"skipped: {reason}"
            out.append(r)
            continue

        def step(layer=layer):
            layer(x).backward(g)

        try:
            ms = time_ms(step, device, iters)
            base = base or ms
            r.update(ms=ms, tflops=3 * 2.0 * xb.shape[0] * k * n / (ms * 1e-3) / 1e12, x_baseline=base / ms)
            r["note"] = "fwd+bwd; x_baseline = nn.Linear time / this time"
        except Exception as exc:
            r["note"] = f"failed: {first_line(exc)}"
        out.append(r)
    return out


# -- 2. training throughput -------------------------------------------------------------------------
def flops_per_token(shape: dict[str, int], n_params: int, seq: int, stage: str) -> float:
    attn = 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq
    f = 6 * n_params + attn
    if stage == "stage1_9":
        f += 2 * n_params + attn / 3  # the frozen teacher's forward
    return float(f)


def build_teacher(shape: dict[str, int], tokenizer, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig

    from training.models import build_model_from_config

    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = build_model_from_config(config, seed=seed).to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_trainer(cfg, stage: str, precision_name: str, compiled: bool, shape, tokenizer, data, device,
                 smoke: bool) -> tuple[Trainer, torch.nn.Module, int]:  # fmt: skip
    """A Trainer for ``stage`` wired as run_pipeline wires it; returns (trainer, student, n_params)."""
    cfg = copy.deepcopy(cfg)
    cfg.run.precision = precision_name
    precision = resolve_precision(precision_name, device)
    teacher = build_teacher(shape, tokenizer, device, precision.param_dtype)
    student = build_student(cfg, teacher)
    model = student.model
    setup_compute(cfg, model, teacher, device, precision)
    if not compiled:
        fwd = model
    elif smoke:
        fwd = torch.compile(model, backend="eager")  # dynamo's graph capture only: no C++ build on a CPU
    else:
        cfg.run.compile = "true"
        fwd = maybe_compile(model, cfg, device)
    c = cfg[stage]
    opt, sched = optimizer_for(c, model)
    spec = LoopSpec(stage=stage, max_steps=0, grad_accum=c.grad_accum, grad_clip=c.grad_clip, log_every=10**9)
    if stage == "stage1_9":
        loss = s19.make_loss_fn(cfg, fwd, teacher)
        loader = copy.deepcopy(data.stage1_9)
    else:
        loss = s2.make_loss_fn(fwd)
        loader = copy.deepcopy(data.stage2)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return Trainer(spec, model, opt, sched, loader, loss, device=device), teacher, n_params


def run_steps(trainer: Trainer, n: int, device: torch.device) -> float:
    trainer.spec.max_steps = trainer.step + n
    sync(device)
    t0 = time.perf_counter()
    res = trainer.fit()
    sync(device)
    if res.status != "completed":
        raise RuntimeError(f"{res.status}: {res.reason}")
    return time.perf_counter() - t0


TRAIN_ORDER = [  # (stage, precision, compiled), most wanted first (the MFU target is Stage 2 compiled)
    ("stage2", "bf16-mixed", False),
    ("stage2", "bf16-mixed", True),
    ("stage2", "bf16-pure", False),
    ("stage1_9", "bf16-mixed", False),
    ("stage1_9", "bf16-pure", False),
    ("stage1_9", "bf16-mixed", True),
    ("stage2", "bf16-pure", True),
    ("stage1_9", "bf16-pure", True),
]


def train_section(args, device, peak, deadline: float, setup) -> list[dict[str, Any]]:
    cfg, shape, tokenizer, data = setup
    seq, batch = cfg.data.seq_len, cfg.stage2.batch_size
    rows = []
    wanted = {v.strip() for v in args.train_variants.split(",") if v.strip()}
    for stage, prec, compiled in TRAIN_ORDER:
        name = f"{stage} {prec} {'compiled' if compiled else 'eager'}"
        if wanted and name not in wanted:
            continue
        r = row("train", name, batch=f"{batch}x{seq}")
        need = args.compiled_cost_s if compiled else args.eager_cost_s
        if args.cpu_smoke and compiled and any("compiled" in x["variant"] for x in rows):
            r["note"] = "skipped in --cpu-smoke: one compiled variant (backend=eager) checks the graph capture"
            rows.append(r)
            continue
        if time.monotonic() + need > deadline:
            r["note"] = f"skipped: budget (needs ~{need:.0f}s, {max(0, deadline - time.monotonic()):.0f}s left)"
            rows.append(r)
            continue
        t_start = time.monotonic()
        trainer = teacher = None
        try:
            trainer, teacher, n_params = make_trainer(cfg, stage, prec, compiled, shape, tokenizer, data,
                                                      device, args.cpu_smoke)  # fmt: skip
            warm = run_steps(trainer, args.warmup, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base_mem = torch.cuda.memory_allocated(device)
            times = [run_steps(trainer, 1, device) for _ in range(args.steps)]
            step_s = statistics.median(times)
            tokens = batch * trainer.spec.grad_accum * seq
            fpt = flops_per_token(shape, n_params, seq, stage)
            r.update(ms=step_s * 1e3, tokens_per_s=tokens / step_s, tflops=fpt * tokens / step_s / 1e12,
                     warmup_s=warm, params=n_params)  # fmt: skip
            if peak:
                r["mfu_pct"] = 100 * r["tflops"] / peak
            if device.type == "cuda":
                r["step_peak_gib"] = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**30
            r["note"] = f"{args.warmup} warm-up steps {warm:.1f}s, median of {args.steps}"
        except Exception as exc:  # a failing variant (compile error, OOM) is a result, not a crash
            r["note"] = f"failed: {first_line(exc)}"
            traceback.print_exc()
        finally:
            del trainer, teacher
            if compiled:
                torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r["seconds"] = time.monotonic() - t_start
        print(f"  train {name}: {r.get('note', '')}", flush=True)
        rows.append(r)
    eager = {(r["variant"].split()[0], r["variant"].split()[1]): r for r in rows if "eager" in r["variant"]}
    for r in rows:
        base = eager.get((r["variant"].split()[0], r["variant"].split()[1]))
        if "ms" in r and base and "ms" in base:
            r["x_baseline"] = base["ms"] / r["ms"]  # speed-up over the eager run of the same stage/precision
    return rows


def train_setup(args, device):
    """The config, model shape, tokenizer and data every train/batch variant shares."""
    from training.data import load_texts
    from training.data.tokenizer import train_bpe_tokenizer

    shape = SMOKE_SHAPE if args.cpu_smoke else SMOLLM2_135M_SHAPE
    seq, batch = (32, 4) if args.cpu_smoke else (512, 32)
    steps = args.warmup + args.steps + 2
    cfg = compose_config([f"run.device={device}", f"data.seq_len={seq}", "stage2.lambda_warmup.enabled=false",
                          f"stage1_9.batch_size={batch}", f"stage2.batch_size={batch}", "data.eval_blocks=4",
                          f"stage1_9.max_steps={steps}", f"stage2.max_steps={steps}"])  # fmt: skip
    seed_everything(cfg.run.seed)
    # A BPE trained on the built-in corpus: only its first ids of the vocabulary occur, which does not
    # change a step's cost (every logit is computed).
    tokenizer = train_bpe_tokenizer(load_texts("builtin"), 512 if args.cpu_smoke else 2048)
    data = build_data(cfg, tokenizer)
    return cfg, shape, tokenizer, data


# -- 3. the largest micro-batch ---------------------------------------------------------------------
def batch_section(args, device, setup) -> list[dict[str, Any]]:
    cfg, shape, tokenizer, data = setup
    rows = []
    effective = 16 if args.cpu_smoke else 1024
    for stage in ("stage2", "stage1_9"):
        r = row("batch", f"{stage} largest micro-batch (bf16-mixed, eager)")
        t0 = time.monotonic()
        trainer = teacher = None
        try:
            trainer, teacher, _ = make_trainer(cfg, stage, "bf16-mixed", False, shape, tokenizer, data, device,
                                               args.cpu_smoke)  # fmt: skip
            sample = peek_batch(trainer.loader)
            plan = auto_micro_batch(
                trainer.model, trainer.optimizer, trainer.loss_fn, lambda n, s=sample: tile_batch(s, n), effective,
                device=device, start=32 if not args.cpu_smoke else 2,
                simulate_oom_above=8 if args.cpu_smoke else None,
            )  # fmt: skip
            r.update(micro_batch=plan.micro_batch, tokens_per_micro_batch=plan.micro_batch * cfg.data.seq_len,
                     trials=" ".join(f"{n}:{'ok' if ok else 'oom'}" for n, ok in plan.trials))  # fmt: skip
            cap = "simulated OOM above 8 (CPU)" if args.cpu_smoke else f"real OOM, searched up to {effective}"
            r["note"] = f"{cap}; seq {cfg.data.seq_len}; probes: {r['trials']}"
            if device.type == "cuda":
                r["gpu_total_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        except Exception as exc:
            r["note"] = f"failed: {first_line(exc)}"
            traceback.print_exc()
        finally:
            del trainer, teacher
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r["seconds"] = time.monotonic() - t0
        print(f"  batch {stage}: {r.get('note', '')}", flush=True)
        rows.append(r)
    return rows


# -- 4. a 2-trial sweep through the real worker -----------------------------------------------------
def sweep_section(args, device, scratch: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    steps, batch = (2, 2) if args.cpu_smoke else (10, 8)
    import yaml

    from training.models import TinyModelSpec, ensure_tiny_teacher

    work = scratch / "sweep"
    work.mkdir(parents=True, exist_ok=True)
    spec = {kv.split("=")[0].removeprefix("model.tiny."): kv.split("=")[1] for kv in TINY_SPEC
            if kv.startswith("model.tiny.")}  # fmt: skip
    ensure_tiny_teacher(TinyModelSpec(**{k: int(v) for k, v in spec.items()}))  # once, before the trials
    name = f"gpu_check_{int(time.time())}"
    space = {
        "name": name,
        "objective": {"metric": "final_eval_loss", "goal": "minimize"},
        "budget": {"trials": 2, "sobol_trials": 2, "seed": 0},
        "base_overrides": [*TINY_SPEC, f"stage1_9.max_steps={steps}", f"stage2.max_steps={steps}",
                           f"stage2.lambda_warmup.warmup_steps={steps // 2}", f"stage1_9.batch_size={batch}",
                           f"stage2.batch_size={batch}", "run.compile=false", "stage1_9.log_every=5",
                           "stage2.log_every=5"],
        "parameters": {"stage2_lr": {"type": "float", "low": 1e-3, "high": 8e-3, "log": True,
                                     "override": "stage2.optimizer.lr"}},
        "trial": {"max_attempts": 1, "heartbeat_s": 5, "grace_s": 120},
    }  # fmt: skip
    space_file = work / "space.yaml"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cli = [sys.executable, "-m", "sweep.cli"]
    t0 = time.monotonic()
    run = subprocess.run([*cli, "run", "--space", str(space_file), "--store", str(work / "store"), "--workers", "2",
                          "--workdir", str(work / "workers"), "--poll", "0.5"],
                         capture_output=True, text=True, env=env, timeout=args.sweep_timeout_s, cwd=REPO)  # fmt: skip
    run_s = time.monotonic() - t0
    rep = subprocess.run([*cli, "report", "--store", str(work / "store" / name), "--out", str(work / "report"),
                          "--no-ax"], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)  # fmt: skip
    trials = []
    csv_path = work / "report" / "trials.csv"
    if csv_path.is_file():
        trials = list(csv.DictReader(csv_path.open()))
    states = [t.get("state") for t in trials]
    losses = [t.get("final_eval_loss") for t in trials]
    r = row("sweep", "sweep run: 2 trials, 2 workers, local store", seconds=run_s, rc=run.returncode,
            note=f"rc {run.returncode}, report rc {rep.returncode}, trial states {states}, final_eval_loss {losses}")  # fmt: skip
    detail = {
        "space": space,
        "run_stdout_tail": run.stdout[-4000:],
        "run_stderr_tail": run.stderr[-4000:],
        "report_stderr_tail": rep.stderr[-2000:],
        "trials": trials,
        "ok": run.returncode == 0 and len(trials) == 2 and set(states) == {"completed"},
    }
    return [r], detail


# -- targets and the table --------------------------------------------------------------------------
def target_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def find(section, pred):
        return [r for r in rows if r["section"] == section and pred(r["variant"])]

    out = []
    s2c = find("train", lambda v: v == "stage2 bf16-mixed compiled")
    mfu = s2c[0].get("mfu_pct") if s2c else None
    out.append(row("target", "Stage 2 compiled >= 25% MFU", measured=mfu,
                   met=None if mfu is None else mfu >= 25.0))  # fmt: skip
    ratios = []
    for lin in find("gemm", lambda v: v.endswith("nn.Linear step")):
        prefix = lin["variant"].removesuffix(" nn.Linear step")
        bit = find("gemm", lambda v, p=prefix: v == f"{p} BitLinear step")
        if "ms" in lin and bit and "ms" in bit[0]:
            ratios.append(bit[0]["ms"] / lin["ms"])
    worst = max(ratios) if ratios else None
    out.append(row("target", "BitLinear step <= 1.15x nn.Linear step (bf16, worst shape)", measured=worst,
                   met=None if worst is None else worst <= 1.15))  # fmt: skip
    speed = [r["x_baseline"] for r in find("gemm", lambda v: v.endswith(" raw _int_mm")) if "x_baseline" in r]
    layer = [r["x_baseline"] for r in find("gemm", lambda v: v.endswith(" bitlinear_int8")) if "x_baseline" in r]
    low = min(speed) if speed else None
    out.append(row("target", "int8 GEMM >= 1.5x bf16 F.linear (raw _int_mm, worst shape)", measured=low,
                   met=None if low is None else low >= 1.5,
                   note=None if not layer else f"whole int8 BitLinear forward: worst {min(layer):.2f}x"))  # fmt: skip
    return out


COLUMNS = [("section", "section", "s"), ("variant", "variant", "s"), ("ms", "ms", ".3f"),
           ("tokens_per_s", "tokens/s", ".0f"), ("tflops", "TFLOP/s", ".1f"), ("mfu_pct", "MFU %", ".1f"),
           ("x_baseline", "x base", ".2f"), ("rel_err", "rel err", ".2e"), ("micro_batch", "micro-batch", "d"),
           ("measured", "measured", ".3g"), ("met", "met", "s"), ("note", "note", "s")]  # fmt: skip


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| " + " | ".join(h for _, h, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        cells = []
        for key, _, spec in COLUMNS:
            v = r.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("-")
            elif spec == "s":
                cells.append(str(v).replace("|", "/"))
            else:
                cells.append(format(v, spec))
        print("| " + " | ".join(cells) + " |")


# -- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=REPO / "runs" / "gpu_check.json")
    p.add_argument("--scratch", type=Path, default=REPO / "runs" / "gpu_check_scratch",
                   help="sweep store, worker logs, report")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU shapes, every code path; numbers meaningless")
    p.add_argument("--device", default="auto")
    p.add_argument("--budget-s", type=float, default=450.0)
    p.add_argument("--sections", default="gemm,train,batch,sweep")
    p.add_argument("--steps", type=int, default=None, help="timed steps per train variant (default 8; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (compiles; default 3; smoke 1)")
    p.add_argument("--eager-cost-s", type=float, default=20.0, help="budget an eager train variant needs")
    p.add_argument("--compiled-cost-s", type=float, default=90.0, help="budget a compiled train variant needs")
    p.add_argument("--sweep-timeout-s", type=float, default=240.0)
    p.add_argument("--train-variants", default="",
                   help="comma-separated train variants to run, e.g. 'stage1_9 bf16-mixed compiled,stage2 bf16-pure "
                        "compiled' (default: all, in priority order, as the budget allows)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by name)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t0 = time.monotonic()
    if args.cpu_smoke:
        args.device = "cpu"
        args.steps = args.steps or 2
        args.warmup = args.warmup or 1
        args.eager_cost_s = args.compiled_cost_s = 0.0
        torch.set_num_threads(min(2, torch.get_num_threads()))
    args.steps = args.steps or 8
    args.warmup = args.warmup or 3
    device = resolve_device(args.device)
    # The float32 references must stay float32 (TF32 would give them a 10-bit mantissa).
    torch.backends.cuda.matmul.allow_tf32 = False
    peak, peak_note = peak_tflops(device, args.peak_tflops)
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "gpu_total_gib": torch.cuda.get_device_properties(device).total_memory / 2**30
        if device.type == "cuda" else None,
        "dense_bf16_peak_tflops": peak,
        "peak_note": peak_note,
        "int8_gemm": int8_unavailable_reason(device) or "available",
        "fp8_gemm": fp8_unavailable_reason(device) or "available",
        "cpu_smoke": args.cpu_smoke,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    print(f"gpu_check: {env['device_name']} ({device}), torch {env['torch']}, peak {peak} TFLOP/s "
          f"({peak_note}); int8 {env['int8_gemm']}; fp8 {env['fp8_gemm']}", flush=True)  # fmt: skip
    report = Report(args.json, {"env": env, "budget_s": args.budget_s})
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    end = t0 + args.budget_s
    setup = None
    if "gemm" in sections:
        report.add("gemm", gemm_section(device, args.cpu_smoke, peak))
        print(f"gemm done at {time.monotonic() - t0:.0f}s", flush=True)
    if "train" in sections or "batch" in sections:
        setup = train_setup(args, device)
    if "train" in sections:
        reserve = (60.0 if "batch" in sections else 0.0) + (110.0 if "sweep" in sections else 0.0)
        report.add("train", train_section(args, device, peak, end - (0 if args.cpu_smoke else reserve), setup))
        print(f"train done at {time.monotonic() - t0:.0f}s", flush=True)
    if "batch" in sections:
        report.add("batch", batch_section(args, device, setup))
        print(f"batch done at {time.monotonic() - t0:.0f}s", flush=True)
    if "sweep" in sections:
        left = end - time.monotonic()
        if left < 60 and not args.cpu_smoke:
            report.add("sweep", [row("sweep", "sweep run", note=f"skipped: budget ({left:.0f}s left)")])
        else:
            args.sweep_timeout_s = min(args.sweep_timeout_s, max(left, 60.0)) if not args.cpu_smoke else 600
            try:
                rows, detail = sweep_section(args, device, args.scratch)
            except Exception as exc:
                rows, detail = [row("sweep", "sweep run", note=f"failed: {first_line(exc)}")], {"ok": False}
            report.add("sweep", rows, detail)
        print(f"sweep done at {time.monotonic() - t0:.0f}s", flush=True)
    targets = target_rows(report.data["rows"])
    report.data["rows"].extend(targets)
    report.data["seconds"] = time.monotonic() - t0
    report.write()
    print()
    print_table(report.data["rows"])
    print(f"\n{len(report.data['rows'])} rows in {report.data['seconds']:.0f}s; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
