"""torch.compile vs eager training steps: steps/s, compile time and gradient equivalence per variant.

The notebook's table (Dec 24, A10G) on this code: each variant is a Trainer wired as
``run_pipeline`` wires the chosen stage (training.stages.common builders, the stage's loss, MuonAdamW,
clipping, scheduler), differing only in ``run.compile`` / ``run.compile_mode`` /
``run.gradient_checkpointing``:

    eager | compile default | compile max-autotune-no-cudagraphs | eager + grad ckpt |
    compile default + grad ckpt | (CUDA) compile max-autotune + grad ckpt (CUDA graphs)

Per variant: "compile s" is the wall time of the gradient check (one eager reference step and this
variant's first forward/backward) plus the ``--warmup`` steps: compilation happens there; steps/s comes from ``--steps`` timed steps run in chunks of ``--chunk``, the variants taking
turns with a rotating order, so load drift on a shared machine hits all alike; "paired x" is the
median over rounds of (variant step time / eager step time in the same round). "grad cos" is
``training.testing.compare_gradient_cosine`` against the eager variant on the same batch at the
same (initial) weights: the minimum over parameters, and the relative gradient-norm difference
(the eager row compares two eager copies, so it shows the check's floor: 1 and 0).

    .venv/bin/python scripts/bench_compile.py --out runs/bench_compile_cpu.json      # tiny, CPU, fp32
    python scripts/bench_compile.py --device cuda --out runs/bench_compile_cuda.json  # SmolLM2-135M shape, bf16

On CUDA the model is a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads, 3 KV heads,
vocab 49152) with random weights (no download), its text tokenised with a BPE trained on the
built-in corpus.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.api import compose_config  # noqa: E402
from training.models import SMOLLM2_135M_SHAPE  # noqa: E402
from training.precision import resolve_precision  # noqa: E402
from training.runtime import resolve_device, seed_everything  # noqa: E402
from training.stages import stage1_9 as s19  # noqa: E402
from training.stages import stage2 as s2  # noqa: E402
from training.stages import stage3 as s3  # noqa: E402
from training.stages.common import (  # noqa: E402
    build_data,
    build_student,
    enable_gradient_checkpointing,
    load_teacher,
    maybe_compile,
    optimizer_for,
)
from training.stages.compute_setup import setup_compute  # noqa: E402
from training.stages.trainer import LoopSpec, Trainer  # noqa: E402
from training.testing import compare_gradient_cosine  # noqa: E402

SMOLLM2_135M = SMOLLM2_135M_SHAPE
# (name, compile, mode, gradient checkpointing, CUDA only)
VARIANTS = [
    ("eager", False, "default", False, False),
    ("compile default", True, "default", False, False),
    ("compile max-autotune-no-cudagraphs", True, "max-autotune-no-cudagraphs", False, False),
    ("eager + grad ckpt", False, "default", True, False),
    ("compile default + grad ckpt", True, "default", True, False),
    ("compile max-autotune + grad ckpt", True, "max-autotune", True, True),
]


@dataclass
class Variant:
    name: str
    trainer: Trainer | None = None
    fwd: torch.nn.Module | None = None
    loss_fn: object = None
    warmup_s: float = 0.0
    step_times: list[float] = field(default_factory=list)
    grad_min_cos: float | None = None
    grad_rel_norm: float | None = None
    error: str | None = None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _teacher(args, cfg, device, dtype):
    if args.model == "tiny":
        return load_teacher(cfg, device, dtype)
    from transformers import LlamaConfig

    from training.data import load_texts
    from training.data.tokenizer import train_bpe_tokenizer
    from training.models import build_model_from_config

    tokenizer = train_bpe_tokenizer(load_texts("builtin"), 2048)
    config = LlamaConfig(
        **SMOLLM2_135M,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = build_model_from_config(config, seed=cfg.run.seed).to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def build(args, cfg, base_student, teacher, data, device, spec) -> Variant:
    name, compiled, mode, ckpt, _ = spec
    cfg = copy.deepcopy(cfg)
    cfg.run.compile, cfg.run.compile_mode, cfg.run.gradient_checkpointing = str(compiled).lower(), mode, ckpt
    model = copy.deepcopy(base_student)
    enable_gradient_checkpointing(model, cfg)
    fwd = maybe_compile(model, cfg, device)
    c = cfg[args.stage]
    if args.stage == "stage1_9":
        loss_fn, loader = s19.make_loss_fn(cfg, fwd, teacher), copy.deepcopy(data.stage1_9)
    elif args.stage == "stage2":
        loss_fn, loader = s2.make_loss_fn(fwd), copy.deepcopy(data.stage2)
    else:
        loss_fn, loader = s3.make_loss_fn(cfg, model, teacher, fwd).fn, copy.deepcopy(data.stage3)
    opt, sched = optimizer_for(c, model)
    loop = LoopSpec(stage=args.stage, max_steps=0, grad_accum=1, grad_clip=c.grad_clip, log_every=10**9)
    trainer = Trainer(loop, model, opt, sched, loader, loss_fn, device=device)
    return Variant(name, trainer, fwd, loss_fn)


def run_steps(v: Variant, n: int, device) -> float:
    v.trainer.spec.max_steps = v.trainer.step + n
    _sync(device)
    start = time.perf_counter()
    res = v.trainer.fit()
    _sync(device)
    if res.status != "completed":
        raise RuntimeError(f"{v.name}: {res.status}: {res.reason}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_compile.json"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stage", default="stage2", choices=("stage1_9", "stage2", "stage3"))
    parser.add_argument("--variants", default="", help="comma-separated names (default: all for the device)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None, help="default: 128 (tiny), 512 (smollm2-135m)")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default 1 on CPU)")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    device = resolve_device(args.device)
    if device.type == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    args.model = "smollm2-135m" if device.type == "cuda" else "tiny"
    seq = args.seq_len or (512 if args.model == "smollm2-135m" else 128)
    steps_cfg = args.warmup + args.steps + 1
    cfg = compose_config([
        f"run.device={device}", f"data.seq_len={seq}", "stage2.lambda_warmup.enabled=false",
        *(f"{s}.max_steps={steps_cfg}" for s in ("stage1_9", "stage2", "stage3")),
        *(f"{s}.batch_size={args.batch}" for s in ("stage1_9", "stage2", "stage3")), *args.override,
    ])  # fmt: skip
    precision = resolve_precision(cfg.run.precision, device)
    dtype = precision.param_dtype
    seed_everything(cfg.run.seed)
    teacher, tokenizer = _teacher(args, cfg, device, dtype)
    data = build_data(cfg, tokenizer)
    base = build_student(cfg, teacher).model
    setup_compute(cfg, base, teacher, device, precision)  # as run_pipeline: run.precision, model.gemm
    dtype = f"{precision.name}, {dtype}"
    load0 = os.getloadavg()
    print(f"{args.model} on {device} ({dtype}), {args.stage}, batch {args.batch}x{seq}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {load0[0]:.1f}", flush=True)  # fmt: skip

    wanted = {s.strip() for s in args.variants.split(",") if s.strip()}
    specs = [v for v in VARIANTS if (not v[4] or device.type == "cuda") and (not wanted or v[0] in wanted)]
    probe = {k: v.to(device) for k, v in copy.deepcopy(data.stage2).next_batch().items()}
    ref = build(args, cfg, base, teacher, data, device, VARIANTS[0])  # eager, never trained
    variants: list[Variant] = []
    for spec in specs:
        v = Variant(spec[0])
        start = time.perf_counter()
        try:
            v = build(args, cfg, base, teacher, data, device, spec)
            start = time.perf_counter()
            # Equivalence first, at the initial weights (this compiles the train-mode graph).
            fns = {id(ref.fwd): ref.loss_fn, id(v.fwd): v.loss_fn}
            rep = compare_gradient_cosine(ref.fwd, v.fwd, probe, lambda m, b, fns=fns: fns[id(m)](b))
            v.grad_min_cos, v.grad_rel_norm = rep.min_cosine, rep.rel_norm_diff
            run_steps(v, args.warmup, device)
            v.warmup_s = time.perf_counter() - start
        except Exception as exc:  # a compile failure is a result to report
            v.warmup_s = time.perf_counter() - start
            v.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            traceback.print_exc()
        variants.append(v)
        print(f"  {v.name}: warmup {v.warmup_s:.1f}s {v.error or ''}", flush=True)

    live = [v for v in variants if not v.error]
    rounds = -(-args.steps // args.chunk)
    for r in range(rounds):
        n = min(args.chunk, args.steps - r * args.chunk)
        k = r % len(live)
        for v in live[k:] + live[:k]:
            v.step_times.append(run_steps(v, n, device) / n)

    eager = next((v for v in live if v.name == "eager"), None)
    tokens = args.batch * seq
    rows = {}
    print(
        "\n| variant | steps/s | tokens/s | median ms/step | x eager | paired x | compile s | grad cos (min) | grad norm rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        if v.error:
            rows[v.name] = {"error": v.error}
            print(f"| {v.name} | failed: {v.error[:100]} | | | | | | | |")
            continue
        med = statistics.median(v.step_times)
        x = med / statistics.median(eager.step_times) if eager else None
        paired = statistics.median(t / b for t, b in zip(v.step_times, eager.step_times)) if eager else None
        rows[v.name] = {"median_step_s": med, "steps_per_s": 1 / med, "tokens_per_s": tokens / med,
                        "time_ratio_vs_eager": x, "paired_time_ratio_vs_eager": paired,
                        "compile_s": v.warmup_s, "grad_min_cosine": v.grad_min_cos,
                        "grad_rel_norm_diff": v.grad_rel_norm, "chunk_step_times_s": v.step_times}  # fmt: skip

        def f(val, spec):
            return "-" if val is None else format(val, spec)

        print(f"| {v.name} | {1 / med:.2f} | {tokens / med:.0f} | {med * 1e3:.0f} | {f(x, '.2f')} | "
              f"{f(paired, '.2f')} | {v.warmup_s:.1f} | {f(v.grad_min_cos, '.6f')} | {f(v.grad_rel_norm, '.1e')} |")  # fmt: skip
    load1 = os.getloadavg()
    print(f"\nload avg {load0[0]:.1f} -> {load1[0]:.1f}")
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "dtype": str(dtype), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_avg_start": load0, "load_avg_end": load1, "variants": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
