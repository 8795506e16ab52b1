"""A loss-vs-compute (two-objective) sweep through the product, and what its Pareto front says.

Runs the real CLI path -- ``sweep init`` -> ``sweep run --workers N`` -> ``sweep report`` -- for a
space with ``objectives: [final_eval_loss, train_flops]`` (default ``search_spaces/tiny_pareto.yaml``),
unless the experiment already exists in ``--store`` (then it only reads it), and prints:

* every completed trial sorted by Stage 1.9 length: the LRs, the loss, train FLOPs, measured
  trial seconds and the Pareto mark (sweep/status.py, the same front ``sweep status`` stars);
* the front, cheapest first, with the loss bought by the extra compute between neighbours on it,
  compute counted in units of the cheapest front trial's FLOPs (scale-free, so tiny and 135M
  numbers read alike): ``(L_prev - L) / ((F - F_prev) / F_cheapest)``;
* the front's *knee* by the research notebook's own efficiency measure: (loss improvement over
  the no-Stage-1.9 baseline) / (total compute), i.e. ``(L_base - L) / (F / F_base)`` where the
  baseline is one run of the space's base overrides with ``stage1_9.enabled=false`` and the config's
  default LRs (``--baseline``, run once with ``python -m training.run_trial`` and kept beside the
  store); without it, against the front's cheapest trial: ``(L_cheapest - L) / (F / F_cheapest - 1)``.

It writes the table and the summary as JSON (``--json``). Example (docs/benchmarks.md)::

    .venv/bin/python scripts/bench_pareto.py --store /tmp/pareto --workers 2 --baseline --json runs/pareto.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from sweep.experiment import Experiment  # noqa: E402
from sweep.space import load_space  # noqa: E402
from sweep.store import open_store  # noqa: E402


def run_sweep(space_path: Path, store: Path, name: str, workers: int, workdir: Path) -> float:
    """``sweep init`` + ``sweep run`` + ``sweep report`` as a user types them; the wall seconds of run."""
    cli = [sys.executable, "-m", "sweep.cli"]
    subprocess.run([*cli, "init", "--space", str(space_path), "--store", str(store)], check=True)
    began = time.monotonic()
    subprocess.run([*cli, "run", "--store", str(store / name), "--workers", str(workers), "--workdir",
                    str(workdir)], check=True)
    wall = time.monotonic() - began
    subprocess.run([*cli, "report", "--store", str(store / name), "--out", str(store / name / "report")],
                   check=True)
    return wall


def run_baseline(space: Any, out: Path, extra: list[str]) -> dict[str, Any]:
    """One real trial without Stage 1.9 (the notebook's baseline): the config's default LRs unless
    ``extra`` overrides them (e.g. the front's Stage 2 LR, for a baseline that differs only in Stage 1.9)."""
    if not out.exists():
        overrides = [*space.base_overrides, "stage1_9.enabled=false", *extra,
                     f"run.out_dir={out.with_suffix('')}-run"]
        subprocess.run([sys.executable, "-m", "training.run_trial", "--out", str(out), "--", *overrides],
                       check=True)
    result = json.loads(out.read_text())
    if result.get("status") != "completed":
        raise SystemExit(f"baseline run {out}: status {result.get('status')!r}: {result.get('reason')}")
    return result


def _length_param(space: Any) -> str | None:
    for p in space.searched:  # the real pipeline's key, or the synthetic `length` trial's parameter
        if p.override.lstrip("+") in ("stage1_9.max_steps", "stage1_9_steps"):
            return p.name
    return None


def summarise(exp: Experiment, baseline: dict[str, Any] | None) -> dict[str, Any]:
    status = exp.status()
    space = exp.space
    compute = space.compute_objective.metric
    length = _length_param(space)
    rows = []
    for r in status.rows:
        if r.state != "completed" or r.loss is None:
            continue
        rows.append({
            "trial": r.index,
            "phase": r.phase,
            "params": dict(r.params),
            "stage1_9_steps": r.params.get(length) if length else None,
            space.objective.metric: r.loss,
            compute: r.metrics.get(compute),
            "trial_seconds": r.metrics.get("trial_seconds"),
            "pareto": r.pareto,
        })
    rows.sort(key=lambda t: (t["stage1_9_steps"] or 0, t[compute]))
    front = sorted((t for t in rows if t["pareto"]), key=lambda t: t[compute])
    metric = space.objective.metric
    unit = front[0][compute] if front else None  # compute in units of the cheapest front trial's
    for a, b in zip(front, front[1:]):
        b["gain_per_unit_vs_previous"] = (a[metric] - b[metric]) / ((b[compute] - a[compute]) / unit)
    knee, base_point = None, None
    if baseline is not None:  # the notebook's measure: gain over no Stage 1.9, per total compute
        base_point = {metric: baseline["metrics"][metric], compute: baseline["metrics"][compute],
                      "trial_seconds": baseline["metrics"].get("trial_seconds")}
        for t in front:
            t["efficiency"] = (base_point[metric] - t[metric]) / (t[compute] / base_point[compute])
        if front:
            knee = max(front, key=lambda t: t["efficiency"])["trial"]
    elif len(front) >= 2:
        base = front[0]
        for t in front[1:]:
            t["efficiency"] = (base[metric] - t[metric]) / (t[compute] / unit - 1)
        knee = max(front[1:], key=lambda t: t["efficiency"])["trial"]
    return {
        "experiment": exp.name,
        "trials": len(status.rows),
        "completed": len(rows),
        "failed": sum(1 for r in status.rows if r.state == "failed"),
        "metric": metric,
        "compute": compute,
        "rows": rows,
        "front": [t["trial"] for t in front],
        "knee": knee,
        "baseline": base_point,
        "efficiency": "(L_base - L) / (F / F_base), base = no Stage 1.9" if baseline is not None
        else "(L_cheapest - L) / (F / F_cheapest - 1), cheapest front trial",
    }


def print_tables(summary: dict[str, Any]) -> None:
    metric, compute = summary["metric"], summary["compute"]
    print(f"\n{summary['experiment']}: {summary['completed']} of {summary['trials']} trials completed, "
          f"{summary['failed']} failed\n")
    print(f"| trial | phase | S1.9 steps | stage1_9 lr | stage2 lr | {metric} | {compute} | trial s | Pareto |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in summary["rows"]:
        p = t["params"]
        print(f"| {t['trial']} | {t['phase']} | {t['stage1_9_steps']} | {p.get('stage1_9_lr', float('nan')):.2e} | "
              f"{p.get('stage2_lr', float('nan')):.2e} | {t[metric]:.4f} | {t[compute]:.3g} | "
              f"{t['trial_seconds']:.0f} | {'★' if t['pareto'] else ''} |")
    base = summary["baseline"]
    if base is not None:
        extra = " ".join(summary.get("baseline_overrides") or []) or "default LRs"
        print(f"\nbaseline without Stage 1.9 ({extra}): {metric} {base[metric]:.4f}, {compute} {base[compute]:.3g}")
    print(f"\nPareto front (cheapest first); knee by efficiency = {summary['efficiency']}: trial {summary['knee']}\n")
    print(f"| trial | S1.9 steps | {metric} | {compute} | gain vs previous per cheapest-trial compute "
          "| efficiency |")
    print("|---|---|---|---|---|---|")
    for trial in summary["front"]:
        t = next(r for r in summary["rows"] if r["trial"] == trial)
        step = t.get("gain_per_unit_vs_previous")
        eff = t.get("efficiency")
        print(f"| {trial}{' (knee)' if trial == summary['knee'] else ''} | {t['stage1_9_steps']} | {t[metric]:.4f} | "
              f"{t[compute]:.3g} | {'-' if step is None else f'{step:.4f}'} | {'-' if eff is None else f'{eff:.4f}'} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "tiny_pareto.yaml")
    parser.add_argument("--store", type=Path, required=True, help="a local store folder (created if missing)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--baseline", action="store_true",
                        help="also run (once) the space's base overrides without Stage 1.9, the notebook's baseline")
    parser.add_argument("--baseline-override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for the baseline run (repeatable), e.g. stage2.optimizer.lr=0.008")
    args = parser.parse_args(argv)
    space = load_space(args.space)
    if space.compute_objective is None:
        parser.error(f"--space: {args.space} has one objective; this benchmark needs objectives: [quality, compute]")
    wall = None
    if not (args.store / space.name / "experiment.json").exists():
        wall = run_sweep(args.space, args.store, space.name, args.workers, args.store / "work")
    exp = Experiment.open(open_store(str(args.store)), space.name)
    baseline = None
    if args.baseline:
        tag = "".join(f"-{o}" for o in args.baseline_override).replace("/", "_")
        baseline = run_baseline(space, args.store / f"{space.name}-baseline{tag}.json", args.baseline_override)
    summary = summarise(exp, baseline)
    summary.update(space=str(args.space), workers=args.workers, run_wall_s=wall,
                   baseline_overrides=args.baseline_override if args.baseline else None)
    print_tables(summary)
    if wall is not None:
        print(f"\nsweep run wall time: {wall / 60:.1f} min with {args.workers} workers")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
