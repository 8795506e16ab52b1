"""Seeing a sweep: ``sweep status [--watch]`` and ``sweep report [--out DIR]``.

``status`` reads only the store -- the ledger inside ``experiment.json`` through
:meth:`Experiment.status`, heartbeats, and the storage time of result files -- so it needs no
lease and never imports Ax, torch or matplotlib. Its header carries the counts per state, the
best trial so far, the elapsed time (from the first claim, by the store's clock), the rate of
trials ending per hour and an estimate of the time left (trials not yet ended / that rate).

``report`` prints the best configuration and a trial table sorted best first, and writes into
one folder:

* ``trials.csv`` / ``trials.json`` -- every trial: parameters, state, attempts, metrics,
  failure reasons, per-attempt outcomes and timings (``trials.json`` also the ledger history);
* ``best.json`` -- the best trial, its parameters and the command line that reproduces it;
* PNG plots (:mod:`sweep.plots`): best so far by trial index with the Sobol and BoTorch phases
  marked, the objective against each parameter, every trial's stage 1.9 and stage 2 loss
  curves with the best highlighted, and Ax's analyses (:mod:`sweep.ax_analyses`);
* ``report.html`` (:mod:`sweep.html_report`) -- all of it on one page that references only
  those files.

A two-objective sweep (``objectives: [quality, compute]``) also gets ``pareto.json`` (the
Pareto-optimal trials, cheapest first, with their reproduce commands), ``pareto_front.png`` and
both in the console and on the page; ``status`` stars those trials and shows the compute column.

It works on a running sweep and on one with failures: every number is what the store holds
at that moment, and a plot or an Ax analysis that cannot be drawn yet is replaced by a one-line
note saying why.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from sweep.early_stopping import stage_curve
from sweep.ledger import FINAL_STATES

STAGES = ("stage1_9", "stage2")
STATE_STYLE = {
    "completed": "green",
    "running": "cyan",
    "queued": "yellow",
    "failed": "red",
    "early_stopped": "magenta",
}
# Order of the best-first table: ranked by the objective within each group.
_RANK_ORDER = {"completed": 0, "early_stopped": 1, "running": 2, "queued": 3, "failed": 4}
PLOT_FILES = (
    "best_so_far.png",
    "loss_vs_parameters.png",
    "curves_stage1_9.png",
    "curves_stage2.png",
    "ax_sensitivity.png",
    "ax_cross_validation.png",
    "pareto_front.png",
)


# -------------------- Formatting -------------------------------------------------------------


def fmt_loss(loss: Any, sem: Any = None) -> str:
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return "-"
    if isinstance(sem, (int, float)) and not isinstance(sem, bool) and math.isfinite(sem):
        return f"{loss:.4f} ± {sem:.4f}"
    return f"{loss:.4f}"


def fmt_compute(metric: str, value: Any) -> str:
    """A compute metric for a table: FLOPs in 3 significant digits (1.23e+15), seconds to 0.1 s."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{value:.1f}s" if metric == "trial_seconds" else f"{value:.3g}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _iso(t: float | None) -> str:
    if t is None:
        return ""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def make_console() -> Console:
    """A console that does not squeeze tables to 80 columns when output goes to a file or pipe."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    return console


# -------------------- The view: status + timings --------------------------------------------


@dataclass(frozen=True)
class Timing:
    first_claimed: float | None  # store time of the trial's first claim
    ended: float | None  # store time its final result was written (final states only)

    @property
    def wall_s(self) -> float | None:
        if self.first_claimed is None or self.ended is None:
            return None
        return self.ended - self.first_claimed


class TimingCache:
    """When each ended trial ended; that never changes, so ``--watch`` stats each result once."""

    def __init__(self) -> None:
        self._ended: dict[tuple[int, int, str], float | None] = {}

    def ended(self, exp: Any, row: Any) -> float | None:
        if row.state not in FINAL_STATES:
            return None
        key = (row.index, row.attempt, row.state)
        if key not in self._ended:
            self._ended[key] = _end_time(exp.store, row)
        return self._ended[key]


def _end_time(store: Any, row: Any) -> float | None:
    for attempt in range(row.attempt, 0, -1):
        stat = store.stat(f"trials/{row.index}/result-{attempt}.json")
        if stat is not None:
            return stat.updated
    # Failed for good after its heartbeat went stale: no result file; its last sign of life.
    stat = store.stat(f"trials/{row.index}/heartbeat-{row.attempt}")
    return stat.updated if stat is not None else None


def first_claimed(row: Any) -> float | None:
    times = [h.get("claimed_at") for h in row.history] + [row.claimed_at]
    times = [t for t in times if isinstance(t, (int, float))]
    return min(times) if times else None


@dataclass(frozen=True)
class SweepView:
    status: Any  # sweep.status.ExperimentStatus
    now: float  # the store's clock when read (0 for a finished sweep: not needed)
    timings: dict[int, Timing]
    compute_metric: str | None = None  # a two-objective sweep's compute objective (Pareto marks shown)

    @property
    def started_at(self) -> float | None:
        times = [t.first_claimed for t in self.timings.values() if t.first_claimed is not None]
        return min(times) if times else None

    @property
    def ended_at(self) -> float | None:
        """When the last trial ended, once the sweep is finished."""
        if not self.status.finished:
            return None
        times = [t.ended for t in self.timings.values() if t.ended is not None]
        return max(times) if times else None

    @property
    def elapsed_s(self) -> float | None:
        start = self.started_at
        if start is None:
            return None
        end = self.ended_at or self.now
        return max(0.0, end - start) if end else None

    @property
    def n_ended(self) -> int:
        return sum(1 for r in self.status.rows if r.state in FINAL_STATES)

    @property
    def per_hour(self) -> float | None:
        elapsed = self.elapsed_s
        if not self.n_ended or not elapsed:
            return None
        return self.n_ended / (elapsed / 3600.0)

    @property
    def eta_s(self) -> float | None:
        """Time left at the current rate: trials not yet ended / trials ended per second."""
        if self.status.finished:
            return 0.0
        rate = self.per_hour
        if not rate:
            return None
        return max(0, self.status.budget - self.n_ended) / rate * 3600.0


def load_view(exp: Any, cache: TimingCache | None = None) -> SweepView:
    status = exp.status()
    # The store's clock (on GCS a tiny probe upload); a finished sweep's clock stops at its last end.
    now = exp.store.now() if not status.finished else 0.0
    cache = cache or TimingCache()
    timings = {r.index: Timing(first_claimed(r), cache.ended(exp, r)) for r in status.rows}
    compute = exp.space.compute_objective
    return SweepView(
        status=status, now=now, timings=timings, compute_metric=compute.metric if compute else None
    )


# -------------------- Console: status table, header, watch -------------------------------------


def rank_rows(rows: Sequence[Any], minimize: bool) -> list[Any]:
    """Best first: completed by objective, then early-stopped, running, queued, failed."""

    def key(r: Any) -> tuple:
        value = r.loss if r.loss is not None and math.isfinite(r.loss) else math.inf
        return (_RANK_ORDER.get(r.state, 5), value if minimize or value == math.inf else -value, r.index)

    return sorted(rows, key=key)


def status_table(view: SweepView, *, sort_by_loss: bool = False, title: str | None = None) -> Table:
    status = view.status
    table = Table(title=title, title_justify="left", header_style="bold")
    for col, justify in (
        ("trial", "right"),
        ("phase", "left"),
        ("state", "left"),
        ("att", "right"),
        ("worker", "left"),
        ("parameters", "left"),
        ("stage:step", "left"),
        ("loss", "right"),
        (f"{status.metric} ± SE", "right"),
        *(((view.compute_metric, "right"),) if view.compute_metric else ()),
        ("time", "right"),
    ):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    rows = rank_rows(status.rows, status.minimize) if sort_by_loss else list(status.rows)
    for r in rows:
        prog = r.progress or {}
        if not prog:
            step = "-"
        elif prog.get("event"):  # the pipeline's last word (completed, preempted, diverged)
            step = f"{prog.get('stage', '?')}:{prog['event']}"
        else:
            step = f"{prog.get('stage', '?')}:{prog.get('step', '?')}" + _bar(prog)
        last = fmt_loss(prog.get("loss"))
        state = (
            f"[{STATE_STYLE.get(r.state, 'white')}]{r.state.replace('_', '-')}{'' if r.ingested else '*'}[/]"
        )
        if r.reason and r.state in ("failed", "early_stopped", "queued"):
            state += f"\n[dim]{_short_reason(r.reason)}[/]"
        if r.state == "running" and r.claimed_at is not None:
            took = fmt_duration(view.now - r.claimed_at)
        else:
            took = fmt_duration(view.timings[r.index].wall_s) if r.index in view.timings else "-"
        table.add_row(
            str(r.index) + (" ★" if r.pareto else ""),  # Pareto-optimal (two-objective sweeps)
            r.phase,
            state,
            str(r.attempt) + (f" ({r.preemptions}p)" if r.preemptions else ""),
            r.worker or "-",
            r.description,
            step,
            last,
            fmt_loss(r.loss, r.sem) + (" est." if r.state == "early_stopped" and r.loss is not None else ""),
            *((fmt_compute(view.compute_metric, r.metrics.get(view.compute_metric)),) if view.compute_metric else ()),
            took,
        )
    return table


def _pareto_line(view: SweepView) -> Text:
    """``★ Pareto-optimal (final_eval_loss vs train_flops): trials 3, 5, 9``, cheapest first."""
    status = view.status
    front = sorted(status.pareto_rows, key=lambda r: (r.metrics.get(view.compute_metric), r.index))
    text = Text()
    text.append(f"★ Pareto-optimal ({status.metric} vs {view.compute_metric}): ", style="bold")
    if front:
        text.append("trials " + ", ".join(str(r.index) for r in front) + " (cheapest first)\n")
    else:
        text.append("none yet (no completed trial reports both)\n")
    return text


def _bar(progress: dict[str, Any], width: int = 10) -> str:
    """`` 12/30 ▰▰▰▰▱▱▱▱▱▱`` for a record that knows its stage's max_steps, else ""."""
    step, total = progress.get("step"), progress.get("max_steps")
    if not isinstance(step, int) or not isinstance(total, int) or total <= 0:
        return ""
    filled = max(0, min(width, round(width * step / total)))
    return f"/{total} " + "▰" * filled + "▱" * (width - filled)


def _short_reason(reason: str, n: int = 90) -> str:
    line = reason.splitlines()[0] if reason else ""
    return line if len(line) <= n else line[: n - 1] + "…"


def header(view: SweepView) -> Text:
    status = view.status
    counts = status.counts
    text = Text()
    text.append(status.name, style="bold")
    text.append(f"  {status.uri}\n", style="dim")
    text.append(f"trials {len(status.budgeted_rows)}/{status.budget}")
    if status.replicates:
        text.append(f" (+ replicates {len(status.replicate_rows)}/{status.replicates})")
    for state in ("running", "queued", "completed", "early_stopped", "failed"):
        text.append(" · ")
        text.append(f"{state.replace('_', '-')} {counts.get(state, 0)}", style=STATE_STYLE[state])
    if status.preemptions:
        # Their own budget (trial.max_preemptions): a preempted attempt resumes from its checkpoint.
        text.append(f" · preemptions {status.preemptions}", style="yellow")
    text.append("\n")
    if status.noise == "replicates":
        measured = f"SD {status.noise_sd:.4g}" if status.noise_sd is not None else "not measured yet"
        text.append(f"objective noise: {status.noise_note or measured}\n", style="dim")
    best = status.best
    if best is not None:
        text.append("best so far: ", style="bold")
        text.append(
            f"trial {best.index} ({best.phase}) {status.metric} {fmt_loss(best.loss, best.sem)}",
            style="bold green",
        )
        text.append(f"  {best.description}\n")
    else:
        text.append("best so far: no completed trial yet\n")
    if view.compute_metric:
        text.append(_pareto_line(view))
    rate = f"{view.per_hour:.1f} trials/h" if view.per_hour else "- trials/h"
    if status.finished:
        left = "finished"
    elif view.eta_s is not None:
        left = f"≈ {fmt_duration(view.eta_s)} left"
    else:
        left = "time left: unknown until a trial ends"
    text.append(f"elapsed {fmt_duration(view.elapsed_s)} · {rate} · {left}")
    if any(not r.ingested for r in status.rows):
        text.append("\n* reported, not yet ingested into Ax (the next claim does it)", style="dim")
    return text


def render_status(view: SweepView) -> Group:
    return Group(header(view), status_table(view))


def print_status(exp: Any, console: Console | None = None) -> SweepView:
    console = console or make_console()
    view = load_view(exp)
    console.print(render_status(view))
    return view


def watch_status(
    exp: Any, console: Console | None = None, *, interval_s: float = 5.0, max_updates: int | None = None
) -> SweepView:
    """Redraw the status every ``interval_s`` until the sweep is finished (or ``max_updates`` redraws)."""
    from rich.live import Live

    console = console or make_console()
    cache = TimingCache()
    updates = 0
    with Live(console=console, auto_refresh=False, redirect_stdout=False) as live:
        while True:
            view = load_view(exp, cache)
            live.update(render_status(view), refresh=True)
            updates += 1
            if view.status.finished or (max_updates is not None and updates >= max_updates):
                return view
            time.sleep(interval_s)


# -------------------- Best configuration ----------------------------------------------------


def reproduce_command(space: Any, params: dict[str, Any]) -> str:
    """The command line that runs ``params`` again as a single run (the space's overrides, quoted)."""
    overrides = " ".join(shlex.quote(o) for o in space.overrides(params))
    if space.trial.entrypoint == "training.run_trial":
        return f"python scripts/train.py {overrides}"
    return f"python -m {space.trial.entrypoint} --out result.json -- {overrides}"


def best_config(exp: Any, status: Any) -> dict[str, Any] | None:
    best = status.best
    if best is None:
        return None
    return {
        "trial": best.index,
        "phase": best.phase,
        "metric": status.metric,
        "loss": best.loss,
        "sem": best.sem,
        "params": exp.space.active_parameters(best.params),
        "command": reproduce_command(exp.space, best.params),
    }


def print_best(exp: Any, status: Any, console: Console) -> None:
    best = best_config(exp, status)
    if best is None:
        console.print("no completed trial yet: no best configuration")
        return
    console.print(
        f"[bold green]best configuration[/]: trial {best['trial']} ({best['phase']}), "
        f"{status.metric} = {fmt_loss(best['loss'], best['sem'])}"
    )
    for k, v in best["params"].items():
        console.print(f"  {k} = {v}")
    console.print(f"reproduce: {best['command']}", soft_wrap=True)


def pareto_trials(exp: Any, view: SweepView) -> list[dict[str, Any]] | None:
    """A two-objective sweep's Pareto-optimal trials, cheapest first, each with the command that
    reproduces it; None for a single-objective sweep."""
    compute = view.compute_metric
    if compute is None:
        return None
    status = view.status
    front = sorted(status.pareto_rows, key=lambda r: (r.metrics[compute], r.index))
    return [
        {
            "trial": r.index,
            "phase": r.phase,
            status.metric: r.loss,
            f"{status.metric}_sem": r.sem,
            compute: r.metrics[compute],
            "params": exp.space.active_parameters(r.params),
            "command": reproduce_command(exp.space, r.params),
        }
        for r in front
    ]


def print_pareto(exp: Any, view: SweepView, console: Console) -> None:
    front = pareto_trials(exp, view)
    if front is None:
        return
    metric, compute = view.status.metric, view.compute_metric
    if not front:
        console.print(f"Pareto front ({metric} vs {compute}): no completed trial yet")
        return
    console.print(f"[bold]Pareto front[/] ({metric} vs {compute}), {len(front)} trials, cheapest first:")
    for t in front:
        params = " ".join(f"{k}={_param(v)}" for k, v in t["params"].items())
        console.print(
            f"  ★ trial {t['trial']} ({t['phase']}): {metric} {fmt_loss(t[metric], t[f'{metric}_sem'])}, "
            f"{compute} {fmt_compute(compute, t[compute])}  {params}",
            soft_wrap=True,
        )
        console.print(f"    reproduce: {t['command']}", soft_wrap=True)


def _param(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_summary(exp: Any, console: Console | None = None) -> SweepView:
    """Header, the trial table best first, the best configuration with its command line and, for a
    two-objective sweep, the Pareto-optimal trials with theirs."""
    console = console or make_console()
    view = load_view(exp)
    console.print(header(view))
    console.print(status_table(view, sort_by_loss=True))
    print_best(exp, view.status, console)
    print_pareto(exp, view, console)
    return view


# -------------------- Report data --------------------------------------------------------------


@dataclass(frozen=True)
class TrialDetail:
    row: Any  # sweep.status.TrialRow
    timing: Timing
    curves: dict[str, list[tuple[int, float]]]  # stage -> [(step, loss)]
    last: dict[str, Any] | None  # last training progress record
    attempts: list[dict[str, Any]]  # what each attempt reported


def collect(exp: Any, view: SweepView) -> list[TrialDetail]:
    out = []
    for row in view.status.rows:
        records = exp.progress(row.index)
        curves = {stage: stage_curve(records, stage) for stage in STAGES}
        training = [r for r in records if r.get("stage") in STAGES and r.get("event") is None and "step" in r]
        out.append(
            TrialDetail(
                row=row,
                timing=view.timings[row.index],
                curves=curves,
                last=training[-1] if training else None,
                attempts=[_attempt(exp.store, row.index, a) for a in range(1, row.attempt + 1)],
            )
        )
    return out


def _attempt(store: Any, index: int, attempt: int) -> dict[str, Any]:
    key = f"trials/{index}/result-{attempt}.json"
    got = store.read(key)
    if got is None:
        return {"attempt": attempt, "status": None}
    try:
        result = json.loads(got[0])
    except ValueError:
        return {"attempt": attempt, "status": "unreadable", "reason": f"{key} is not JSON"}
    stat = store.stat(key)
    return {
        "attempt": attempt,
        "status": result.get("status"),
        "reason": result.get("reason") or "",
        "worker": result.get("worker"),
        "seconds": result.get("seconds"),
        "gpu": result.get("gpu"),  # what the worker ran it on (nvidia-smi name or "cpu")
        "exit_code": result.get("exit_code"),
        "reported_at": _iso(stat.updated) if stat is not None else "",
    }


def trial_record(detail: TrialDetail, metric: str) -> dict[str, Any]:
    r, t = detail.row, detail.timing
    run_s = [a["seconds"] for a in detail.attempts if isinstance(a.get("seconds"), (int, float))]
    last = detail.last or {}
    return {
        "trial": r.index,
        "phase": r.phase,
        "state": r.state,
        "attempts": r.attempt,
        "preemptions": r.preemptions,
        "worker": r.worker,
        "params": dict(r.params),
        metric: r.loss,
        f"{metric}_sem": r.sem,
        "metrics": {k: v for k, v in r.metrics.items() if k not in (metric, f"{metric}_sem")},
        "reason": r.reason,
        "ingested": r.ingested,
        "pareto": r.pareto,  # Pareto-optimal in a two-objective sweep (always false for one objective)
        "stage": last.get("stage"),
        "step": last.get("step"),
        "last_loss": last.get("loss"),
        "first_claimed_at": _iso(t.first_claimed),
        "ended_at": _iso(t.ended),
        "wall_s": t.wall_s,
        "run_s": sum(run_s) if run_s else None,
        # The trial's cost: the GPU type(s) and the hours its attempts ran (preempted ones included).
        "gpu": " / ".join(sorted({a["gpu"] for a in detail.attempts if a.get("gpu")})) or None,
        "hours": round(sum(run_s) / 3600, 4) if run_s else None,
        "attempt_results": detail.attempts,
        "history": list(r.history),
    }


def _csv_rows(
    records: list[dict[str, Any]], space: Any, metric: str
) -> tuple[list[str], list[dict[str, Any]]]:
    params = [p.name for p in space.parameters]
    params += sorted({k for rec in records for k in rec["params"]} - set(params))
    extra = sorted({k for rec in records for k in rec["metrics"]})
    columns = [
        "trial",
        "phase",
        "state",
        "attempts",
        "preemptions",
        "worker",
        *(f"param.{p}" for p in params),
        metric,
        f"{metric}_sem",
        *(f"metric.{k}" for k in extra),
        "stage",
        "step",
        "last_loss",
        "reason",
        "attempt_outcomes",
        "first_claimed_at",
        "ended_at",
        "wall_s",
        "run_s",
        "gpu",
        "hours",
        "ingested",
        *(("pareto",) if space.compute_objective is not None else ()),
    ]
    rows = []
    for rec in records:
        row = {c: rec.get(c) for c in columns if c in rec}
        row.update({f"param.{p}": _csv_value(rec["params"][p]) for p in params if p in rec["params"]})
        row.update({f"metric.{k}": rec["metrics"].get(k) for k in extra})
        row["attempt_outcomes"] = "; ".join(
            f"{a['attempt']}:{a['status']}" for a in rec["attempt_results"] if a.get("status")
        )
        rows.append(row)
    return columns, rows


def _csv_value(v: Any) -> Any:
    if isinstance(v, bool):
        return "true" if v else "false"
    return v


# -------------------- Writing the report -------------------------------------------------------


@dataclass(frozen=True)
class ReportFiles:
    out_dir: Path
    html: Path
    figures: list[Any]  # sweep.plots.Figure, drawn or with a note
    best: dict[str, Any] | None


def write_report(exp: Any, out_dir: Path, *, ax: bool = True) -> ReportFiles:
    """Write trials.csv/json, best.json, the PNG plots and report.html into ``out_dir``."""
    from sweep import html_report, plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES:  # a plot that cannot be drawn this time must not show an old picture
        (out_dir / name).unlink(missing_ok=True)
    view = load_view(exp)
    status, space = view.status, exp.space
    metric, minimize = status.metric, status.minimize
    details = collect(exp, view)
    records = [trial_record(d, metric) for d in details]

    (out_dir / "trials.json").write_text(json.dumps(records, indent=1, default=str) + "\n")
    columns, rows = _csv_rows(records, space, metric)
    with (out_dir / "trials.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    best = best_config(exp, status)
    files = ["trials.csv", "trials.json"]
    if best is not None:
        (out_dir / "best.json").write_text(json.dumps(best, indent=1, default=str) + "\n")
        files.append("best.json")
    else:
        (out_dir / "best.json").unlink(missing_ok=True)
    pareto = pareto_trials(exp, view)  # None unless the space has objectives: [quality, compute]
    if pareto is not None:
        (out_dir / "pareto.json").write_text(json.dumps(pareto, indent=1, default=str) + "\n")
        files.append("pareto.json")
    else:
        (out_dir / "pareto.json").unlink(missing_ok=True)

    rows_ = status.rows
    pareto_figure = (
        [plots.pareto_front(rows_, space, metric, view.compute_metric, out_dir)] if pareto is not None else []
    )
    figures = [
        *pareto_figure,
        plots.best_so_far(rows_, metric, minimize, out_dir),
        plots.loss_vs_parameters(rows_, space, metric, minimize, out_dir),
        *(
            plots.loss_curves(
                stage, {d.row.index: d.curves[stage] for d in details}, rows_, minimize, out_dir
            )
            for stage in STAGES
        ),
    ]
    ax_figures = (
        _ax_figures(exp, metric, out_dir)
        if ax
        else [plots.Figure("", "Ax analyses", "", note="not computed (sweep report --no-ax)")]
    )
    files += [f.file for f in (*figures, *ax_figures) if f.file]
    ranked = {r.index: n for n, r in enumerate(rank_rows(rows_, minimize))}
    page = html_report.render(
        view=view,
        space=space,
        best=best,
        figures=figures,
        ax_figures=ax_figures,
        trials=sorted(records, key=lambda rec: ranked[rec["trial"]]),
        files=files,
        pareto=pareto,
    )
    html_path = out_dir / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return ReportFiles(out_dir=out_dir, html=html_path, figures=[*figures, *ax_figures], best=best)


def _ax_figures(exp: Any, metric: str, out_dir: Path) -> list[Any]:
    from sweep import ax_analyses, plots

    out = []
    for result in ax_analyses.compute(exp):
        title = ax_analyses.TITLES[result.key]
        if result.df is None:
            out.append(plots.Figure("", title, "", note=result.note))
        elif result.key == ax_analyses.SENSITIVITY:
            out.append(plots.sensitivity(result.df, metric, out_dir))
        else:
            out.append(plots.cross_validation(result.df, metric, result.r2, out_dir))
    return out


def report(exp: Any, out_dir: Path, *, ax: bool = True, console: Console | None = None) -> ReportFiles:
    """What ``sweep report`` does: print the summary, write the files, say where they are."""
    console = console or make_console()
    print_summary(exp, console)
    files = write_report(exp, out_dir, ax=ax)
    for f in files.figures:
        if f.note:
            console.print(f"[yellow]skipped[/] {f.title}: {f.note}", soft_wrap=True)
    drawn = sum(1 for f in files.figures if not f.note)
    console.print(f"report written to {files.html} ({drawn} plots, trials.csv, trials.json)", soft_wrap=True)
    return files
