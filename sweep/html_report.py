"""The self-contained ``report.html``: inline CSS, no scripts, images and data files beside it.

Everything the page references is a relative path to a file written into the same folder
(PNGs, trials.csv, trials.json, best.json), so the folder can be copied, zipped or opened
from a bucket mount without a network.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

from sweep.plots import STATE_COLOR, Figure
from sweep.report import fmt_compute, fmt_duration
from sweep.report import fmt_loss as _loss

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; margin: 0;
       color: #222; background: #f6f7f9; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 12px; }
.sub { color: #666; font-size: 13px; margin-bottom: 18px; word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #e2e4e8; border-radius: 8px; padding: 12px 16px; min-width: 120px;
        flex: 1 1 0; }
.card .k { color: #666; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 600; margin-top: 4px; }
.chip { display: inline-block; border-radius: 10px; padding: 1px 9px; font-size: 12px; color: #fff;
        margin: 2px 4px 2px 0; white-space: nowrap; }
.best { background: #fff; border: 1px solid #cfe8d5; border-left: 5px solid #55A868; border-radius: 8px;
        padding: 14px 18px; }
.best table td { padding: 2px 14px 2px 0; font-size: 14px; }
pre { background: #1f2430; color: #e6e6e6; padding: 10px 12px; border-radius: 6px; overflow-x: auto;
      font-size: 12.5px; white-space: pre-wrap; word-break: break-all; }
.plots { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 16px; margin-bottom: 12px; }
figure { background: #fff; border: 1px solid #e2e4e8; border-radius: 8px; margin: 0; padding: 12px; }
figure img { width: 100%; height: auto; }
figure.wide { grid-column: 1 / -1; }
figure.wide img { display: block; margin: 0 auto; }
figcaption { font-size: 13px; color: #444; margin-top: 6px; line-height: 1.4; }
figure h3 { font-size: 15px; margin: 0 0 8px; }
.note { background: #fff8e6; border: 1px solid #f0dca8; border-radius: 8px; padding: 10px 14px; font-size: 13px; }
table.trials { border-collapse: collapse; width: 100%; background: #fff; font-size: 13px; }
table.trials th, table.trials td { border-bottom: 1px solid #eceef1; padding: 5px 8px; text-align: left;
                                   vertical-align: top; }
table.trials th { background: #eef0f3; position: sticky; top: 0; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.reason { color: #8a3b3b; max-width: 340px; }
.files a { margin-right: 14px; }
"""


def render(
    *,
    view: Any,
    space: Any,
    best: dict[str, Any] | None,
    figures: Sequence[Figure],
    ax_figures: Sequence[Figure],
    trials: Sequence[dict[str, Any]],
    files: Sequence[str],
    pareto: Sequence[dict[str, Any]] | None = None,
) -> str:
    status = view.status
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(status.name)}: sweep report</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>Sweep report: {_e(status.name)}</h1>",
        f'<div class="sub">{_e(status.uri)} &middot; objective: {"minimize" if status.minimize else "maximize"} '
        f"{_e(status.metric)} &middot; generated {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</div>",
        _cards(view),
        "<h2>Best configuration</h2>",
        _best(best, status.metric),
        *(_pareto(pareto, status.metric, view.compute_metric) if pareto is not None else ()),
        "<h2>Optimization</h2>",
        _figures(figures),
        "<h2>Ax analyses</h2>",
        _figures(ax_figures),
        f"<h2>Trials ({len(trials)}, best first)</h2>",
        _trial_table(trials, space, status.metric),
        "<h2>Files</h2>",
        '<p class="files">' + "".join(f'<a href="{_e(f)}">{_e(f)}</a>' for f in files) + "</p>",
        "</main></body></html>",
    ]
    return "\n".join(parts)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _chip(state: str, text: str | None = None) -> str:
    color = STATE_COLOR.get(state, "#777777")
    return f'<span class="chip" style="background:{color}">{_e(text or state.replace("_", "-"))}</span>'


def _cards(view: Any) -> str:
    status = view.status
    counts = "".join(_chip(s, f"{s.replace('_', '-')} {n}") for s, n in status.counts.items() if n)
    best = status.best
    cards = [
        ("trials", f"{len(status.rows)} / {status.budget}"),
        ("states", counts or "none yet"),
        ("best so far", f"{_loss(best.loss, best.sem)} (trial {best.index})" if best else "-"),
        ("elapsed", fmt_duration(view.elapsed_s)),
        ("trials per hour", f"{view.per_hour:.1f}" if view.per_hour else "-"),
        (
            "time left",
            "finished"
            if status.finished
            else (f"≈ {fmt_duration(view.eta_s)}" if view.eta_s is not None else "-"),
        ),
    ]
    body = "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{v if k == "states" else _e(v)}'
        "</div></div>"
        for k, v in cards
    )
    return f'<div class="cards">{body}</div>'


def _best(best: dict[str, Any] | None, metric: str) -> str:
    if best is None:
        return '<div class="note">No completed trial yet: there is no best configuration to show.</div>'
    rows = "".join(
        f"<tr><td>{_e(k)}</td><td><b>{_e(_value(v))}</b></td></tr>" for k, v in best["params"].items()
    )
    return (
        f'<div class="best"><div>Trial <b>{best["trial"]}</b> ({_e(best["phase"])}): {_e(metric)} = '
        f"<b>{_e(_loss(best['loss'], best['sem']))}</b></div><table>{rows}</table>"
        f"<div>Reproduce it:</div><pre>{_e(best['command'])}</pre></div>"
    )


def _pareto(front: Sequence[dict[str, Any]], metric: str, compute: str) -> tuple[str, str]:
    """The Pareto-optimal trials of a two-objective sweep, cheapest first, with their commands."""
    title = f"<h2>Pareto-optimal trials ({_e(metric)} vs {_e(compute)})</h2>"
    if not front:
        return title, '<div class="note">No completed trial reports both objectives yet.</div>'
    rows = []
    for t in front:
        params = ", ".join(f"{k}={_value(v)}" for k, v in t["params"].items())
        rows.append(
            f'<tr><td class="num">&#9733; {t["trial"]}</td><td>{_e(t["phase"])}</td>'
            f'<td class="num">{_e(_loss(t[metric], t.get(metric + "_sem")))}</td>'
            f'<td class="num">{_e(fmt_compute(compute, t[compute]))}</td><td>{_e(params)}</td>'
            f'<td><pre>{_e(t["command"])}</pre></td></tr>'
        )
    head = "".join(
        f"<th>{_e(h)}</th>" for h in ("trial", "phase", f"{metric} ± SE", compute, "parameters", "reproduce")
    )
    table = (
        f'<table class="trials pareto"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )
    return title, table


def _figures(figures: Sequence[Figure]) -> str:
    out = []
    for f in figures:
        if f.note:
            out.append(
                f'<div class="note"><b>{_e(f.title)}</b>: skipped &mdash; {_e(f.note.rstrip("."))}.</div>'
            )
        else:
            wide = ' class="wide"' if f.wide else ""
            cap = f' style="max-width: {int(f.max_px)}px"' if f.max_px else ""
            out.append(
                f"<figure{wide}><h3>{_e(f.title)}</h3>"
                f'<img src="{_e(f.file)}" alt="{_e(f.title)}"{cap}>'
                f"<figcaption>{_e(f.caption)}</figcaption></figure>"
            )
    drawn = [o for o in out if o.startswith("<figure")]
    notes = [o for o in out if not o.startswith("<figure")]
    return (f'<div class="plots">{"".join(drawn)}</div>' if drawn else "") + "".join(notes)


def _trial_table(trials: Sequence[dict[str, Any]], space: Any, metric: str) -> str:
    names = [p.name for p in space.searched]
    compute = space.compute_objective.metric if space.compute_objective is not None else None
    head = [
        "trial",
        "phase",
        "state",
        "att.",
        *names,
        f"{metric} ± SE",
        *((compute,) if compute else ()),
        "stage:step",
        "time",
        "reason / note",
    ]
    rows = []
    for t in trials:
        params = t["params"]
        cells = [
            f'<td class="num">{t["trial"]}{" &#9733;" if t.get("pareto") else ""}</td>',
            f"<td>{_e(t['phase'])}</td>",
            f"<td>{_chip(t['state'])}</td>",
            f'<td class="num">{t["attempts"]}{_preempted(t)}</td>',
            *(f'<td class="num">{_e(_value(params[n])) if n in params else "&ndash;"}</td>' for n in names),
            f'<td class="num">{_e(_loss(t.get(metric), t.get(metric + "_sem")))}{_estimate(t, metric)}</td>',
            *((f'<td class="num">{_e(fmt_compute(compute, t["metrics"].get(compute)))}</td>',) if compute else ()),
            f'<td class="num">{_e(_stage_step(t))}</td>',
            f'<td class="num">{_e(fmt_duration(t.get("wall_s")))}</td>',
            f'<td class="reason">{_e(t.get("reason") or "")}</td>',
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f'<table class="trials"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _estimate(t: dict[str, Any], metric: str) -> str:
    """An early-stopped trial's objective is estimated from its last training loss: say so."""
    if t["state"] == "early_stopped" and t.get(metric) is not None:
        return ' <span title="last stage-2 loss + the completed trials\' offset">(est.)</span>'
    return ""


def _stage_step(t: dict[str, Any]) -> str:
    if t.get("stage") and t.get("step") is not None:
        return f"{t['stage']}:{t['step']}"
    return "-"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _preempted(trial: dict) -> str:
    """How many of the trial's attempts were preemptions (their own budget, trial.max_preemptions)."""
    n = trial.get("preemptions") or 0
    return f" ({n} preempted)" if n else ""
