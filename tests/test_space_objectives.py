"""``objectives:`` (loss vs compute, Ax multi-objective) in the search space: parsing, the Ax objective
string, the canonical YAML round trip, and every bad input as one line naming the field -- from
``load_space`` and from ``sweep init`` (exit 2, the store left byte-for-byte as it was)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweep.cli import main as sweep_main
from sweep.space import COMPUTE_METRICS, SpaceError, load_space

LOSS = {"metric": "final_eval_loss", "goal": "minimize"}
FLOPS = {"metric": "train_flops", "goal": "minimize"}


def space_text(**top) -> str:
    doc = {
        "name": "p",
        "objectives": [LOSS, FLOPS],
        "budget": {"trials": 6, "sobol_trials": 3},
        "parameters": {"s19": {"type": "int", "low": 5, "high": 60, "log": True, "override": "stage1_9.max_steps"}},
    }
    for key, value in top.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return yaml.safe_dump(doc, sort_keys=False)


def test_two_objectives_parse_into_a_multi_objective_space():
    space = load_space(space_text())
    assert space.objective.metric == "final_eval_loss" and space.objective.minimize
    assert space.compute_objective is not None and space.compute_objective.metric == "train_flops"
    assert [o.metric for o in space.objectives] == ["final_eval_loss", "train_flops"]
    assert space.compute_metrics == ("train_flops",)
    # Ax 1.3's multi-objective form: both minimised, comma separated.
    assert space.ax_objective == "-final_eval_loss, -train_flops"
    assert load_space(space.to_yaml()) == space
    assert "objectives:" in space.to_yaml() and "objective:" not in space.to_yaml()


def test_trial_seconds_is_a_compute_objective_too():
    space = load_space(space_text(objectives=[LOSS, {"metric": "trial_seconds", "goal": "minimize"}]))
    assert space.ax_objective == "-final_eval_loss, -trial_seconds"
    assert COMPUTE_METRICS == ("train_flops", "trial_seconds")


def test_the_single_objective_form_is_unchanged():
    space = load_space(space_text(objectives=None, objective=LOSS))
    assert space.compute_objective is None and space.compute_metrics == ()
    assert space.objectives == (space.objective,)
    assert space.ax_objective == space.objective.ax_objective == "-final_eval_loss"
    assert "objectives" not in space.to_dict() and load_space(space.to_yaml()) == space


def test_the_training_side_reports_the_same_compute_metrics():
    from training.results import COMPUTE_METRICS as TRAINING_COMPUTE_METRICS

    assert TRAINING_COMPUTE_METRICS == COMPUTE_METRICS


BAD = [
    (
        {"objectives": [LOSS, LOSS]},
        "objectives[1].metric: 'final_eval_loss' is already objectives[0]; the two must differ",
    ),
    (
        {"objectives": [LOSS, FLOPS, {"metric": "trial_seconds", "goal": "minimize"}]},
        "objectives: must list exactly 2 {metric, goal} entries, the quality metric then a compute metric "
        "(train_flops, trial_seconds), got 3 entries; use objective: for a single metric",
    ),
    (
        {"objectives": [LOSS]},
        "objectives: must list exactly 2 {metric, goal} entries, the quality metric then a compute metric "
        "(train_flops, trial_seconds), got 1 entries; use objective: for a single metric",
    ),
    (
        {"objectives": LOSS},
        "objectives: must list exactly 2 {metric, goal} entries, the quality metric then a compute metric "
        "(train_flops, trial_seconds), got {metric: 'final_eval_loss', goal: 'minimize'}; "
        "use objective: for a single metric",
    ),
    (
        {"objective": LOSS},
        "objectives: give either objective: (one metric) or objectives: (a list of two), not both",
    ),
    (
        {"objectives": [LOSS, {"metric": "flops", "goal": "minimize"}]},
        "objectives[1].metric: unknown compute metric 'flops'; the trials report train_flops, trial_seconds",
    ),
    (
        {"objectives": [LOSS, {"metric": "accuracy", "goal": "maximize"}]},
        "objectives[1].metric: unknown compute metric 'accuracy'; the trials report train_flops, trial_seconds",
    ),
    (
        {"objectives": [LOSS, {"metric": "train_flops", "goal": "maximize"}]},
        "objectives[1].goal: a compute metric is minimised (goal: minimize), got 'maximize'",
    ),
    (
        {"objectives": [FLOPS, LOSS]},
        "objectives[0].metric: 'train_flops' is a compute metric; list the quality metric "
        "(e.g. final_eval_loss) first and the compute metric second",
    ),
    (
        {"objectives": [{"metric": "final_eval_loss", "goal": "down"}, FLOPS]},
        "objectives[0].goal: must be one of minimize, maximize, got 'down'",
    ),
    (
        {"objectives": [LOSS, {"metric": "train_flops"}]},
        "objectives[1].goal: missing (required)",
    ),
    (
        {"objectives": [LOSS, {"metric": "train_flops", "goal": "minimize", "noise": "infer"}]},
        "objectives[1]: unknown key 'noise'; allowed: metric, goal",
    ),
    (
        {"objectives": None},
        "objective: missing (required; or objectives: [quality, compute] for a loss-vs-compute sweep)",
    ),
    (
        {"early_stopping": {"percentile": 50, "min_progression": 5, "min_curves": 3}},
        "early_stopping: not supported with two objectives (it ranks running trials by one metric); "
        "remove early_stopping or use a single objective",
    ),
]
IDS = [
    "same-metric-twice",
    "three-objectives",
    "one-in-the-list",
    "not-a-list",
    "objective-and-objectives",
    "unknown-compute-metric",
    "second-not-compute",
    "compute-maximised",
    "compute-first",
    "first-entry-checked-like-objective",
    "second-goal-missing",
    "second-unknown-key",
    "neither-form",
    "early-stopping",
]


@pytest.mark.parametrize(("top", "message"), BAD, ids=IDS)
def test_bad_objectives_give_one_exact_line(top, message):
    with pytest.raises(SpaceError) as err:
        load_space(space_text(**top))
    assert str(err.value) == message


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def existing_store(tmp_path_factory):
    """A store already holding a two-objective experiment, made by ``sweep init``."""
    root = tmp_path_factory.mktemp("objectives")
    good = root / "good.yaml"
    good.write_text(space_text(name="existing"))
    assert sweep_main(["init", "--space", str(good), "--store", str(root / "store")]) == 0
    return root / "store"


@pytest.mark.parametrize(("top", "message"), BAD, ids=IDS)
def test_sweep_init_refuses_bad_objectives_with_exit_2_and_changes_nothing(
    top, message, existing_store, tmp_path, capsys
):
    store = existing_store
    before = _files(store)
    assert (store / "existing" / "experiment.json").is_file()
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text(space_text(**top))
    assert sweep_main(["init", "--space", str(bad), "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}: {message}"]
    assert _files(store) == before  # the existing experiment is untouched and nothing new was written
