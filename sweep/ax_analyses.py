"""Ax's own analyses of a sweep, for the report: parameter sensitivity and model fit.

Both come from the BoTorch model Ax fits to the experiment as stored (``Experiment.client()``,
a decoded copy; nothing is written back):

* ``SensitivityAnalysisPlot`` -- signed total-order Sobol indices of the objective per parameter;
* ``CrossValidationPlot(untransform=True)`` -- leave-one-out predicted vs observed objective.

Ax decides whether each one applies (e.g. a sweep still in its Sobol phase has no fitted model,
a handful of trials cannot be cross-validated); an analysis that does not apply or fails yields
a one-line note instead of data, and the report shows the note in place of the plot. Ax (and
torch) are imported here only, on first use.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

SENSITIVITY = "sensitivity"
CROSS_VALIDATION = "cross_validation"
TITLES = {
    SENSITIVITY: "Parameter sensitivity (Ax)",
    CROSS_VALIDATION: "Model fit: predicted vs observed (Ax cross-validation)",
}


@dataclass(frozen=True)
class AxResult:
    key: str  # SENSITIVITY or CROSS_VALIDATION
    df: Any = None  # pandas DataFrame when computed
    r2: float | None = None  # cross-validation only
    note: str = ""  # why there is no data (one line)


def compute(exp: Any) -> list[AxResult]:
    """Sensitivity and cross-validation of ``exp``'s objective; never raises for an analysis that fails."""
    try:
        with _quiet():
            client = exp.client()
    except Exception as exc:  # noqa: BLE001 -- the report must still be written without Ax
        note = f"the Ax snapshot could not be loaded: {_one_line(exc)}"
        return [AxResult(SENSITIVITY, note=note), AxResult(CROSS_VALIDATION, note=note)]
    experiment, strategy = client._experiment, client._generation_strategy
    completed = sum(1 for t in experiment.trials.values() if t.status.is_completed)
    if completed < 2:
        note = f"Ax needs at least 2 completed trials to fit a model; this sweep has {completed}"
        return [AxResult(SENSITIVITY, note=note), AxResult(CROSS_VALIDATION, note=note)]
    # A two-objective sweep: Ax needs to be told which metric to analyse; the report's is the quality one.
    metric = exp.space.objective.metric if exp.space.compute_objective is not None else None
    return [_sensitivity(experiment, strategy, metric), _cross_validation(experiment, strategy, metric)]


def _sensitivity(experiment: Any, strategy: Any, metric: str | None = None) -> AxResult:
    from ax.analysis.plotly.sensitivity import SensitivityAnalysisPlot

    analysis = SensitivityAnalysisPlot(metric_name=metric, order="total", top_k=None)
    try:
        with _quiet():
            why = analysis.validate_applicable_state(experiment=experiment, generation_strategy=strategy)
            if why:
                return AxResult(SENSITIVITY, note=f"Ax says it does not apply yet: {_one_line(why)}")
            card = analysis.compute(experiment=experiment, generation_strategy=strategy)
    except Exception as exc:  # noqa: BLE001 -- Ax raises many kinds; the note names it
        return AxResult(SENSITIVITY, note=f"Ax could not compute it: {_one_line(exc)}")
    df = card.df
    if df is None or df.empty or "sensitivity" not in df:
        return AxResult(SENSITIVITY, note="Ax returned no sensitivity values")
    if float(df["sensitivity"].abs().sum()) < 1e-9:
        return AxResult(
            SENSITIVITY,
            note="Ax's fitted model attributes no variation to any parameter (every sensitivity is 0): "
            "too few or too noisy trials to rank the parameters yet",
        )
    return AxResult(SENSITIVITY, df=df)


def _cross_validation(experiment: Any, strategy: Any, metric: str | None = None) -> AxResult:
    from ax.analysis.plotly.cross_validation import CrossValidationPlot

    analysis = CrossValidationPlot(untransform=True)
    try:
        with _quiet():
            why = analysis.validate_applicable_state(experiment=experiment, generation_strategy=strategy)
            if why:
                return AxResult(CROSS_VALIDATION, note=f"Ax says it does not apply yet: {_one_line(why)}")
            card = analysis.compute(experiment=experiment, generation_strategy=strategy)
    except Exception as exc:  # noqa: BLE001
        return AxResult(CROSS_VALIDATION, note=f"Ax could not compute it: {_one_line(exc)}")
    cards = card.flatten() if hasattr(card, "flatten") else [card]
    if metric is not None:  # one card per metric: the quality metric's ("Cross Validation for <metric> ...")
        cards = [c for c in cards if f" for {metric} " in f"{getattr(c, 'title', '')} "]
    for child in cards:
        df = getattr(child, "df", None)
        if df is not None and {"observed", "predicted"} <= set(df.columns) and len(df):
            return AxResult(CROSS_VALIDATION, df=df, r2=_r2(df))
    return AxResult(CROSS_VALIDATION, note="Ax returned no cross-validation points")


def _r2(df: Any) -> float | None:
    obs = [float(v) for v in df["observed"]]
    pred = [float(v) for v in df["predicted"]]
    mean = sum(obs) / len(obs)
    total = sum((o - mean) ** 2 for o in obs)
    if total <= 0:
        return None
    value = 1.0 - sum((o - p) ** 2 for o, p in zip(obs, pred)) / total
    return value if math.isfinite(value) else None


def _one_line(value: Any) -> str:
    text = str(value).strip()
    if isinstance(value, BaseException):
        text = f"{type(value).__name__}: {text}" if text else type(value).__name__
    first = text.splitlines()[0] if text else ""
    return first[:300]


@contextmanager
def _quiet() -> Iterator[None]:
    """Ax logs INFO lines and warnings on every model fit; the report prints its own summary."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.split(".")[0] == "ax"]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
