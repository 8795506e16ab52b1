"""The report's PNG plots, drawn with matplotlib (Agg: no display needed).

Every function takes plain data (rows of :class:`sweep.status.TrialRow`, curves, Ax data
frames) and an output folder, writes one PNG and returns a :class:`Figure` with the title and
the caption the HTML page shows under it; when there is nothing to draw it writes nothing and
returns a Figure whose ``note`` says why. Imported only by ``sweep report``, never by
``sweep status``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 -- the backend is chosen before pyplot loads
from matplotlib import ticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

PHASE_COLOR = {"Sobol": "#4C72B0", "BoTorch": "#DD8452"}
STATE_COLOR = {
    "completed": "#55A868",
    "failed": "#C44E52",
    "early_stopped": "#8172B3",
    "running": "#17BECF",
    "queued": "#BCBD22",
}
HIGHLIGHT = ("#2CA02C", "#D62728", "#1F77B4")  # best, second, third
DPI = 110


@dataclass(frozen=True)
class Figure:
    file: str  # file name inside the report folder ("" when skipped)
    title: str
    caption: str
    note: str = ""  # non-empty: not drawn, and why
    wide: bool = False  # spans the page's full width in report.html
    max_px: int | None = None  # cap on the drawn width in report.html


def _done(rows: Sequence[Any]) -> list[Any]:
    return [r for r in rows if r.state == "completed" and r.loss is not None and math.isfinite(r.loss)]


def _save(fig: Any, out_dir: Path, name: str) -> None:
    fig.savefig(out_dir / name, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _rank(rows: Sequence[Any], minimize: bool) -> list[Any]:
    return sorted(_done(rows), key=lambda r: (r.loss if minimize else -r.loss, r.index))


# -------------------- Best so far ------------------------------------------------------------


def best_so_far(rows: Sequence[Any], metric: str, minimize: bool, out_dir: Path) -> Figure:
    title = f"Best {metric} so far"
    done = _done(rows)
    if not done:
        return Figure("", title, "", note="no completed trial yet")
    fig, ax = plt.subplots(figsize=(9, 4.2))
    sobol = [r.index for r in rows if r.phase == "Sobol"]
    botorch = [r.index for r in rows if r.phase == "BoTorch"]
    if sobol and botorch:
        edge = max(sobol) + 0.5
        ax.axvspan(min(r.index for r in rows) - 0.5, edge, color=PHASE_COLOR["Sobol"], alpha=0.07, lw=0)
        ax.axvline(edge, color="#555555", ls="--", lw=1)
        ax.text(
            edge,
            1.0,
            "  Sobol | BoTorch  ",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=9,
            color="#333333",
        )
    for phase, color in PHASE_COLOR.items():
        pts = [r for r in done if r.phase == phase]
        if pts:
            ax.scatter(
                [r.index for r in pts],
                [r.loss for r in pts],
                color=color,
                s=36,
                zorder=3,
                label=f"{phase} trial",
                edgecolor="white",
                linewidth=0.6,
            )
            for r in pts:
                if r.sem:
                    ax.errorbar(r.index, r.loss, yerr=r.sem, color=color, lw=1, zorder=2)
    xs, ys, best = [], [], None
    for r in sorted(done, key=lambda r: r.index):
        if best is None or (r.loss < best if minimize else r.loss > best):
            best = r.loss
        xs.append(r.index)
        ys.append(best)
    last_index = max(r.index for r in rows)
    ax.step(
        [*xs, last_index], [*ys, ys[-1]], where="post", color="black", lw=1.8, zorder=4, label="best so far"
    )
    winner = _rank(rows, minimize)[0]
    ax.scatter(
        [winner.index],
        [winner.loss],
        marker="*",
        s=260,
        color="gold",
        edgecolor="black",
        zorder=5,
        label=f"best: trial {winner.index}",
    )
    for state, marker, label in (("failed", "x", "failed"), ("early_stopped", "v", "early-stopped")):
        idx = [r.index for r in rows if r.state == state]
        if idx:
            ax.scatter(
                idx,
                [0.03] * len(idx),
                transform=ax.get_xaxis_transform(),
                marker=marker,
                s=40,
                color=STATE_COLOR[state],
                zorder=5,
                label=label,
            )
    ax.set_xlabel("trial index")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    _save(fig, out_dir, "best_so_far.png")
    n_s, n_b = len([r for r in done if r.phase == "Sobol"]), len([r for r in done if r.phase == "BoTorch"])
    caption = (
        f"Each completed trial's {metric} by trial index ({n_s} Sobol in blue, {n_b} BoTorch in orange, "
        f"error bars: ± standard error); the black step line is the best value so far, the star the best "
        f"trial ({winner.index}). Failed (x) and early-stopped (v) trials are marked along the bottom."
    )
    return Figure("best_so_far.png", title, caption, wide=True, max_px=900)


# -------------------- Loss vs each parameter ------------------------------------------------


def loss_vs_parameters(rows: Sequence[Any], space: Any, metric: str, minimize: bool, out_dir: Path) -> Figure:
    title = f"{metric} vs each parameter"
    done = _done(rows)
    params = list(space.searched)
    if not done:
        return Figure("", title, "", note="no completed trial yet")
    cols = min(3, len(params))
    nrows = math.ceil(len(params) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    winner = _rank(rows, minimize)[0]
    logs = []
    for k, p in enumerate(params):
        ax = axes[k // cols][k % cols]
        pts = [r for r in done if p.name in r.params]
        ax.set_title(p.name + ("  (log scale)" if p.log else ""), fontsize=10)
        ax.grid(alpha=0.3)
        if not pts:
            ax.text(
                0.5,
                0.5,
                "not active in any\ncompleted trial",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="#777777",
            )
            continue
        if p.type in ("float", "int"):
            xs = [float(r.params[p.name]) for r in pts]
            if p.log:
                ax.set_xscale("log")
                # Plain numbers at 1-2-5 steps rather than overlapping "2x10^-3" minor labels.
                ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
                logs.append(p.name)
        else:
            cats = [_label(v) for v in p.domain]
            xs = [cats.index(_label(r.params[p.name])) + _jitter(r.index) for r in pts]
            ax.set_xticks(range(len(cats)), cats, fontsize=8)
            ax.set_xlim(-0.6, len(cats) - 0.4)
        for r, x in zip(pts, xs):
            is_best = r.index == winner.index
            ax.scatter(
                x,
                r.loss,
                color=PHASE_COLOR.get(r.phase, "#777777"),
                s=140 if is_best else 28,
                marker="*" if is_best else "o",
                edgecolor="black" if is_best else "white",
                linewidth=0.8 if is_best else 0.5,
                zorder=4 if is_best else 3,
            )
        if k % cols == 0:
            ax.set_ylabel(metric, fontsize=9)
    for k in range(len(params), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    handles = [
        Line2D([], [], marker="o", ls="", color=c, label=f"{ph} trial") for ph, c in PHASE_COLOR.items()
    ]
    handles.append(
        Line2D(
            [],
            [],
            marker="*",
            ls="",
            color="#777777",
            markeredgecolor="black",
            markersize=12,
            label=f"best (trial {winner.index})",
        )
    )
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, 1.02))
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    _save(fig, out_dir, "loss_vs_parameters.png")
    log_note = f"log x axis for {', '.join(logs)}" if logs else "no log-scaled parameter"
    caption = (
        f"{metric} of every completed trial against each searched parameter ({log_note}; choices and "
        "booleans as categories, spread sideways). A conditional parameter shows only the trials where "
        f"it was active. The star is the best trial ({winner.index})."
    )
    return Figure("loss_vs_parameters.png", title, caption, wide=len(params) > 2)


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _jitter(index: int) -> float:
    return ((index * 0.6180339887) % 1.0 - 0.5) * 0.3


# -------------------- Loss curves --------------------------------------------------------------


def loss_curves(
    stage: str,
    curves: Mapping[int, Sequence[tuple[int, float]]],
    rows: Sequence[Any],
    minimize: bool,
    out_dir: Path,
) -> Figure:
    """Every trial's training loss in ``stage``; the three best completed trials highlighted."""
    title = f"{stage} training loss of every trial"
    drawn = {i: c for i, c in curves.items() if c}
    if not drawn:
        return Figure("", title, "", note=f"no {stage} progress records in the store yet")
    by_index = {r.index: r for r in rows}
    top = [r.index for r in _rank(rows, minimize)[:3]]
    fig, ax = plt.subplots(figsize=(9, 4.4))
    labelled: set[str] = set()
    styles = {
        "completed": dict(color="#999999", lw=0.9, alpha=0.6, ls="-"),
        "early_stopped": dict(color=STATE_COLOR["early_stopped"], lw=1.1, alpha=0.9, ls="--"),
        "failed": dict(color=STATE_COLOR["failed"], lw=0.9, alpha=0.8, ls=":"),
        "running": dict(color=STATE_COLOR["running"], lw=1.2, alpha=0.9, ls="-"),
        "queued": dict(color=STATE_COLOR["queued"], lw=0.9, alpha=0.8, ls="-."),
    }
    names = {
        "completed": "other completed trials",
        "early_stopped": "early-stopped",
        "failed": "failed",
        "running": "running",
        "queued": "queued (requeued)",
    }
    smoothed = 0
    lows, highs = [], []
    for i, curve in sorted(drawn.items()):
        if i in top:
            continue
        state = by_index[i].state if i in by_index else "completed"
        steps, losses, window = _series(curve)
        smoothed = max(smoothed, window)
        style = styles.get(state, styles["completed"])
        label = names.get(state, state) if state not in labelled else None
        labelled.add(state)
        ax.plot(steps, losses, label=label, **style)
        lows.append(min(losses))
        highs.append(max(losses))
    for rank, i in enumerate(top):
        if i not in drawn:
            continue
        steps, losses, window = _series(drawn[i])
        smoothed = max(smoothed, window)
        r = by_index[i]
        ax.plot(
            steps,
            losses,
            color=HIGHLIGHT[rank],
            lw=2.2,
            zorder=6 - rank,  # the best on top where curves coincide (same stage-1.9 settings)
            label=f"#{rank + 1}: trial {i} ({r.loss:.4f})",
        )
        lows.append(min(losses))
        highs.append(max(losses))
    if lows and min(lows) > 0 and max(highs) / min(lows) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(f"{stage} step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    name = f"curves_{stage}.png"
    _save(fig, out_dir, name)
    smooth_note = f" Curves longer than 200 steps are averaged over {smoothed} steps." if smoothed > 1 else ""
    caption = (
        f"The {stage} training loss of {len(drawn)} trial(s) by step, from the progress records their "
        f"workers uploaded. The three best completed trials by final objective are drawn thick "
        f"({', '.join(f'trial {i}' for i in top) or 'none yet'}); early-stopped trials are dashed, failed "
        f"dotted, running ones cyan.{smooth_note}"
    )
    return Figure(name, title, caption)


def _series(curve: Sequence[tuple[int, float]]) -> tuple[list[int], list[float], int]:
    steps = [s for s, _ in curve]
    losses = [v for _, v in curve]
    window = len(curve) // 100 if len(curve) > 200 else 1
    if window > 1:
        acc, out = 0.0, []
        for k, v in enumerate(losses):
            acc += v
            if k >= window:
                acc -= losses[k - window]
            out.append(acc / min(k + 1, window))
        losses = out
    return steps, losses, window


# -------------------- Ax analyses --------------------------------------------------------------


def sensitivity(df: Any, metric: str, out_dir: Path) -> Figure:
    """Bars of Ax's total-order Sobol sensitivity of the objective to each parameter (signed)."""
    title = "Parameter sensitivity (Ax)"
    data = sorted(zip(df["parameter_name"], df["sensitivity"]), key=lambda t: abs(float(t[1])))
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(data) + 1.4))
    values = [float(v) for _, v in data]
    ax.barh([str(n) for n, _ in data], values, color=["#C44E52" if v > 0 else "#4C72B0" for v in values])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"signed total-order sensitivity of {metric}")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, out_dir, "ax_sensitivity.png")
    caption = (
        f"Ax's total-order Sobol sensitivity of {metric} to each parameter, from the fitted BoTorch model; "
        f"the sign is that of the average gradient: red bars raise {metric} as the parameter grows, blue "
        "bars lower it. Longer bars matter more."
    )
    return Figure("ax_sensitivity.png", title, caption)


def cross_validation(df: Any, metric: str, r2: float | None, out_dir: Path) -> Figure:
    """Ax's leave-one-out cross-validation: predicted vs observed objective, 95% intervals."""
    title = "Model fit: predicted vs observed (Ax cross-validation)"
    obs = [float(v) for v in df["observed"]]
    pred = [float(v) for v in df["predicted"]]
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    ax.errorbar(
        obs,
        pred,
        xerr=[float(v) for v in df["observed_95_ci"]],
        yerr=[float(v) for v in df["predicted_95_ci"]],
        fmt="o",
        color="#4C72B0",
        ecolor="#9DB3D6",
        elinewidth=1,
        markersize=5,
        zorder=3,
    )
    lo, hi = min(obs + pred), max(obs + pred)
    pad = (hi - lo) * 0.08 or 0.1
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", color="black", lw=1, label="y = x")
    for arm, x, y in zip(df["arm_name"], obs, pred):
        ax.annotate(
            str(arm).split("_")[0],
            (x, y),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
            color="#555555",
        )
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"observed {metric}")
    ax.set_ylabel(f"predicted {metric} (left out)")
    if r2 is not None:
        ax.set_title(f"R² = {r2:.2f}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    _save(fig, out_dir, "ax_cross_validation.png")
    caption = (
        f"Leave-one-out cross-validation of the BoTorch model Ax fitted to {metric}: each point is one trial "
        "(labelled with its index) predicted by a model that did not see it, with 95% intervals. Points on "
        "the dashed diagonal are predicted well" + (f"; R² = {r2:.2f}." if r2 is not None else ".")
    )
    return Figure("ax_cross_validation.png", title, caption)


# -------------------- Pareto front (two-objective sweeps) -----------------------------------


def pareto_front(rows: Sequence[Any], space: Any, metric: str, compute: str, out_dir: Path) -> Figure:
    """Loss against compute for every completed trial, the Pareto-optimal ones joined up.

    The front is the rows' ``pareto`` marks (sweep.status); the x axis is logarithmic when every
    compute value is positive, as FLOP counts across a length sweep span orders of magnitude.
    """
    from sweep.status import pareto_candidates

    title = f"Pareto front: {metric} vs {compute}"
    pts = pareto_candidates(rows, space)
    if not pts:
        return Figure("", title, "", note=f"no completed trial reports both {metric} and {compute} yet")
    xs = {r.index: float(r.metrics[compute]) for r in pts}
    front = sorted((r for r in pts if r.pareto), key=lambda r: (xs[r.index], r.index))
    others = [r for r in pts if not r.pareto]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for phase, color in PHASE_COLOR.items():
        group = [r for r in others if r.phase == phase]
        if group:
            ax.scatter([xs[r.index] for r in group], [r.loss for r in group], color=color, s=34, zorder=3,
                       edgecolor="white", linewidth=0.6, label=f"{phase} trial")
    other_phases = [r for r in others if r.phase not in PHASE_COLOR]
    if other_phases:
        ax.scatter([xs[r.index] for r in other_phases], [r.loss for r in other_phases], color="#777777",
                   s=34, zorder=3, edgecolor="white", linewidth=0.6, label="other trial")
    # The attainment staircase: up to the next front point's compute, the best loss on offer is this one's.
    ax.step([xs[r.index] for r in front], [r.loss for r in front], where="post", color=HIGHLIGHT[1], lw=1.6,
            zorder=4, label=f"Pareto front ({len(front)} trials)")
    ax.scatter([xs[r.index] for r in front], [r.loss for r in front], marker="*", s=190, color="gold",
               edgecolor="black", linewidth=0.8, zorder=5)
    for r in front:
        ax.annotate(str(r.index), (xs[r.index], r.loss), textcoords="offset points", xytext=(6, 5), fontsize=8)
    log = all(v > 0 for v in xs.values())
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(compute + (" (log scale)" if log else ""))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    _save(fig, out_dir, "pareto_front.png")
    caption = (
        f"{metric} against {compute} for each of the {len(pts)} completed trials. Stars, joined by the red "
        f"staircase, are the Pareto-optimal trials (numbered): no other trial is at least as cheap and as "
        f"good and strictly better in one of the two ({'lower' if space.objective.minimize else 'higher'} "
        f"{metric} is better). Their reproduce commands are listed under 'Pareto-optimal trials'."
    )
    return Figure("pareto_front.png", title, caption, wide=True, max_px=900)
