"""Eval cost and eval error: how many held-out blocks a trial's eval needs, and what it costs.

Two measurements on the tiny model (``model=tiny``, built-in corpus, CPU, fp32):

1. Cost: wall seconds of ``evaluate_lm`` (the pipeline's eval) on the Stage 1 student for several
   ``data.eval_blocks``, median of ``--repeats``; and its compute next to a trial's ``train_flops``
   (training/compute.py) under the space's base overrides. The same FLOP ratio is printed for a
   SmolLM2-135M / FineWeb trial (``data=fineweb``: 512-token blocks) at the config defaults.
2. Error (``--paired``): two recipes trained by the real pipeline (the defaults vs ``--other``) are
   scored block by block on the same eval blocks; the paired difference's mean and standard error
   over the first 16 / 32 / all blocks say whether the eval set separates the recipes. (Trials share
   the eval blocks, so the eval-batch sem of one trial's mean is not the error of a comparison.)

    .venv/bin/python scripts/bench_eval.py --paired --out runs/bench_eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.api import compose_config, run_pipeline  # noqa: E402
from training.checkpoint import CheckpointManager  # noqa: E402
from training.compute import all_params, stage_flops  # noqa: E402
from training.models import SMOLLM2_135M_SHAPE  # noqa: E402
from training.stages.common import build_data, build_student, load_teacher  # noqa: E402
from training.stages.trainer import evaluate_lm  # noqa: E402

CPU = torch.device("cpu")


def trial_train_flops(cfg, n_student: int, n_teacher: int) -> float:
    """train_flops of the pipeline ``cfg`` describes (Stage 1.9 + Stage 2 at their configured steps)."""
    total = 0.0
    for stage in ("stage1_9", "stage2"):
        c = cfg[stage]
        if c.enabled and c.max_steps > 0:
            tokens = c.max_steps * c.batch_size * c.grad_accum * cfg.data.seq_len
            total += stage_flops(stage, tokens, n_student, n_teacher)
    return total


def time_eval(base: list[str], blocks: list[int], repeats: int) -> list[dict]:
    rows = []
    teacher = tokenizer = None
    for n in blocks:
        cfg = compose_config([*base, f"data.eval_blocks={n}"])
        if teacher is None:
            teacher, tokenizer = load_teacher(cfg, CPU, torch.float32)
        data = build_data(cfg, tokenizer)
        student = build_student(cfg, teacher)
        evaluate_lm(student.model, data.eval[:1], CPU)  # first-call allocations out of the timing
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            evaluate_lm(student.model, data.eval, CPU)
            times.append(time.perf_counter() - t)
        n_student, n_teacher = sum(p.numel() for p in student.model.parameters()), all_params(teacher)
        tokens = n * cfg.data.seq_len
        eval_flops = 2.0 * n_student * tokens
        rows.append({
            "eval_blocks": n,
            "eval_batches": len(data.eval),
            "tokens": tokens,
            "seconds": statistics.median(times),
            "eval_flops": eval_flops,
            "trial_train_flops": trial_train_flops(cfg, n_student, n_teacher),
        })
    return rows


def smollm2_fineweb() -> dict:
    """FLOP estimate for one eval of a SmolLM2-135M trial on FineWeb at the config defaults."""
    cfg = compose_config(["data=fineweb"])
    s = SMOLLM2_135M_SHAPE
    n = _llama_params(s)
    tokens = cfg.data.eval_blocks * cfg.data.seq_len
    eval_flops = 2.0 * n * tokens
    # Stage 1.9's teacher is the same model; the student adds SubLN norms (negligible here).
    train = trial_train_flops(cfg, n, n)
    return {"params": n, "eval_blocks": cfg.data.eval_blocks, "eval_batches": math.ceil(
        cfg.data.eval_blocks / cfg.data.eval_batch_size), "tokens": tokens, "eval_flops": eval_flops,
            "trial_train_flops": train}


def _llama_params(s) -> int:
    """Parameters of a Llama with tied embeddings (SmolLM2-135M: 134.5M)."""
    h, heads, kv = s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"]
    attn = h * (h // heads) * (2 * heads + 2 * kv)
    mlp = 3 * h * s["intermediate_size"]
    return s["num_hidden_layers"] * (attn + mlp + 2 * h) + s["vocab_size"] * h + h


@torch.no_grad()
def block_losses(model, eval_batches) -> list[float]:
    """Mean next-token CE of every eval block (the eval's mean is the mean of these: equal lengths)."""
    model.eval()
    out = []
    for batch in eval_batches:
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
        labels = batch["input_ids"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        out.extend(ce.mean(dim=1).tolist())
    return out


def paired(base: list[str], other: list[str], tmp: Path) -> dict:
    """Train the default recipe and ``other`` and compare them block by block on the same eval blocks."""
    losses, finals = {}, {}
    for name, extra in (("default", []), ("other", other)):
        out = tmp / name
        cfg = compose_config([*base, "run.device=cpu", "run.resume=false", f"run.out_dir={out}", *extra])
        result = run_pipeline(cfg)
        if result.status != "completed":
            raise SystemExit(f"{name}: {result.status}: {result.reason}")
        teacher, tokenizer = load_teacher(cfg, CPU, torch.float32)
        student = build_student(cfg, teacher)
        state = CheckpointManager(str(out / "ckpt")).load("final")
        student.model.load_state_dict(state["model"])
        student.lam.set_value(1.0)
        losses[name] = block_losses(student.model, build_data(cfg, tokenizer).eval)
        finals[name] = result.final_eval_loss
    diffs = [b - a for a, b in zip(losses["default"], losses["other"])]
    subsets = {}
    for k in sorted({16, 32, len(diffs)}):
        d = diffs[:k]
        mean = statistics.fmean(d)
        se = statistics.stdev(d) / math.sqrt(k)
        single = statistics.stdev(losses["other"][:k]) / math.sqrt(k)  # one trial's eval sem (per block)
        subsets[k] = {"diff_mean": mean, "diff_se": se, "t": mean / se if se else float("inf"),
                      "single_trial_sem": single}
    return {"final_eval_loss": finals, "per_block": losses, "subsets": subsets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "tiny_cpu.yaml")
    parser.add_argument("--blocks", default="16,48,64,128", help="data.eval_blocks values to time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paired", action="store_true", help="also measure the paired eval error")
    parser.add_argument("--other", default="stage1_9.optimizer.lr=0.006,stage2.optimizer.lr=0.006",
                        help="comma-separated overrides of the second recipe for --paired")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_eval.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar per run
    space = yaml.safe_load(args.space.read_text())
    base = [*space.get("base_overrides", []), "run.device=cpu"]
    load0, t0 = os.getloadavg(), time.perf_counter()

    rows = time_eval(base, [int(b) for b in args.blocks.split(",")], args.repeats)
    print(f"\ntiny model, CPU fp32, {args.threads} thread(s); base overrides of {args.space.name}; "
          f"load avg {load0[0]:.1f}\n")
    print("| data.eval_blocks | eval batches | tokens | eval seconds (median) | eval FLOPs / trial train_flops |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['eval_blocks']} | {r['eval_batches']} | {r['tokens']} | {r['seconds']:.3f} | "
              f"{r['eval_flops'] / r['trial_train_flops']:.2%} |")
    fw = smollm2_fineweb()
    print(f"\nSmolLM2-135M on FineWeb at the defaults: {fw['eval_blocks']} blocks = {fw['eval_batches']} batches, "
          f"{fw['tokens']} tokens, {fw['eval_flops'] / 1e12:.1f} TFLOP per eval = "
          f"{fw['eval_flops'] / fw['trial_train_flops']:.2%} of the trial's train_flops "
          f"({fw['trial_train_flops'] / 1e15:.1f} PFLOP)")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "base_overrides": base, "timing": rows,
              "smollm2_fineweb": fw, "load_avg_start": load0}
    if args.paired:
        with tempfile.TemporaryDirectory(prefix="bench_eval-") as tmp:
            pr = paired(base, [o for o in args.other.split(",") if o], Path(tmp))
        n_all = max(pr["subsets"])
        print(f"\npaired eval error: default vs {args.other} (final eval {pr['final_eval_loss']['default']:.4f} vs "
              f"{pr['final_eval_loss']['other']:.4f}), on the same {n_all} eval blocks:\n")
        print("| first N eval blocks | mean difference | its SE (paired) | difference / SE | one trial's sem |")
        print("|---|---|---|---|---|")
        for k, s in sorted(pr["subsets"].items()):
            print(f"| {k} | {s['diff_mean']:+.4f} | {s['diff_se']:.4f} | {s['t']:.1f} | {s['single_trial_sem']:.4f} |")
        result["paired"] = pr
    result["seconds"] = time.perf_counter() - t0
    result["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
