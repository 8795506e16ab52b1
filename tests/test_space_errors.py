"""Malformed search spaces: each is refused with one exact line naming the field and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from sweep.space import SpaceError, load_space

BASE: dict[str, Any] = {
    "name": "s",
    "objective": {"metric": "final_eval_loss", "goal": "minimize"},
    "budget": {"trials": 8, "sobol_trials": 4},
    "base_overrides": ["model=tiny", "stage2.max_steps=20"],
    "parameters": {
        "lr": {"type": "float", "low": 0.001, "high": 0.008, "log": True, "override": "stage2.optimizer.lr"},
        "saliency": {"type": "bool", "override": "stage1_9.saliency.enabled"},
        "k": {
            "type": "choice",
            "values": [0.05, 0.1],
            "override": "stage1_9.saliency.initial_k",
            "only_if": {"saliency": True},
        },
    },
}


def mutate(path: str, value: Any) -> str:
    """BASE with the dotted ``path`` set to ``value`` (``DELETE`` removes it), as YAML text."""
    doc = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = doc
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return yaml.safe_dump(doc, sort_keys=False)


DELETE = object()

CASES = [
    ("name", "Bad Name", "name: must be 1-64 characters of a-z, 0-9, '_' or '-', got 'Bad Name'"),
    (
        "budgett",
        {"trials": 1},
        "unknown key 'budgett'; allowed: name, description, objective, objectives, budget, "
        "base_overrides, parameters, trial, early_stopping, tracking",
    ),
    ("budget", DELETE, "budget: missing (required)"),
    ("budget.sobol", 3, "budget: unknown key 'sobol'; allowed: trials, sobol_trials, seed, warm_start"),
    ("budget.sobol_trials", 12, "budget.sobol_trials: must be <= budget.trials (8), got 12"),
    ("budget.trials", "ten", "budget.trials: must be an integer, got 'ten'"),
    ("budget.trials", True, "budget.trials: must be an integer, got true"),
    ("budget.trials", 0, "budget.trials: must be >= 1, got 0"),
    ("objective.goal", "minimise", "objective.goal: must be one of minimize, maximize, got 'minimise'"),
    (
        "objective.metric",
        "final-loss",
        "objective.metric: must be an identifier ([A-Za-z_][A-Za-z0-9_]*), got 'final-loss'",
    ),
    ("parameters.lr.high", DELETE, "parameters.lr.high: missing (required for type float)"),
    (
        "parameters.lr.lo",
        0.1,
        "parameters.lr: unknown key 'lo'; allowed: type, low, high, log, override, only_if",
    ),
    ("parameters.lr.low", 0.01, "parameters.lr.high: must be > low (0.01), got 0.008"),
    ("parameters.lr.low", 0, "parameters.lr.low: must be > 0 for log scale, got 0"),
    ("parameters.lr.low", float("nan"), "parameters.lr.low: must be a finite number, got nan"),
    ("parameters.lr.log", "yes please", "parameters.lr.log: must be true or false, got 'yes please'"),
    (
        "parameters.lr.type",
        "double",
        "parameters.lr.type: must be one of float, int, bool, choice, fixed, got 'double'",
    ),
    (
        "parameters.lr.type",
        DELETE,
        "parameters.lr.type: missing (required; one of float, int, bool, choice, fixed)",
    ),
    (
        "parameters.lr.override",
        "stage2 lr",
        "parameters.lr.override: 'stage2 lr' is not a Hydra config path like stage2.optimizer.lr",
    ),
    (
        "parameters.lr.override",
        "stage1_9.saliency.enabled",
        "parameters.saliency.override: 'stage1_9.saliency.enabled' is already set by parameter 'lr'",
    ),
    (
        "parameters.lr.override",
        "stage2.max_steps",
        "parameters.lr.override: 'stage2.max_steps' is already set in base_overrides",
    ),
    (
        "parameters.k.values",
        "0.05, 0.1",
        "parameters.k.values: must be a list of at least 2 values, got '0.05, 0.1'",
    ),
    (
        "parameters.k.values",
        [0.05],
        "parameters.k.values: must list at least 2 values (use type: fixed for one), got [0.05]",
    ),
    (
        "parameters.k.values",
        [0.05, "a"],
        "parameters.k.values: must be all numbers, all strings or all booleans, got [0.05, 'a']",
    ),
    ("parameters.k.values", [0.1, 0.1], "parameters.k.values: 0.1 is listed twice"),
    (
        "parameters.k.values",
        [[1], [2]],
        "parameters.k.values[0]: must be a number, string or boolean, got [1]",
    ),
    (
        "parameters.k.only_if",
        {"salience": True},
        "parameters.k.only_if: unknown parent 'salience'; parameters defined before 'k': lr, saliency",
    ),
    ("parameters.k.only_if", {"k": 0.1}, "parameters.k.only_if: 'k' cannot depend on itself"),
    (
        "parameters.k.only_if",
        {"lr": 0.005},
        "parameters.k.only_if: parent 'lr' is a float parameter; only bool and "
        "choice parameters can be parents",
    ),
    (
        "parameters.k.only_if",
        {"saliency": "on"},
        "parameters.k.only_if.saliency: must be one of [false, true], got 'on'",
    ),
    (
        "parameters.k.only_if",
        {"saliency": True, "lr": 1},
        "parameters.k.only_if: must map exactly one parent parameter "
        "to a value, e.g. {saliency: true}, got {saliency: true, lr: 1}",
    ),
    (
        "parameters.saliency.only_if",
        {"k": 0.1},
        "parameters.saliency.only_if: parent 'k' is defined after 'saliency'; "
        "move it above (only earlier parameters may be parents, which rules out cycles)",
    ),
    ("parameters", {}, "parameters: must be a non-empty mapping of name -> {type, ...}, got {}"),
    (
        "parameters",
        {"t": {"type": "fixed", "value": 1, "override": "a.b"}},
        "parameters: at least one parameter must be searched (type float, int, bool or choice)",
    ),
    (
        "parameters.lr",
        0.003,
        "parameters.lr: must be a mapping with a type (float, int, bool, choice, fixed), got 0.003",
    ),
    (
        "parameters.n",
        {"type": "int", "low": 1.5, "high": 4, "override": "a.n"},
        "parameters.n.low: must be an integer, got 1.5",
    ),
    (
        "parameters.c",
        {"type": "choice", "values": ["it's", "b"], "override": "a.c"},
        "parameters.c.values[0]: strings must be "
        'non-empty, one line, without quotes or backslashes, got "it\'s"',
    ),
    (
        "base_overrides",
        "model=tiny",
        "base_overrides: must be a list of Hydra overrides like model=tiny, got 'model=tiny'",
    ),
    ("base_overrides", ["model"], "base_overrides[0]: must be a Hydra override key=value, got 'model'"),
    (
        "base_overrides",
        ["model=tiny", "+model=big"],
        "base_overrides[1]: 'model' is already set by base_overrides[0]",
    ),
    ("trial", {"max_attempts": 0}, "trial.max_attempts: must be >= 1, got 0"),
    ("trial", {"heartbeat_s": 0}, "trial.heartbeat_s: must be > 0, got 0"),
    ("trial", {"grace": 10}, "trial: unknown key 'grace'; allowed: max_attempts, max_preemptions, heartbeat_s, grace_s, entrypoint"),
    (
        "early_stopping",
        {"percentile": 50, "min_progression": 5},
        "early_stopping.min_curves: missing (required)",
    ),
    (
        "early_stopping",
        {"percentile": 100, "min_progression": 5, "min_curves": 3},
        "early_stopping.percentile: must be between 0 and 100 (exclusive), got 100",
    ),
]


@pytest.mark.parametrize(("path", "value", "message"), CASES, ids=[f"{c[0]}={c[1]!r}"[:60] for c in CASES])
def test_bad_space_gives_one_exact_line(path: str, value: Any, message: str) -> None:
    with pytest.raises(SpaceError) as err:
        load_space(mutate(path, value))
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_base_is_valid() -> None:
    # Guards the table above: every failure comes from its own mutation, not from BASE.
    assert load_space(yaml.safe_dump(BASE, sort_keys=False)).name == "s"


def test_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(mutate("objective.goal", "down"))
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert str(err.value) == f"{path}: objective.goal: must be one of minimize, maximize, got 'down'"


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpaceError) as err:
        load_space(str(tmp_path / "nope.yaml"))
    assert str(err.value) == f"{tmp_path / 'nope.yaml'}: search-space file not found"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "",
            "the space is empty; expected a mapping with keys name, description, objective, objectives, "
            "budget, base_overrides, parameters, trial, early_stopping, tracking",
        ),
        (
            "- a\n- b\n",
            "the space: must be a mapping with keys name, description, objective, objectives, budget, "
            "base_overrides, parameters, trial, early_stopping, tracking, got ['a', 'b']",
        ),
        ("name: a\nname: b\n", "line 2: duplicate key 'name' (first at line 1)"),
        ("name: [a\n", "not valid YAML: expected ',' or ']', but got '<stream end>' (line 2, column 1)"),
    ],
)
def test_unreadable_documents(text: str, message: str) -> None:
    with pytest.raises(SpaceError) as err:
        load_space(text)
    assert str(err.value) == message
