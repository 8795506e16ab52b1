"""Smoke test of scripts/bench_search.py: the objectives' optima, the space translation, one tiny run."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from sweep.testing.synthetic_trial import HARTMANN6_ARGMIN, HARTMANN6_MIN, hartmann6

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_search", ROOT / "scripts" / "bench_search.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_search"] = module
    spec.loader.exec_module(module)
    return module


def test_hartmann6_optimum():
    assert hartmann6(list(HARTMANN6_ARGMIN)) == pytest.approx(HARTMANN6_MIN, abs=1e-4)
    rng = np.random.default_rng(0)
    assert min(hartmann6(list(x)) for x in rng.random((2000, 6))) > HARTMANN6_MIN


def test_mixed_optimum_is_inside_the_conditional_branch(bench):
    assert bench.mixed_loss(bench.MIXED_ARGMIN) == pytest.approx(bench.MIXED_MIN)
    space = bench.load_space(bench.get_problem("mixed").space_yaml(30, 12, 0))
    lrs = np.geomspace(1e-3, 8e-3, 41)
    best_off = min(
        bench.mixed_loss({"stage1_9_lr": a, "stage2_lr": b, "saliency": False}) for a in lrs for b in lrs
    )
    assert best_off == pytest.approx(2.0, abs=1e-3)  # saliency off: regret 0.1 at best
    children = [space.parameter(n).values for n in ("initial_k", "saliency_schedule", "ema_decay")]
    for k, schedule, ema in itertools.product(*children):
        p = {**bench.MIXED_ARGMIN, "initial_k": k, "saliency_schedule": schedule, "ema_decay": ema}
        assert bench.mixed_loss(p) >= bench.MIXED_MIN - 1e-12
    # Every point the space can produce is valid input, and the optimum is one of them.
    assert space.active_parameters(bench.MIXED_ARGMIN) == bench.MIXED_ARGMIN


def test_optuna_translation_suggests_children_only_when_active(bench):
    optuna = pytest.importorskip("optuna")
    space = bench.load_space(bench.get_problem("mixed").space_yaml(30, 12, 0))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        params = bench.optuna_params(space, study.ask())
        assert space.active_parameters(params) == params
        seen.add(params["saliency"])
        assert ("initial_k" in params) == params["saliency"]
    assert seen == {False, True}


def test_tiny_runs_through_every_method(bench):
    records = []
    for method in bench.METHODS:
        job = bench.Job("mixed", method, "par4", budget=7, seed=1, sobol=4)
        record = bench.run_job(job)
        assert len(record["trials"]) == 7, method
        regrets = bench.curve(record)
        assert all(r >= 0 for r in regrets) and regrets == sorted(regrets, reverse=True)
        assert record["decide_s_per_trial"] >= 0
        records.append(record)
    ours = records[0]
    # Our sweep went Sobol -> BoTorch, and status().best is the best observed trial.
    assert [t["phase"] for t in ours["trials"]][:4] == ["Sobol"] * 4
    assert "BoTorch" in {t["phase"] for t in ours["trials"]}
    assert ours["status_best_loss"] == min(t["observed"] for t in ours["trials"])
    rows = bench.summarize(records, [5, 7])
    assert {r["method"] for r in rows} == set(bench.METHODS)
    assert all(not math.isnan(r["median"]) for r in rows)
    assert "| mixed | par4 | 7 |" in bench.markdown_table(rows)


def test_default_sobol_count_when_the_space_leaves_it_out(bench):
    from sweep.space import default_sobol_trials

    text = (ROOT / "search_spaces" / "stage19_stage2.yaml").read_text()
    text = text.replace("budget: {trials: 30, sobol_trials: 12, seed: 0}", "budget: {trials: 30, seed: 0}")
    space = bench.load_space(text)
    assert space.budget.sobol_trials == 7  # 6 searched parameters + 1
    assert bench.load_space(space.to_yaml()) == space  # spelled out in the canonical YAML
    assert [default_sobol_trials(t, 6) for t in (1, 2, 8, 10, 14, 20, 100)] == [1, 1, 4, 5, 7, 7, 7]
    assert default_sobol_trials(30, 2) == 5 and default_sobol_trials(30, 20) == 15
