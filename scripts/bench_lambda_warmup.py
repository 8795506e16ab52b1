"""Lambda warmup and Stage 1.9 ablation on the tiny model: Stage 2 start/end loss and final eval loss.

The notebook's two findings, re-measured with the real pipeline (``training.api.compose_config`` +
``run_pipeline``) on the tiny teacher, CPU, fp32:

- "Quantization Scheduling Comparison": lambda warmup (0 -> 1) in Stage 2 gives a ~30% lower Stage 2
  starting loss than immediate lambda = 1 (``stage2.lambda_warmup.enabled=false``);
- "Stage 1.9 Value Test": Stage 1.9 (layer-wise distillation) before Stage 2 gives a lower final loss
  after the same number of Stage 2 steps (``stage1_9.enabled=false``).

and, since Stage 1.9 has its own lambda (``stage1_9.lambda_warmup``) and Stage 2 a choice of where its
lambda starts (``stage2.lambda_start: restart | continue``), the variants where Stage 1.9 itself warms
lambda up (over ``--s19-warmup-steps``, or over all its steps: ``warm-all``) and Stage 2 then restarts
its warmup at 0 or continues at Stage 1.9's final lambda (1: lambda = 1 from Stage 2's first step).

Every selected variant runs for every seed (same seeds for every variant). ``--seed-mode data`` (the
first table in docs/benchmarks.md): the seed sets ``data.seed`` (the train/eval split and both stages'
batch order) and ``run.seed``; ``--seed-mode order``: the seed sets ``data.order_seed`` only, so every
run is scored on the same eval blocks (``data.seed=0``: the tiny teacher's own held-out blocks) and
seeds differ in training-batch order alone. On CPU the pipeline is otherwise deterministic, so
``run.seed`` alone would repeat the same run. Per run we record:

- Stage 2 start loss: the train loss of Stage 2's first step (lambda = 0 with warmup, 1 without),
  and the mean of its first 5 steps;
- Stage 2 end loss: mean train loss of its last 5 steps (lambda = 1 by then in every variant);
- final eval loss: held-out CE at lambda = 1 (the sweep objective) +- its standard error over eval batches.

    .venv/bin/python scripts/bench_lambda_warmup.py --out runs/bench_lambda_warmup.json
    .venv/bin/python scripts/bench_lambda_warmup.py --seed-mode order --variants stage19-lambda \
        --out runs/bench_lambda_warmup_s19.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.api import compose_config, run_pipeline  # noqa: E402
from training.stages.common import build_data, build_student, load_teacher  # noqa: E402
from training.stages.trainer import evaluate_lm  # noqa: E402

# (name, Stage 1.9 on, Stage 1.9 lambda warmup: None | "part" (--s19-warmup-steps) | "all" (every
#  Stage 1.9 step), Stage 2 lambda warmup on, stage2.lambda_start)
VARIANTS = (
    ("s19+warmup", True, None, True, "restart"),
    ("s19, lambda=1", True, None, False, "restart"),
    ("no s19, warmup", False, None, True, "restart"),
    ("no s19, lambda=1", False, None, False, "restart"),
    ("s19 warm, S2 restart", True, "part", True, "restart"),
    ("s19 warm, S2 continue", True, "part", True, "continue"),
    ("s19 warm-all, S2 restart", True, "all", True, "restart"),
    ("s19 warm-all, S2 continue", True, "all", True, "continue"),
)
VARIANT_SETS = {
    "all": [v[0] for v in VARIANTS],
    "notebook": [v[0] for v in VARIANTS[:4]],
    # The Stage 1.9 lambda study: today's two Stage 1.9 variants as the reference, plus the four new ones.
    "stage19-lambda": ["s19+warmup", "s19, lambda=1", *[v[0] for v in VARIANTS[4:]]],
}
EDGE = 5  # steps averaged for the "first 5" / "last 5" losses


def _overrides(args, seed: int, variant: tuple, out: Path) -> list[str]:
    _, s19, s19_warm, warmup, start = variant
    seeds = [f"data.seed={seed}"] if args.seed_mode == "data" else ["data.seed=0", f"data.order_seed={seed}"]
    s19_warm_steps = {None: 0, "part": args.s19_warmup_steps, "all": args.s19_steps}[s19_warm]
    return [
        "model=tiny",
        "run.device=cpu",
        f"run.out_dir={out}",
        "run.resume=false",
        f"run.seed={seed}",
        *seeds,
        f"data.eval_blocks={args.eval_blocks}",
        f"data.eval_batch_size={args.eval_batch_size}",
        f"stage1_9.max_steps={args.s19_steps}",
        f"stage2.max_steps={args.s2_steps}",
        f"stage2.lambda_warmup.warmup_steps={args.warmup_steps}",
        f"stage1_9.enabled={str(s19).lower()}",
        f"stage2.lambda_warmup.enabled={str(warmup).lower()}",
        f"stage1_9.lambda_warmup.enabled={str(s19_warm is not None).lower()}",
        f"stage1_9.lambda_warmup.warmup_steps={s19_warm_steps}",
        f"stage2.lambda_start={start}",
        # Batch 8 (the table's recipe) whatever the schema's default effective batch is.
        "stage1_9.batch_size=8",
        "stage2.batch_size=8",
        *args.override,
    ]


def stage1_probe(args, seed: int, root: Path) -> dict[str, float]:
    """Held-out loss with no training: the teacher, and the Stage 1 student (SubLN + BitLinear) at
    lambda = 0 (teacher + SubLN: BitLinear is exactly nn.Linear there) and at lambda = 1 (ternary)."""
    cfg = compose_config(_overrides(args, seed, VARIANTS[0], root / f"probe{seed}"))
    device = torch.device("cpu")
    teacher, tokenizer = load_teacher(cfg, device, torch.float32)
    data = build_data(cfg, tokenizer)
    probe = {"teacher": evaluate_lm(teacher, data.eval, device)[0]}
    student = build_student(cfg, teacher)
    for lam in (0.0, 1.0):
        student.lam.set_value(lam)
        probe[f"stage1_lambda{lam:g}"] = evaluate_lm(student.model, data.eval, device)[0]
    return probe


def run_one(args, seed: int, variant: tuple, root: Path) -> dict[str, Any]:
    out = root / f"seed{seed}-{VARIANTS.index(variant)}"
    overrides = _overrides(args, seed, variant, out)
    start = time.perf_counter()
    result = run_pipeline(compose_config(overrides))
    seconds = time.perf_counter() - start
    if result.status != "completed":
        return {"status": result.status, "reason": result.reason, "seconds": seconds, "overrides": overrides}
    curve = [loss for _, loss in result.stages["stage2"].curve]
    row = {
        "status": result.status,
        "seconds": seconds,
        "overrides": overrides,
        "s2_start": curve[0],
        "s2_start5": statistics.fmean(curve[:EDGE]),
        "s2_end5": statistics.fmean(curve[-EDGE:]),
        "final_eval": result.final_eval_loss,
        "final_eval_sem": result.final_eval_loss_sem,
        "s2_curve": curve,
    }
    if "stage1_9" in result.stages:
        st = result.stages["stage1_9"]
        row["s19_eval"] = st.eval_loss
        row["s19_curve"] = [loss for _, loss in st.curve]
    return row


def _mean_spread(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.fmean(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_lambda_warmup.json"))
    parser.add_argument("--seeds", default="0,1", help="comma-separated; each sets data.seed and run.seed")
    parser.add_argument("--s19-steps", type=int, default=60)
    parser.add_argument("--s2-steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=30, help="stage2.lambda_warmup.warmup_steps")
    parser.add_argument("--s19-warmup-steps", type=int, default=30,
                        help="stage1_9.lambda_warmup.warmup_steps of the 's19 warm' variants")
    parser.add_argument("--variants", default="notebook",
                        help=f"a set ({', '.join(VARIANT_SETS)}) or comma-separated variant names")
    parser.add_argument("--seed-mode", choices=("data", "order"), default="data",
                        help="data: a seed sets data.seed (split + order); order: data.order_seed only")
    parser.add_argument("--eval-blocks", type=int, default=48, help="data.eval_blocks")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on a shared, overloaded CPU a 2-thread step stalls whenever "
        "one of its threads is descheduled)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    names = VARIANT_SETS.get(args.variants) or [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(names) - {v[0] for v in VARIANTS})
    if unknown:
        parser.error(f"--variants: unknown {unknown}; sets: {', '.join(VARIANT_SETS)}; names: "
                     f"{', '.join(v[0] for v in VARIANTS)}")
    selected = [v for v in VARIANTS if v[0] in names]
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    runs: dict[str, dict[int, dict[str, Any]]] = {v[0]: {} for v in selected}
    probes: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_lambda_warmup-") as tmp:
        for seed in seeds:
            probes[seed] = stage1_probe(args, seed, Path(tmp))
            print(
                f"seed {seed} before training: eval loss teacher {probes[seed]['teacher']:.3f}, "
                f"Stage 1 student lambda=0 {probes[seed]['stage1_lambda0']:.3f}, "
                f"lambda=1 {probes[seed]['stage1_lambda1']:.3f}",
                flush=True,
            )
            for variant in selected:
                name = variant[0]
                row = run_one(args, seed, variant, Path(tmp))
                runs[name][seed] = row
                if row["status"] == "completed":
                    print(
                        f"seed {seed} {name:25s}: S2 start {row['s2_start']:.3f}, end {row['s2_end5']:.3f}, "
                        f"final eval {row['final_eval']:.3f} +- {row['final_eval_sem']:.3f} "
                        f"({row['seconds']:.0f}s)",
                        flush=True,
                    )
                else:
                    print(f"seed {seed} {name}: {row['status']}: {row['reason']}", flush=True)
    total_s = time.perf_counter() - t0
    load_end = os.getloadavg()
    done = {
        n: {s: r for s, r in by_seed.items() if r["status"] == "completed"} for n, by_seed in runs.items()
    }

    # ---- per-variant table: mean over seeds (min-max) --------------------------------------------
    print(
        f"\ntiny model, CPU fp32; Stage 1.9 {args.s19_steps} steps, Stage 2 {args.s2_steps} steps, "
        f"lambda warmup {args.warmup_steps} steps (linear; Stage 1.9's: {args.s19_warmup_steps}); "
        f"seeds {seeds} ({args.seed_mode}); {args.threads} thread(s); "
        f"{total_s:.0f}s; "
        f"load avg {load_start[0]:.1f} -> {load_end[0]:.1f}\n"
    )
    header = (
        "variant",
        "S2 start (step 1)",
        f"S2 start (first {EDGE})",
        f"S2 end (last {EDGE})",
        "final eval",
        "final eval sem",
        "S1.9 eval",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    table = {}
    for name in runs:
        rs = list(done[name].values())
        if not rs:
            print(f"| {name} | no completed run |" + " |" * (len(header) - 2))
            continue
        col = {
            k: [r[k] for r in rs]
            for k in ("s2_start", "s2_start5", "s2_end5", "final_eval", "final_eval_sem")
        }
        s19_eval = [r["s19_eval"] for r in rs if "s19_eval" in r]
        table[name] = {k: statistics.fmean(v) for k, v in col.items()}
        cells = (
            name,
            _mean_spread(col["s2_start"]),
            _mean_spread(col["s2_start5"]),
            _mean_spread(col["s2_end5"]),
            _mean_spread(col["final_eval"]),
            f"{statistics.fmean(col['final_eval_sem']):.3f}",
            _mean_spread(s19_eval) if s19_eval else "-",
        )
        print("| " + " | ".join(cells) + " |")

    print("\n| before any training (eval loss) | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    for key, label in (
        ("teacher", "FP teacher"),
        ("stage1_lambda0", "Stage 1 student, lambda = 0 (teacher + SubLN)"),
        ("stage1_lambda1", "Stage 1 student, lambda = 1 (ternary)"),
    ):
        print(f"| {label} | " + " | ".join(f"{probes[s][key]:.3f}" for s in seeds) + " |")

    # ---- paired effects, per seed ----------------------------------------------------------------
    def paired(a: str, b: str, key: str, relative: bool) -> list[float]:
        out = []
        for seed in seeds:
            if a in done and b in done and seed in done[a] and seed in done[b]:
                x, y = done[a][seed][key], done[b][seed][key]
                out.append(1.0 - x / y if relative else y - x)
        return out

    effects = {
        "warmup: S2 start (step 1) reduction vs lambda=1, with S1.9": paired(
            "s19+warmup", "s19, lambda=1", "s2_start", True
        ),
        "warmup: S2 start (step 1) reduction vs lambda=1, no S1.9": paired(
            "no s19, warmup", "no s19, lambda=1", "s2_start", True
        ),
        f"warmup: S2 start (first {EDGE}) reduction vs lambda=1, with S1.9": paired(
            "s19+warmup", "s19, lambda=1", "s2_start5", True
        ),
        "warmup: final eval reduction vs lambda=1, with S1.9": paired(
            "s19+warmup", "s19, lambda=1", "final_eval", True
        ),
        "S1.9: S2 start (step 1) reduction vs no S1.9, with warmup": paired(
            "s19+warmup", "no s19, warmup", "s2_start", True
        ),
        "S1.9: final eval reduction vs no S1.9, with warmup": paired(
            "s19+warmup", "no s19, warmup", "final_eval", True
        ),
        "S1.9: final eval reduction vs no S1.9, lambda=1": paired(
            "s19, lambda=1", "no s19, lambda=1", "final_eval", True
        ),
        "S1.9: S2 end (last 5) reduction vs no S1.9, with warmup": paired(
            "s19+warmup", "no s19, warmup", "s2_end5", True
        ),
    }
    # Stage 1.9 with its own warmup: does Stage 2's restarted warmup (lambda 0) now start lower than
    # continuing at Stage 1.9's final lambda (1), the notebook's "~30% lower Stage 2 start"?
    for warm in ("warm", "warm-all"):
        r, c = f"s19 {warm}, S2 restart", f"s19 {warm}, S2 continue"
        effects[f"S2 restart vs continue after s19 {warm}: S2 start (step 1)"] = paired(r, c, "s2_start", True)
        effects[f"S2 restart vs continue after s19 {warm}: S2 start (first {EDGE})"] = paired(
            r, c, "s2_start5", True
        )
        effects[f"S2 restart vs continue after s19 {warm}: final eval"] = paired(r, c, "final_eval", True)
        effects[f"s19 {warm} vs s19 at lambda=1 (both S2 restart): final eval"] = paired(
            r, "s19+warmup", "final_eval", True
        )
        effects[f"s19 {warm} + S2 continue vs s19 at lambda=1 + S2 lambda=1: final eval"] = paired(
            c, "s19, lambda=1", "final_eval", True
        )
    effects = {k: v for k, v in effects.items() if v}
    print("\n| paired effect (same seed) | per seed | mean |")
    print("|---|---|---|")
    for label, xs in effects.items():
        per = ", ".join(f"{x * 100:+.1f}%" for x in xs)
        mean = f"{statistics.fmean(xs) * 100:+.1f}%" if xs else "-"
        print(f"| {label} | {per} | {mean} |")

    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seeds": seeds,
        "seconds": total_s,
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "variants": {
            v[0]: {"stage1_9": v[1], "stage1_9_lambda_warmup": v[2], "lambda_warmup": v[3], "lambda_start": v[4]}
            for v in selected
        },
        "before_training": {str(s): p for s, p in probes.items()},
        "runs": {name: {str(s): r for s, r in by_seed.items()} for name, by_seed in runs.items()},
        "means": table,
        "paired_relative_reductions": effects,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
