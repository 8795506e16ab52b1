"""Seeing a sweep: the status table, the best configuration, and report files.

Reads only the store (through ``Experiment.status()``), so it never imports Ax or torch.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

_STATE_STYLE = {"completed": "green", "running": "cyan", "queued": "yellow", "failed": "red",
                "early_stopped": "magenta"}


def make_console() -> Console:
    """A console that does not squeeze tables to 80 columns when output goes to a file or pipe."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    return console


def _fmt_loss(loss: float | None, sem: float | None) -> str:
    if loss is None:
        return "-"
    if sem is None or not math.isfinite(sem):
        return f"{loss:.4f}"
    return f"{loss:.4f} ± {sem:.4f}"


def status_table(status: Any, sort_by_loss: bool = False) -> Table:
    table = Table(title=f"{status.name}  ({status.uri})", title_justify="left")
    for col in ("trial", "phase", "state", "attempt", "worker", "parameters", "stage/step", "last loss",
                status.metric):
        table.add_column(col, overflow="fold")
    rows = list(status.rows)
    if sort_by_loss:
        sign = 1 if status.minimize else -1
        rows.sort(key=lambda r: (r.loss is None, sign * r.loss if r.loss is not None else 0.0, r.index))
    for r in rows:
        prog = r.progress or {}
        step = f"{prog.get('stage', '')}:{prog.get('step', '')}" if prog else "-"
        last = f"{prog['loss']:.4f}" if isinstance(prog.get("loss"), (int, float)) else "-"
        state = f"[{_STATE_STYLE.get(r.state, 'white')}]{r.state}[/]"
        if r.reason and r.state == "failed":
            state += f"\n[dim]{r.reason[:80]}[/]"
        table.add_row(str(r.index), r.phase, state, str(r.attempt), r.worker or "-", r.description, step, last,
                      _fmt_loss(r.loss, r.sem))
    return table


def print_status(exp: Any, console: Console | None = None) -> None:
    console = console or make_console()
    status = exp.status()
    counts = ", ".join(f"{k} {v}" for k, v in status.counts.items() if v)
    best = status.best
    console.print(f"[bold]{status.name}[/]: {len(status.rows)}/{status.budget} trials created; {counts or 'none yet'}")
    if best is not None:
        console.print(f"best so far: trial {best.index}, {status.metric} {_fmt_loss(best.loss, best.sem)}")
    console.print(status_table(status))


def reproduce_command(exp: Any, params: dict[str, Any]) -> str:
    return "python scripts/train.py " + " ".join(exp.space.overrides(params))


def print_summary(exp: Any, console: Console | None = None) -> None:
    console = console or make_console()
    status = exp.status()
    counts = ", ".join(f"{k} {v}" for k, v in status.counts.items() if v)
    console.print(f"[bold]{status.name}[/]: {len(status.rows)}/{status.budget} trials; {counts or 'none yet'}")
    console.print(status_table(status, sort_by_loss=True))
    best = status.best
    if best is None:
        console.print("no completed trial yet")
        return
    console.print(f"[bold green]best configuration[/]: trial {best.index} ({best.phase}), "
                  f"{status.metric} = {_fmt_loss(best.loss, best.sem)}")
    for k, v in exp.space.active_parameters(best.params).items():
        console.print(f"  {k} = {v}")
    console.print(f"reproduce: {reproduce_command(exp, best.params)}")


def trial_records(exp: Any) -> list[dict[str, Any]]:
    status = exp.status()
    out = []
    for r in status.rows:
        out.append({"trial": r.index, "phase": r.phase, "state": r.state, "attempt": r.attempt, "worker": r.worker,
                    **{f"param.{k}": v for k, v in r.params.items()},
                    status.metric: r.loss, f"{status.metric}_sem": r.sem, "reason": r.reason})
    return out


def write_report(exp: Any, out_dir: Path) -> Path:
    """trials.csv and trials.json (one row per trial) plus best.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = trial_records(exp)
    (out_dir / "trials.json").write_text(json.dumps(records, indent=1, default=str))
    columns = sorted({k for rec in records for k in rec}, key=lambda k: (not k.startswith("trial"), k))
    with (out_dir / "trials.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    status = exp.status()
    best = status.best
    if best is not None:
        (out_dir / "best.json").write_text(json.dumps(
            {"trial": best.index, "loss": best.loss, "sem": best.sem, "params": best.params,
             "command": reproduce_command(exp, best.params)}, indent=1, default=str))
    return out_dir
