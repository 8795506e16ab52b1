"""Training throughput (tokens/s, steps/s) and per-step peak memory of Stage 1.9 and Stage 2.

Every variant is built with the pipeline's own code path (training.stages.common: build_data,
build_student, lambda_schedule, optimizer_for, maybe_compile; the stage loss functions of
training.stages.stage1_9 / stage2; training.stages.trainer.Trainer), so what is timed is exactly
what ``run_pipeline`` runs per optimizer step: batch fetch, teacher forward (Stage 1.9), student
forward + backward, grad clipping, the Muon/AdamW step, the LR scheduler and the lambda hook.

Models:
- ``tiny``: the cached tiny teacher (``model=tiny``; fp32 on CPU);
- ``smollm2-135m``: a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads, 3 KV heads,
  intermediate 1536, vocab 49152, tied embeddings) built from its config with random weights (no
  download), bf16 on CUDA. Its text is tokenised with a small BPE trained on the built-in corpus,
  so only the first ids of the 49152-entry vocabulary occur; the cost of a step does not depend on
  which ids occur.

Timing: each variant first runs ``--warmup`` untimed steps (torch.compile compiles there; that time
is reported as "warmup s"), then the variants take turns running ``--chunk`` steps each, the order
rotating every round, until each has ``--steps`` timed steps: load drift on a shared machine hits
all variants alike. "paired x" is the median over rounds of (this variant's step time / the eager
variant of the same stage's step time in the same round).

Peak memory ("step peak MiB"): on CPU, the torch.profiler (``profile_memory=True``) allocator events
of one extra steady-state step give the high-water mark of tensor bytes held above the level at the
start of the step, i.e. activations kept for backward, gradients and temporaries (weights, teacher and
optimizer state are already resident and reported separately as "resident MiB", summed from the
tensors). This separates variants that share one process; ``ru_maxrss`` is a process-wide high-water
mark that would need one subprocess per variant and also counts Python, the tokenizer, torch's
caches and inductor's compiler. On CUDA: ``torch.cuda.max_memory_allocated`` over one step minus
``memory_allocated`` at its start (same meaning).

    .venv/bin/python scripts/bench_training.py --out runs/bench_training.json
    # on a CUDA machine (the notebook's anchor: 10.4 steps/s eager, 14.4 compiled on an A10G):
    python scripts/bench_training.py --device cuda --model smollm2-135m --out runs/bench_training_cuda.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.api import compose_config  # noqa: E402
from training.models import SMOLLM2_135M_SHAPE  # noqa: E402
from training.precision import resolve_precision  # noqa: E402
from training.runtime import resolve_device, seed_everything  # noqa: E402
from training.stages import stage1_9 as s19  # noqa: E402
from training.stages import stage2 as s2  # noqa: E402
from training.stages.common import (  # noqa: E402
    build_data,
    build_student,
    enable_gradient_checkpointing,
    lambda_schedule,
    load_teacher,
    maybe_compile,
    optimizer_for,
)
from training.stages.compute_setup import setup_compute  # noqa: E402
from training.stages.trainer import LoopSpec, Trainer  # noqa: E402

STAGES = ("stage1_9", "stage2")
SMOLLM2_135M = SMOLLM2_135M_SHAPE


@dataclass
class Variant:
    name: str
    stage: str
    compiled: bool
    trainer: Trainer
    tokens_per_step: int
    resident_bytes: int
    warmup_s: float = 0.0
    step_times: list[float] = field(default_factory=list)  # one entry per timed chunk, seconds per step
    peak_bytes: int | None = None
    error: str | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _resident_bytes(model, teacher, optimizer, stage: str) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    if stage == "stage1_9":
        tensors += [*teacher.parameters(), *teacher.buffers()]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return _tensor_bytes(tensors)


def _overrides(args) -> list[str]:
    steps = args.warmup + args.steps + 1  # +1: the memory step; the scheduler horizon covers every step
    over = [
        "model=tiny",
        f"run.compile_mode={args.compile_mode}",
        f"stage1_9.max_steps={steps}",
        f"stage2.max_steps={steps}",
    ]
    if args.batch is not None:
        over += [f"stage1_9.batch_size={args.batch}", f"stage2.batch_size={args.batch}"]
    if args.seq_len is not None:
        over.append(f"data.seq_len={args.seq_len}")
    if args.precision is not None:
        over.append(f"run.precision={args.precision}")
    if not args.stage2_lambda_warmup:
        # Stage 2 at lambda = 1: the regime after warmup (most of a real run). During warmup every new
        # lambda value recompiles a torch.compile'd student (see the doc), so compile would not be steady.
        over.append("stage2.lambda_warmup.enabled=false")
    return over + list(args.override)


def _teacher(args, cfg, device, dtype):
    """The frozen teacher and tokenizer, as training.stages.common.load_teacher returns them."""
    if args.model == "tiny":
        return load_teacher(cfg, device, dtype)
    from transformers import LlamaConfig

    from training.data import load_texts
    from training.data.tokenizer import train_bpe_tokenizer
    from training.models import build_model_from_config

    texts = load_texts(cfg.data.source, path=cfg.data.path, text_field=cfg.data.text_field)
    tokenizer = train_bpe_tokenizer(texts, args.tokenizer_vocab)
    config = LlamaConfig(
        **SMOLLM2_135M,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = build_model_from_config(config, seed=cfg.run.seed).to(device=device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def build_variant(args, cfg, stage: str, compiled: bool, teacher, data, device) -> Variant:
    """One Trainer wired exactly as training.stages.pipeline.run_pipeline wires that stage."""
    cfg = copy.deepcopy(cfg)
    cfg.run.compile = "true" if compiled else "false"
    student = build_student(cfg, teacher)
    model = student.model
    # As run_pipeline prepares the student (single process, no FSDP): run.precision, model.gemm.
    enable_gradient_checkpointing(model, cfg)
    setup_compute(cfg, model, teacher, device, resolve_precision(cfg.run.precision, device))
    fwd = maybe_compile(model, cfg, device)
    c = cfg[stage]
    opt, sched = optimizer_for(c, model)
    # Every log line is also a timing point inside fit(); keep them out of the timed window.
    spec = LoopSpec(stage=stage, max_steps=0, grad_accum=c.grad_accum, grad_clip=c.grad_clip, log_every=10**9)
    if stage == "stage1_9":
        trainer = Trainer(
            spec,
            model,
            opt,
            sched,
            copy.deepcopy(data.stage1_9),
            s19.make_loss_fn(cfg, fwd, teacher),
            device=device,
            before_step=(lambda step: student.saliency.step(model, step)) if student.saliency else None,
        )
    else:
        student.lam.schedule = lambda_schedule(cfg)
        trainer = Trainer(
            spec,
            model,
            opt,
            sched,
            copy.deepcopy(data.stage2),
            s2.make_loss_fn(fwd),
            device=device,
            before_step=student.lam.set_step,
        )
    tokens = c.batch_size * c.grad_accum * cfg.data.seq_len
    name = f"{stage} {'compiled' if compiled else 'eager'}"
    return Variant(name, stage, compiled, trainer, tokens, 0)


def run_steps(v: Variant, n: int, device: torch.device) -> float:
    """Run ``n`` optimizer steps through Trainer.fit; seconds elapsed (device synchronised)."""
    v.trainer.spec.max_steps = v.trainer.step + n
    _sync(device)
    start = time.perf_counter()
    result = v.trainer.fit()
    _sync(device)
    elapsed = time.perf_counter() - start
    if result.status != "completed":
        raise RuntimeError(f"{v.name}: {result.status}: {result.reason}")
    return elapsed


def peak_step_bytes(v: Variant, device: torch.device) -> int:
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_steps(v, 1, device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_steps(v, 1, device)
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def summarise(variants: list[Variant]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    eager = {v.stage: v for v in variants if not v.compiled and not v.error}
    for v in variants:
        if v.error:
            rows[v.name] = {
                "stage": v.stage,
                "compiled": v.compiled,
                "error": v.error,
                "warmup_s": v.warmup_s,
            }
            continue
        med = statistics.median(v.step_times)
        q1, q3 = _quartiles(v.step_times)
        base = eager.get(v.stage)
        paired = None
        if base is not None and len(base.step_times) == len(v.step_times):
            paired = statistics.median(t / b for t, b in zip(v.step_times, base.step_times))
        rows[v.name] = {
            "stage": v.stage,
            "compiled": v.compiled,
            "median_step_s": med,
            "q1_step_s": q1,
            "q3_step_s": q3,
            "steps_per_s": 1.0 / med,
            "tokens_per_s": v.tokens_per_step / med,
            "tokens_per_step": v.tokens_per_step,
            "time_ratio_vs_eager": med / statistics.median(base.step_times) if base else None,
            "paired_time_ratio_vs_eager": paired,
            "warmup_s": v.warmup_s,
            "step_peak_bytes": v.peak_bytes,
            "resident_bytes": v.resident_bytes,
            "chunk_step_times_s": v.step_times,
        }
    return rows


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    header = (
        "variant",
        "tokens/s",
        "steps/s",
        "median ms/step (IQR)",
        "x eager",
        "paired x",
        "warmup s",
        "step peak MiB",
        "resident MiB",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:120]} |" + " |" * (len(header) - 2))
            continue

        def fmt(x, spec):
            return "-" if x is None else format(x, spec)

        cells = (
            name,
            f"{r['tokens_per_s']:.0f}",
            f"{r['steps_per_s']:.2f}",
            f"{r['median_step_s'] * 1e3:.0f} ({r['q1_step_s'] * 1e3:.0f}-{r['q3_step_s'] * 1e3:.0f})",
            fmt(r["time_ratio_vs_eager"], ".2f"),
            fmt(r["paired_time_ratio_vs_eager"], ".2f"),
            f"{r['warmup_s']:.1f}",
            fmt(None if r["step_peak_bytes"] is None else r["step_peak_bytes"] / 2**20, ".1f"),
            f"{r['resident_bytes'] / 2**20:.1f}",
        )
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_training.json"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--model",
        default="auto",
        choices=("auto", "tiny", "smollm2-135m"),
        help="auto: tiny on CPU, the SmolLM2-135M shape on CUDA",
    )
    parser.add_argument(
        "--compile",
        default="both",
        choices=("off", "on", "both"),
        help="variants: eager only, compiled only, or both (torch.compile via run.compile=true)",
    )
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument(
        "--stages", default=",".join(STAGES), help="comma-separated subset of stage1_9,stage2"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (after warmup)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--chunk", type=int, default=2, help="steps a variant runs per turn")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the stage configs' 32)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 128 (tiny), 512 (smollm2-135m)")
    parser.add_argument(
        "--precision", default=None, help="run.precision (default auto: fp32 CPU, bf16-mixed CUDA)"
    )
    parser.add_argument("--tokenizer-vocab", type=int, default=2048, help="BPE vocab for smollm2-135m data")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on CPU, where a shared machine stalls multi-thread steps)",
    )
    parser.add_argument(
        "--stage2-lambda-warmup",
        action="store_true",
        help="time Stage 2 inside its lambda warmup (config schedule) instead of at lambda = 1",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory step")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    device = resolve_device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.model == "auto":
        args.model = "smollm2-135m" if device.type == "cuda" else "tiny"
    if args.model == "smollm2-135m" and args.seq_len is None:
        args.seq_len = 512
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not set(stages) <= set(STAGES):
        parser.error(f"--stages: choose from {STAGES}")
    compiled_opts = {"off": [False], "on": [True], "both": [False, True]}[args.compile]

    load_start = os.getloadavg()
    cfg = compose_config(_overrides(args) + [f"run.device={device}"])
    precision = resolve_precision(cfg.run.precision, device)
    dtype = precision.param_dtype  # the teacher is loaded in it; setup_compute stores it as precision says
    seed_everything(cfg.run.seed)
    t0 = time.perf_counter()
    teacher, tokenizer = _teacher(args, cfg, device, dtype)
    data = build_data(cfg, tokenizer)
    n_params = sum(p.numel() for p in teacher.parameters())
    print(
        f"model {args.model}: {n_params / 1e6:.2f}M params, {precision.name} (params {dtype}), device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"batch {cfg.stage2.batch_size}x{cfg.data.seq_len}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load avg {load_start[0]:.1f} (setup {time.perf_counter() - t0:.0f}s)",
        flush=True,
    )

    variants: list[Variant] = []
    for stage in stages:
        for compiled in compiled_opts:
            v = build_variant(args, cfg, stage, compiled, teacher, data, device)
            t = v.trainer
            variants.append(v)
            try:
                start = time.perf_counter()
                run_steps(v, args.warmup, device)
                v.warmup_s = time.perf_counter() - start
            except Exception as e:  # a compile failure is a result to report, not a crash
                v.warmup_s = time.perf_counter() - start
                v.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                traceback.print_exc()
            v.resident_bytes = _resident_bytes(t.model, teacher, t.optimizer, stage)
            status = v.error or "ok"
            print(f"  warmup {v.name}: {args.warmup} steps in {v.warmup_s:.1f}s ({status})", flush=True)

    live = [v for v in variants if not v.error]
    rounds = -(-args.steps // args.chunk)
    timed_start = time.perf_counter()
    for r in range(rounds):
        n = min(args.chunk, args.steps - r * args.chunk)
        k = r % len(live)
        for v in live[k:] + live[:k]:
            v.step_times.append(run_steps(v, n, device) / n)
    timed_s = time.perf_counter() - timed_start
    if not args.no_memory:
        for v in live:
            v.peak_bytes = peak_step_bytes(v, device)

    from torch._dynamo.utils import counters

    dynamo = {k: dict(counters[k]) for k in ("stats", "recompiles", "graph_break") if k in counters}
    load_end = os.getloadavg()
    rows = summarise(variants)
    print(
        f"\n{args.steps} timed steps per variant in chunks of {args.chunk}, interleaved "
        f"({timed_s:.0f}s); load avg {load_start[0]:.1f} -> {load_end[0]:.1f}\n"
    )
    print_table(rows)
    if dynamo:
        print(f"\ndynamo counters: {json.dumps(dynamo)}")

    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_params": n_params,
        "dtype": str(dtype),
        "precision": precision.name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "timed_seconds": timed_s,
        "dynamo_counters": dynamo,
        "variants": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
