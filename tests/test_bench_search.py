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


def _fake_real_problem(bench, cache, calls):
    """The --real space (tiny_cpu.yaml's parameters, reduced base overrides) on a fake evaluator that
    reports like training.run_trial (final_eval_loss and the eval-batch SEM) through the cache."""

    def evaluate(params, space, rng):
        overrides = space.overrides(params)

        def compute():
            calls.append(overrides)
            value = bench.mixed_loss(params)  # tiny_cpu.yaml has the same six parameters
            return {"result": {"status": "completed", "metrics": {bench.METRIC: value, "eval_batch_sem": 0.1}},
                    "eval_s": 0.0, "cpu_s": 0.0, "how": "fake"}

        entry, hit = cache.get_or_compute(overrides, compute)
        result = dict(entry["result"])
        result["true_value"] = result["metrics"][bench.METRIC]
        result["bench"] = {"cached": hit, "eval_s": 0.0, "cpu_s": 0.0, "how": "fake"}
        return result

    return bench.Problem("real", bench._real_space(10, "test"), None, 0.0, evaluate)


def test_real_scoreboard_methods_par2_cache_and_report(bench, tmp_path):
    import yaml

    tiny = yaml.safe_load((ROOT / "search_spaces" / "tiny_cpu.yaml").read_text())
    cache = bench.EvalCache(tmp_path / "cache.jsonl")
    calls: list[list[str]] = []
    problem = _fake_real_problem(bench, cache, calls)
    # The scoreboard's space: tiny_cpu.yaml's parameters and bounds, only base overrides changed.
    assert problem.space["parameters"] == tiny["parameters"]
    assert "stage1_9.max_steps=10" in problem.space["base_overrides"]
    assert "model.tiny.hidden_size=64" in problem.space["base_overrides"]
    assert bench.reference_overrides(problem) == problem.space["base_overrides"]
    # No heartbeats in the benchmark: a trial pending behind another's evaluation and a BoTorch fit
    # (tens of seconds on a loaded machine) must not be presumed dead, requeued and run twice.
    assert bench.load_space(problem.space_yaml(16, None, 0)).trial.stale_after_s >= 3600

    records = []
    for method in bench.METHODS:
        job = bench.Job("real", method, "par2", budget=5, seed=3, sobol=3, covers=(4, 5))
        record = bench.run_job(job, problem)
        assert len(record["trials"]) == 5, method
        best = bench.curve(record)
        assert best == sorted(best, reverse=True) and not any(math.isnan(b) for b in best)
        records.append(record)
    by_method = {r["job"]["method"]: r for r in records}
    assert by_method["sweep"]["noise"] == "infer"  # the product's default
    assert by_method["sweep_eval_sem"]["noise"] == "eval_sem"
    # The two sweeps and random search start from the same seeded Sobol points: computed once.
    first = [t["params"] for t in by_method["sweep"]["trials"][:3]]
    assert [t["params"] for t in by_method["sweep_eval_sem"]["trials"][:3]] == first
    assert all(t["bench"]["cached"] for t in by_method["sweep_eval_sem"]["trials"][:3])
    assert len(calls) == len({tuple(c) for c in calls})  # nothing evaluated twice
    # Persisted: a fresh cache on the same file answers without computing.
    again = bench.EvalCache(tmp_path / "cache.jsonl")
    entry, hit = again.get_or_compute(calls[0], lambda: pytest.fail("recomputed a cached evaluation"))
    assert hit and entry["overrides"] == calls[0]

    rows = bench.summarize(records, [4, 5])
    assert {r["method"] for r in rows} == set(bench.METHODS) and {r["budget"] for r in rows} == {4, 5}
    table = bench.real_table(rows, 5.25)
    assert "| par2 | 5 |" in table and "noise: eval_sem" in table and "5.2500" in table
    stats = bench.eval_stats(records, cache)
    assert stats["trials_asked"] == 25 and stats["answered_from_cache"] == 25 - len(calls)
    bench.plot_real(records, tmp_path / "real.png", [4, 5], 5.25)
    assert (tmp_path / "real.png").stat().st_size > 10_000


def test_eval_cache_keys_failures_and_code(bench, tmp_path):
    cache = bench.EvalCache(tmp_path / "c.jsonl")
    failed = {"result": {"status": "failed", "reason": "boom"}, "eval_s": 0.0, "cpu_s": 0.0, "how": "fake"}
    ok = {"result": {"status": "completed", "metrics": {bench.METRIC: 1.0}}, "eval_s": 0.0, "cpu_s": 0.0, "how": "fake"}
    assert cache.get_or_compute(["a=1"], lambda: failed) == ({"key": cache.key(["a=1"]), "fingerprint": cache.fingerprint,
                                                             "overrides": ["a=1"], **failed}, False)
    assert cache.get(["a=1"]) is None  # a failure is not cached: it may be a passing fault
    cache.get_or_compute(["a=1"], lambda: ok)
    assert cache.get(["a=1"])["result"] == ok["result"]
    assert cache.get(["a=1", "b=2"]) is None and cache.get(["b=2", "a=1"]) is None  # the exact list
    other = bench.EvalCache(tmp_path / "c.jsonl")
    other.fingerprint = "different-training-code"
    assert other.get(["a=1"]) is None  # another version of the training code recomputes


def test_real_cli_defaults(bench):
    args = bench.parse_args(["--real"])
    assert args.methods == list(bench.METHODS) and args.modes == ["seq", "par2"]
    assert args.budgets == [8, 12, 16] and args.anytime and args.cache.name == "eval_cache.jsonl"
    jobs = bench.plan(bench.parse_args(["--real", "--seeds", "2", "--real-steps", "10", "--real-shape", "test"]))
    assert len(jobs) == 2 * 2 * 5  # seeds x modes x methods: one 16-trial run each, read at 8/12/16
    assert all(j.budget == 16 and j.covers == (8, 12, 16) and j.real_steps == 10 for j in jobs)
    synthetic = bench.parse_args([])
    assert synthetic.methods == list(bench.SYNTHETIC_METHODS) and synthetic.modes == ["seq", "par4"]
