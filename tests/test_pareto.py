"""The Pareto-front function (sweep/pareto.py) and how sweep status marks the front's trials."""

from __future__ import annotations

import math

import pytest

from sweep.pareto import pareto_optimal
from sweep.space import load_space
from sweep.status import TrialRow, _mark_pareto

MIN2 = [True, True]


def test_dominated_points_are_dropped():
    # (loss, flops): 1 is dominated by 0 (worse in both), 3 by 2; 0, 2, 4 trade off.
    points = [(5.0, 10.0), (6.0, 12.0), (4.0, 20.0), (4.5, 25.0), (3.0, 40.0)]
    assert pareto_optimal(points, MIN2) == [0, 2, 4]


def test_equal_in_one_objective_and_worse_in_the_other_is_dominated():
    assert pareto_optimal([(4.0, 10.0), (4.0, 11.0), (3.9, 11.0)], MIN2) == [0, 2]


def test_identical_points_tie_and_both_stay_on_the_front():
    assert pareto_optimal([(4.0, 10.0), (4.0, 10.0), (5.0, 20.0)], MIN2) == [0, 1]


def test_goal_direction_is_per_objective():
    points = [(0.80, 10.0), (0.90, 20.0), (0.85, 30.0)]
    # Maximise the first (an accuracy), minimise the second: 2 is beaten by 1 in both.
    assert pareto_optimal(points, [False, True]) == [0, 1]
    # Minimise both: 0 dominates everything.
    assert pareto_optimal(points, MIN2) == [0]
    # Maximise both: 1 and 2 trade off, 0 is beaten by 1.
    assert pareto_optimal(points, [False, False]) == [1, 2]


def test_single_and_empty_inputs():
    assert pareto_optimal([], MIN2) == []
    assert pareto_optimal([(1.0, 1.0)], MIN2) == [0]


@pytest.mark.parametrize("bad", [(math.nan, 1.0), (1.0, math.inf), (1.0,), (True, 1.0)])
def test_non_finite_or_malformed_points_are_refused(bad):
    with pytest.raises(ValueError, match="point 1"):
        pareto_optimal([(1.0, 1.0), bad], MIN2)


SPACE = load_space("""
name: p
objectives: [{metric: final_eval_loss, goal: minimize}, {metric: train_flops, goal: minimize}]
budget: {trials: 8}
parameters:
  s: {type: int, low: 1, high: 9, override: s}
""")


def _row(index, state, loss, flops, kind="search"):
    metrics = {} if flops is None else {"train_flops": flops}
    return TrialRow(index=index, phase="Sobol", state=state, attempt=1, worker=None, params={"s": 1},
                    description="", progress=None, heartbeat_age_s=None, loss=loss, sem=None, reason="",
                    ingested=True, metrics=metrics, kind=kind)


def test_status_marks_only_completed_trials_reporting_both_objectives():
    rows = (
        _row(0, "completed", 5.0, 1e12),
        _row(1, "completed", 6.0, 2e12),      # dominated by 0
        _row(2, "completed", 4.0, 3e12),
        _row(3, "failed", None, None),
        _row(4, "running", None, None),
        _row(5, "completed", 3.0, None),      # no compute value: cannot be placed
        _row(6, "completed", 3.5, 1e11, kind="replicate"),  # a noise re-run, not a configuration
    )
    marked = _mark_pareto(rows, SPACE)
    assert [r.index for r in marked if r.pareto] == [0, 2]


def test_a_single_objective_space_marks_nothing():
    single = load_space("""
name: p
objective: {metric: final_eval_loss, goal: minimize}
budget: {trials: 8}
parameters:
  s: {type: int, low: 1, high: 9, override: s}
""")
    assert single.compute_objective is None
    rows = (_row(0, "completed", 5.0, 1e12), _row(1, "completed", 4.0, 2e12))
    assert not any(r.pareto for r in _mark_pareto(rows, single))
