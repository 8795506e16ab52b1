"""1-D learning-rate scans on the tiny pipeline: does each LR's best value lie inside the space's bounds?

For every float parameter of a search space whose override is an ``*.optimizer.lr`` (default space:
``search_spaces/tiny_cpu.yaml``), the scan holds everything else at the config defaults (the space's
``base_overrides`` applied, conditional parameters off) and runs the real trial pipeline
(``training.api.compose_config`` + ``run_pipeline``, CPU, fp32) at log-spaced values of that LR that
reach beyond the bounds on both sides. Per value it records ``final_eval_loss`` (the sweep objective),
per ``--order-seeds`` (``data.order_seed``: the same eval blocks, another training-batch order), and
prints a table per LR with the best value and whether it is strictly inside ``[low, high]``.

``--time-trial`` also times one real trial process (``python -m training.run_trial`` with the space's
base overrides and the defaults), the unit a demo worker runs.

    .venv/bin/python scripts/scan_lr.py --out runs/scan_lr.json
    .venv/bin/python scripts/scan_lr.py --values 5e-4,1e-3,2e-3,4e-3,8e-3,1.6e-2 --order-seeds 0,1 --time-trial
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.api import compose_config, run_pipeline  # noqa: E402

DEFAULT_VALUES = "5e-4,1e-3,2e-3,4e-3,8e-3,1.6e-2,3.2e-2"


def lr_parameters(space: dict) -> dict[str, dict]:
    """The space's float parameters that set an optimizer learning rate."""
    return {
        name: p
        for name, p in (space.get("parameters") or {}).items()
        if p.get("type") == "float" and str(p.get("override", "")).endswith(".optimizer.lr")
    }


def run_point(base: list[str], override: str, value: float, order_seed: int, out: Path) -> dict[str, Any]:
    overrides = [*base, "run.device=cpu", "run.resume=false", f"run.out_dir={out}",
                 f"data.order_seed={order_seed}", f"{override}={value}"]
    start = time.perf_counter()
    result = run_pipeline(compose_config(overrides))
    return {
        "value": value,
        "order_seed": order_seed,
        "status": result.status,
        "reason": result.reason,
        "final_eval_loss": result.final_eval_loss,
        "eval_batch_sem": result.final_eval_loss_sem,
        "seconds": time.perf_counter() - start,
    }


def time_trial(base: list[str], threads: int) -> dict[str, Any]:
    """Wall seconds of one ``python -m training.run_trial`` process (imports, teacher load, training, eval)."""
    with tempfile.TemporaryDirectory(prefix="scan_lr-trial-") as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
               "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "training.run_trial", "--out", f"{tmp}/result.json", "--", *base,
               "run.device=cpu", f"run.out_dir={tmp}/run"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"timed trial failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
        result = json.loads(Path(f"{tmp}/result.json").read_text())
    return {"wall_s": wall, "pipeline_s": result["seconds"], "threads": threads,
            "final_eval_loss": result["final_eval_loss"], "command": " ".join(cmd[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "tiny_cpu.yaml")
    parser.add_argument("--values", default=DEFAULT_VALUES, help="comma-separated LR values (every LR)")
    parser.add_argument("--params", default="", help="comma-separated LR parameter names (default: all)")
    parser.add_argument("--order-seeds", default="0", help="comma-separated data.order_seed values")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--time-trial", action="store_true", help="also time one run_trial process")
    parser.add_argument("--out", type=Path, default=Path("runs/scan_lr.json"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar per run

    space = yaml.safe_load(args.space.read_text())
    base = [*space.get("base_overrides", []), *args.override]
    params = lr_parameters(space)
    if args.params:
        wanted = [p.strip() for p in args.params.split(",") if p.strip()]
        missing = [p for p in wanted if p not in params]
        if missing:
            parser.error(f"--params: {missing} are not LR parameters of {args.space} (have: {', '.join(params)})")
        params = {p: params[p] for p in wanted}
    values = sorted(float(v) for v in args.values.split(",") if v.strip())
    seeds = [int(s) for s in args.order_seeds.split(",") if s.strip()]
    load_start, t0 = os.getloadavg(), time.perf_counter()

    scans: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="scan_lr-") as tmp:
        for name, p in params.items():
            rows = []
            for value in values:
                for seed in seeds:
                    row = run_point(base, p["override"], value, seed, Path(tmp) / f"{name}-{value:g}-{seed}")
                    rows.append(row)
                    loss = row["final_eval_loss"]
                    shown = f"{loss:.4f}" if loss is not None else row["status"]
                    print(f"{name}={value:g} order_seed={seed}: {shown} ({row['seconds']:.0f}s)", flush=True)
            scans[name] = {"override": p["override"], "low": p["low"], "high": p["high"], "rows": rows}

    print(f"\nspace {args.space.name}; base overrides {' '.join(base)}; order seeds {seeds}; "
          f"{args.threads} thread(s); {time.perf_counter() - t0:.0f}s; load avg {load_start[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f}")
    summary = {}
    for name, scan in scans.items():
        by_value: dict[float, list[float]] = {}
        for r in scan["rows"]:
            if r["final_eval_loss"] is not None and math.isfinite(r["final_eval_loss"]):
                by_value.setdefault(r["value"], []).append(r["final_eval_loss"])
        means = {v: statistics.fmean(xs) for v, xs in by_value.items()}
        best = min(means, key=means.get) if means else None
        inside = best is not None and scan["low"] < best < scan["high"]
        print(f"\n{name} ({scan['override']}), space bounds [{scan['low']:g}, {scan['high']:g}]:\n")
        print("| value | final_eval_loss | order-seed spread | in bounds |")
        print("|---|---|---|---|")
        for v in values:
            xs = by_value.get(v)
            cell = f"{means[v]:.4f}{' (best)' if v == best else ''}" if xs else "diverged/failed"
            spread = f"{max(xs) - min(xs):.4f}" if xs and len(xs) > 1 else "-"
            print(f"| {v:g} | {cell} | {spread} | {'yes' if scan['low'] <= v <= scan['high'] else 'no'} |")
        verdict = "strictly inside" if inside else "NOT strictly inside"
        print(f"\nbest {name} = {best:g}: {verdict} [{scan['low']:g}, {scan['high']:g}]" if best is not None
              else f"\n{name}: no finite loss")
        summary[name] = {"best": best, "best_loss": means.get(best), "inside": inside, "means": means}

    trial = time_trial(base, args.threads) if args.time_trial else None
    if trial:
        print(f"\none trial process ({trial['threads']} thread(s)): {trial['wall_s']:.1f}s wall, "
              f"{trial['pipeline_s']:.1f}s in run_pipeline, final_eval_loss {trial['final_eval_loss']:.4f}")
    out = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "base_overrides": base,
        "values": values,
        "order_seeds": seeds,
        "seconds": time.perf_counter() - t0,
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "scans": scans,
        "summary": {k: {**v, "means": {str(x): m for x, m in v["means"].items()}} for k, v in summary.items()},
        "trial_timing": trial,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
