"""The shipped search spaces and what a SearchSpace does with a parameterization."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweep.space import SearchSpace, SpaceError, load_space, render_value

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))
NOTEBOOK = ROOT / "search_spaces" / "stage19_stage2.yaml"
TINY = ROOT / "search_spaces" / "tiny_cpu.yaml"

SALIENCY_ON = {
    "stage1_9_lr": 0.003,
    "stage2_lr": 0.0025,
    "saliency": True,
    "initial_k": 0.15,
    "saliency_schedule": "cosine",
    "ema_decay": 0.99,
}
SALIENCY_OFF = {"stage1_9_lr": 0.003, "stage2_lr": 0.0025, "saliency": False}


def test_both_spaces_ship() -> None:
    assert {p.name for p in SHIPPED} >= {"stage19_stage2.yaml", "tiny_cpu.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_space_loads_and_round_trips(path: Path) -> None:
    space = load_space(path)
    assert isinstance(space, SearchSpace)
    assert space.name == path.stem
    assert load_space(space.to_yaml()) == space


def test_notebook_space_matches_the_notebook() -> None:
    space = load_space(NOTEBOOK)
    assert space.objective.metric == "final_eval_loss" and space.objective.minimize
    assert (space.budget.trials, space.budget.sobol_trials) == (30, 12)
    assert space.base_overrides == (
        "model=smollm2_135m",
        "data=fineweb",
        "stage1_9.max_steps=100",
        "stage2.max_steps=100",
        "stage2.lambda_warmup.warmup_steps=50",
        "run.checkpoint_every=25",
    )
    lr = space.parameter("stage1_9_lr")
    assert (lr.type, lr.low, lr.high, lr.log) == ("float", 1e-3, 8e-3, True)
    assert space.parameter("initial_k").values == (0.05, 0.1, 0.15, 0.2)
    assert space.parameter("saliency_schedule").values == ("linear", "cosine")
    assert space.parameter("ema_decay").values == (0.95, 0.99, 0.995)
    for child in ("initial_k", "saliency_schedule", "ema_decay"):
        assert space.parameter(child).only_if.parent == "saliency"
        assert space.parameter(child).only_if.value is True


def test_tiny_space_has_the_notebook_shape_on_the_offline_model() -> None:
    tiny, notebook = load_space(TINY), load_space(NOTEBOOK)
    # The same parameters, except the LR bounds: the tiny space's come from a 1-D scan of each LR on its
    # 30 + 30-step trials (best 1.6e-2, strictly inside; docs/benchmarks.md, "LR scan on the tiny pipeline").
    lr_bounds = {"stage1_9_lr": (2e-3, 6.4e-2), "stage2_lr": (2e-3, 6.4e-2)}

    def shape(space, rebound):
        out = []
        for p in space.parameters:
            d = p.to_dict()
            if rebound and p.name in lr_bounds:
                assert (d["low"], d["high"]) == lr_bounds[p.name]
            if p.name in lr_bounds:
                d = {k: v for k, v in d.items() if k not in ("low", "high")}
            out.append(d)
        return out

    assert shape(tiny, True) == shape(notebook, False)
    assert "model=tiny" in tiny.base_overrides and "data=builtin" in tiny.base_overrides
    assert (tiny.budget.trials, tiny.budget.sobol_trials) == (8, 4)


def test_overrides_drop_inactive_children() -> None:
    space = load_space(NOTEBOOK)
    with_junk = {**SALIENCY_OFF, "initial_k": 0.2, "saliency_schedule": "linear", "ema_decay": 0.95}
    assert space.overrides(with_junk) == [
        "model=smollm2_135m",
        "data=fineweb",
        "stage1_9.max_steps=100",
        "stage2.max_steps=100",
        "stage2.lambda_warmup.warmup_steps=50",
        "run.checkpoint_every=25",
        "stage1_9.optimizer.lr=0.003",
        "stage2.optimizer.lr=0.0025",
        "stage1_9.saliency.enabled=false",
    ]
    assert space.active_parameters(with_junk) == SALIENCY_OFF


def test_overrides_keep_active_children() -> None:
    space = load_space(NOTEBOOK)
    assert space.overrides(SALIENCY_ON)[6:] == [
        "stage1_9.optimizer.lr=0.003",
        "stage2.optimizer.lr=0.0025",
        "stage1_9.saliency.enabled=true",
        "stage1_9.saliency.initial_k=0.15",
        "stage1_9.saliency.schedule=cosine",
        "stage1_9.saliency.ema_decay=0.99",
    ]


def test_describe_is_one_short_line_of_active_parameters() -> None:
    space = load_space(NOTEBOOK)
    assert space.describe(SALIENCY_OFF) == "stage1_9_lr=0.003 stage2_lr=0.0025 saliency=false"
    assert space.describe({**SALIENCY_ON, "stage2_lr": 0.00123456}).startswith(
        "stage1_9_lr=0.003 stage2_lr=0.00123 "
    )


FIXED_AND_NESTED = """
name: nested
objective: {metric: loss, goal: maximize}
budget: {trials: 4, sobol_trials: 2}
parameters:
  opt: {type: choice, values: [adamw, muon], override: optimizer}
  momentum: {type: float, low: 0.8, high: 0.99, override: optimizer.momentum, only_if: {opt: muon}}
  nesterov: {type: bool, override: optimizer.nesterov, only_if: {opt: muon}}
  ns_steps: {type: int, low: 3, high: 7, override: optimizer.ns_steps, only_if: {nesterov: true}}
  clip: {type: fixed, value: 1.0, override: +optimizer.clip, only_if: {opt: muon}}
  tag: {type: fixed, value: sweep-a, override: run.tag}
"""


def test_fixed_parameters_are_filled_and_nested_conditions_followed() -> None:
    space = load_space(FIXED_AND_NESTED)
    assert space.active_parameters({"opt": "adamw"}) == {"opt": "adamw", "tag": "sweep-a"}
    muon = {"opt": "muon", "momentum": 0.9, "nesterov": True, "ns_steps": 5}
    assert space.active_parameters(muon) == {**muon, "clip": 1.0, "tag": "sweep-a"}
    assert space.overrides({**muon, "nesterov": False, "ns_steps": 5}) == [
        "optimizer=muon",
        "optimizer.momentum=0.9",
        "optimizer.nesterov=false",
        "+optimizer.clip=1.0",
        "run.tag=sweep-a",
    ]
    assert space.budget.seed == 0  # the default: reproducible unless asked otherwise
    assert space.trial.max_attempts == 3 and space.early_stopping is None


def test_round_trip_keeps_every_field() -> None:
    text = FIXED_AND_NESTED + "trial: {max_attempts: 5, heartbeat_s: 2.5, grace_s: 0}\n"
    text += "early_stopping: {percentile: 40, min_progression: 10, min_curves: 3}\n"
    space = load_space(text)
    again = load_space(space.to_yaml())
    assert again == space
    assert again.trial.heartbeat_s == 2.5 and again.early_stopping.percentile == 40.0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"stage2_lr": 0.003, "saliency": False}, "trial parameters: missing active parameter 'stage1_9_lr'"),
        (
            {**SALIENCY_OFF, "lr": 1},
            "trial parameters: unknown parameter 'lr'; space 'stage19_stage2' has "
            "stage1_9_lr, stage2_lr, saliency, initial_k, saliency_schedule, ema_decay",
        ),
        (
            {**SALIENCY_OFF, "stage2_lr": 0.5},
            "trial parameters.stage2_lr: must be within [0.001, 0.008], got 0.5",
        ),
        (
            {**SALIENCY_ON, "initial_k": 0.3},
            "trial parameters.initial_k: must be one of [0.05, 0.1, 0.15, 0.2], got 0.3",
        ),
        ({**SALIENCY_OFF, "saliency": 1}, "trial parameters.saliency: must be one of [false, true], got 1"),
    ],
)
def test_parameterizations_outside_the_space_are_refused(params: dict, message: str) -> None:
    with pytest.raises(SpaceError) as err:
        load_space(NOTEBOOK).overrides(params)
    assert str(err.value) == message


def test_values_render_as_hydra_reads_them() -> None:
    assert [render_value(v) for v in (True, False, 3, 0.003, 1e-05, "cosine", "true", "10", "a b")] == [
        "true",
        "false",
        "3",
        "0.003",
        "1e-05",
        "cosine",
        "'true'",
        "'10'",
        "'a b'",
    ]


def test_scientific_notation_without_a_dot_is_a_number() -> None:
    # YAML 1.1 (PyYAML) would read 1e-3 as the string '1e-3'.
    space = load_space(NOTEBOOK.read_text().replace("low: 1.0e-3", "low: 1e-3"))
    assert space.parameter("stage2_lr").low == 0.001


def test_ax_configs_make_saliency_the_parent_of_its_knobs() -> None:
    from ax import ChoiceParameterConfig, RangeParameterConfig

    configs = {c.name: c for c in load_space(NOTEBOOK).ax_parameter_configs()}
    assert list(configs) == [
        "stage1_9_lr",
        "stage2_lr",
        "saliency",
        "initial_k",
        "saliency_schedule",
        "ema_decay",
    ]
    lr = configs["stage2_lr"]
    assert isinstance(lr, RangeParameterConfig) and lr.bounds == (1e-3, 8e-3) and lr.scaling == "log"
    saliency = configs["saliency"]
    assert isinstance(saliency, ChoiceParameterConfig) and saliency.parameter_type == "bool"
    assert saliency.dependent_parameters == {True: ["initial_k", "saliency_schedule", "ema_decay"]}
    assert configs["saliency_schedule"].is_ordered is False and configs["ema_decay"].is_ordered is True


def test_fixed_parameters_are_not_given_to_ax() -> None:
    names = [c.name for c in load_space(FIXED_AND_NESTED).ax_parameter_configs()]
    assert names == ["opt", "momentum", "nesterov", "ns_steps"]
