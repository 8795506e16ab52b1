"""Search-space YAML -> a validated, immutable :class:`SearchSpace`.

One file describes one sweep: what to optimise, the budget, the Hydra overrides
every trial gets, and each searched parameter with the Hydra override path it
drives. The schema is closed (an unknown key is an error that names the key and
lists the allowed ones) and every problem is reported as one line naming the
field, e.g. ``parameters.stage2_lr.low: must be > 0 for log scale, got 0``::

    name: stage19_stage2                # [a-z0-9_-]+, the experiment folder name
    description: ...
    objective: {metric: final_eval_loss, goal: minimize, noise: infer}   # noise: infer | replicates | eval_sem
    # or, for a loss-vs-compute Pareto sweep (Ax multi-objective), the quality metric then a compute one:
    # objectives: [{metric: final_eval_loss, goal: minimize}, {metric: train_flops, goal: minimize}]
    budget: {trials: 30, sobol_trials: 12, seed: 0}   # sobol_trials optional, see default_sobol_trials
    base_overrides: [model=smollm2_135m, data=fineweb]
    parameters:
      stage2_lr: {type: float, low: 1.0e-3, high: 8.0e-3, log: true, override: stage2.optimizer.lr}
      saliency:  {type: bool, override: stage1_9.saliency.enabled}
      initial_k: {type: choice, values: [0.05, 0.1], override: stage1_9.saliency.initial_k,
                  only_if: {saliency: true}}
      # also {type: int, low, high, log} and {type: fixed, value: X, override: ...}
    trial: {max_attempts: 3, max_preemptions: 20, heartbeat_s: 30, grace_s: 120}
    early_stopping: null                # or {percentile: 50, min_progression: 50, min_curves: 5}
    tracking: {wandb: false, project: bitnet-sweep, entity: null}   # W&B run per trial when wandb: true

Conditional parameters use Ax's hierarchical search space
(``ChoiceParameterConfig.dependent_parameters``). We chose it over a flat space
(children always sampled, dropped afterwards) by experiment on Ax 1.3.1 /
BoTorch 0.18.1 with this file's parameter shape: Sobol and BoTorch (the "MBM"
node) both generate with trials still RUNNING, the JSON snapshot round-trips,
and a child is simply absent from a parameterization whose parent disables it.
(The model does still see a value for it: Ax's ``Cast`` transform refills an
inactive child from the arm's full parameterization, i.e. whatever the
generator drew. Imputing the middle of the child's domain instead, a constant,
was measured worse on the stage19_stage2 shape by scripts/bench_search.py:
median regret 0.032 vs 0.003 at 30 trials over seeds 0-4, see docs/benchmarks.md.) Every
parameterization still goes through :meth:`SearchSpace.active_parameters`, so
an inactive child can never reach a trial's overrides whatever produced it.

Ax is imported only inside :meth:`SearchSpace.ax_parameter_configs`: ``import ax``
pulls in torch (seconds), and loading a space must stay instant for the CLI.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Union

import yaml

Scalar = Union[bool, int, float, str]  # noqa: UP007 -- a runtime alias must work on Python 3.10

PARAMETER_TYPES = ("float", "int", "bool", "choice", "fixed")
GOALS = ("minimize", "maximize")

_NAME = re.compile(r"[a-z0-9_-]{1,64}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Hydra override keys: dotted config paths (stage1_9.optimizer.lr), group choices
# (model, or nested groups with '/'), optionally with Hydra's '+' / '++' add prefixes.
_OVERRIDE_KEY = re.compile(r"(\+\+|\+)?[A-Za-z_][A-Za-z0-9_-]*([./][A-Za-z0-9_-]+)*")
# Strings Hydra reads back as the same string without quotes.
_PLAIN_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
# W&B project / entity names, safe to pass as a Hydra override value without quoting.
_WANDB_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,127}")
_HYDRA_WORDS = frozenset({"true", "false", "null", "inf", "nan"})
# Characters a choice string may hold so that single-quoting it is always enough for Hydra.
_QUOTABLE_STRING = re.compile(r"[^'\\\n\r]+")

_TOP_KEYS = (
    "name",
    "description",
    "objective",
    "objectives",
    "budget",
    "base_overrides",
    "parameters",
    "trial",
    "early_stopping",
    "tracking",
)
_PARAM_KEYS = {
    "float": ("type", "low", "high", "log", "override", "only_if"),
    "int": ("type", "low", "high", "log", "override", "only_if"),
    "bool": ("type", "override", "only_if"),
    "choice": ("type", "values", "ordered", "override", "only_if"),
    "fixed": ("type", "value", "override", "only_if"),
}


class SpaceError(ValueError):
    """A search space that does not validate; the message is one line naming the field."""


# -------------------- Section 1: The data model --------------------------------------


NOISE_MODES = ("infer", "replicates", "eval_sem")
# What every trial reports about its cost (training.run_trial: training/results.py COMPUTE_METRICS;
# the synthetic trial too): the metrics allowed as the second entry of ``objectives:``.
# train_flops: the deterministic estimate of training/compute.py; trial_seconds: measured wall time.
COMPUTE_METRICS = ("train_flops", "trial_seconds")


@dataclass(frozen=True)
class Objective:
    """What to optimise, and what Ax is told about its noise (``noise``).

    ``infer`` (default): no standard error is sent; Ax's model infers the noise level.
    ``replicates``: the sweep re-runs its first configuration ``replicates`` more times with
    other training-data orders (``data.order_seed``), and the standard deviation of those runs
    becomes every trial's standard error -- the noise a repeat of a trial would see.
    ``eval_sem``: the trial's own ``<metric>_sem`` (the standard error over eval batches). Wrong
    for a fixed eval set: every trial is scored on the same blocks, so that sampling error is
    shared and cancels between trials; it overstated the real run-to-run noise 8.9x on the tiny
    pipeline (docs/benchmarks.md) and hid real differences from the model.
    """

    metric: str
    minimize: bool
    noise: str = "infer"
    replicates: int = 0  # extra runs of the first configuration when noise == "replicates"

    @property
    def ax_objective(self) -> str:
        """The objective string for ``ax.Client.configure_optimization`` ('-m' minimises)."""
        return f"-{self.metric}" if self.minimize else self.metric


@dataclass(frozen=True)
class WarmStart:
    """``budget.warm_start``: begin with the ``top_k`` best configurations of experiment ``source``.

    They are re-run under this space's base overrides (the way from a tiny or 135M sweep to a
    4B one) as the first trials of the budget; Sobol and BoTorch then continue as usual.
    """

    source: str  # store URI of the experiment folder, e.g. gs://bucket/sweeps/tiny_cpu or ./sweeps/tiny_cpu
    top_k: int


@dataclass(frozen=True)
class Budget:
    trials: int
    sobol_trials: int
    seed: int | None = 0
    warm_start: WarmStart | None = None


def default_sobol_trials(trials: int, searched: int) -> int:
    """Sobol trials before BoTorch when the space leaves ``budget.sobol_trials`` out.

    One more than the number of searched parameters, at least 5 (Ax's own default), and never
    more than half the budget. Measured with scripts/bench_search.py (docs/benchmarks.md, 30
    trials, 10 seeds): 7 Sobol instead of the notebook's 12 took the median regret on Hartmann6
    from 0.19 to 0.09 and left the stage19_stage2-shaped objective and the 4-parallel runs where
    they were (within their spread); every Sobol trial past the first few is one BoTorch does not
    get to aim. The count does not depend on the budget once ``trials >= 2 * (searched + 1)``, so
    a longer sweep starts exactly like a shorter one.
    """
    return max(1, min(max(5, searched + 1), trials // 2))


@dataclass(frozen=True)
class TrialSettings:
    max_attempts: int = 3  # failed attempts (crash, silence) before the trial fails; preemptions apart
    # Preemptions are not the trial's fault (spot GPUs): they get their own, generous budget.
    max_preemptions: int = 20
    heartbeat_s: float = 30.0
    grace_s: float = 120.0
    # The module a worker runs as ``python -m <entrypoint> --out result.json -- <overrides>``:
    # the real pipeline by default; sweep.testing.synthetic_trial for benchmarks and tests.
    entrypoint: str = "training.run_trial"

    @property
    def stale_after_s(self) -> float:
        """A running attempt with no heartbeat for this long (store clock) is requeued."""
        return self.heartbeat_s + self.grace_s


@dataclass(frozen=True)
class EarlyStopping:
    percentile: float
    min_progression: int
    min_curves: int


@dataclass(frozen=True)
class Tracking:
    """Experiment tracking of each trial: a Weights & Biases run per trial when ``wandb`` is true.

    The API key is never part of the space: W&B runs offline unless ``WANDB_API_KEY`` is set
    in the environment of the worker.
    """

    wandb: bool = False
    project: str = "bitnet-sweep"
    entity: str | None = None


@dataclass(frozen=True)
class Condition:
    """``only_if: {parent: value}``: the parameter exists only while ``parent == value``."""

    parent: str
    value: Scalar


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str  # one of PARAMETER_TYPES
    override: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    values: tuple[Scalar, ...] = ()
    ordered: bool | None = None
    value: Scalar | None = None
    only_if: Condition | None = None

    @property
    def domain(self) -> tuple[Scalar, ...]:
        """The values a bool or choice parameter can take (what ``only_if`` may test)."""
        return (False, True) if self.type == "bool" else self.values

    def check_value(self, value: Any) -> Scalar:
        """``value`` in this parameter's canonical type, or SpaceError if it is out of the domain."""
        value = _plain(value)
        where = f"trial parameters.{self.name}"
        if self.type == "fixed":
            return self.value  # type: ignore[return-value]
        if self.type in ("bool", "choice"):
            for allowed in self.domain:
                if _same(value, allowed):
                    return allowed
            raise SpaceError(f"{where}: must be one of {_show(list(self.domain))}, got {_show(value)}")
        if self.type == "int":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not _is_int(value):
                raise SpaceError(f"{where}: must be an integer, got {_show(value)}")
        elif not _is_number(value):
            raise SpaceError(f"{where}: must be a number, got {_show(value)}")
        # Ax may hand back a bound a rounding error outside itself after the log transform.
        slack = 1e-9 * max(abs(self.low), abs(self.high))  # type: ignore[arg-type]
        if not (self.low - slack <= value <= self.high + slack):  # type: ignore[operator]
            raise SpaceError(f"{where}: must be within [{self.low}, {self.high}], got {_show(value)}")
        return int(value) if self.type == "int" else float(value)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type in ("float", "int"):
            out.update(low=self.low, high=self.high, log=self.log)
        elif self.type == "choice":
            out.update(values=list(self.values), ordered=self.ordered)
        elif self.type == "fixed":
            out["value"] = self.value
        out["override"] = self.override
        if self.only_if is not None:
            out["only_if"] = {self.only_if.parent: self.only_if.value}
        return out


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    objective: Objective
    budget: Budget
    parameters: tuple[Parameter, ...]
    base_overrides: tuple[str, ...] = ()
    trial: TrialSettings = TrialSettings()
    early_stopping: EarlyStopping | None = None
    tracking: Tracking = Tracking()
    # ``objectives:`` (two entries): the second, a compute metric; ``objective`` is then the first.
    compute_objective: Objective | None = None

    @property
    def objectives(self) -> tuple[Objective, ...]:
        """Every objective: ``(objective,)``, or ``(objective, compute_objective)`` for a Pareto sweep."""
        return (self.objective,) if self.compute_objective is None else (self.objective, self.compute_objective)

    @property
    def compute_metrics(self) -> tuple[str, ...]:
        """Metrics a completed trial must report beyond the objective (its compute objective, if any)."""
        return () if self.compute_objective is None else (self.compute_objective.metric,)

    @property
    def ax_objective(self) -> str:
        """The objective string for ``Client.configure_optimization``: ``"-loss, -train_flops"`` is
        Ax's multi-objective form (it searches the Pareto front, not a weighted sum)."""
        return ", ".join(o.ax_objective for o in self.objectives)

    # -------------------- Section 2: Parameterizations -> trial inputs ----------------

    def parameter(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise SpaceError(f"parameters: space '{self.name}' has no parameter '{name}'; it has {self._names()}")

    @property
    def searched(self) -> tuple[Parameter, ...]:
        """The parameters Ax searches over (all but ``fixed``)."""
        return tuple(p for p in self.parameters if p.type != "fixed")

    def active_parameters(self, params: Mapping[str, Any]) -> dict[str, Scalar]:
        """The parameters a trial really runs with: inactive conditional ones dropped, fixed ones filled.

        Declaration order is kept, and parents always come before their children
        (the schema guarantees it), so one pass decides every condition.
        """
        known = {p.name for p in self.parameters}
        for name in params:
            if name not in known:
                raise SpaceError(
                    f"trial parameters: unknown parameter '{name}'; space '{self.name}' has {self._names()}"
                )
        active: dict[str, Scalar] = {}
        for p in self.parameters:
            cond = p.only_if
            if cond is not None and not (cond.parent in active and _same(active[cond.parent], cond.value)):
                continue
            if p.type == "fixed":
                active[p.name] = p.value  # type: ignore[assignment]
            elif p.name not in params:
                raise SpaceError(f"trial parameters: missing active parameter '{p.name}'")
            else:
                active[p.name] = p.check_value(params[p.name])
        return active

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """Hydra overrides of one trial: ``base_overrides`` then one per active parameter."""
        active = self.active_parameters(params)
        by_name = {p.name: p for p in self.parameters}
        return [
            *self.base_overrides,
            *(f"{by_name[n].override}={render_value(v)}" for n, v in active.items()),
        ]

    def describe(self, params: Mapping[str, Any]) -> str:
        """One short line for tables and logs: the active searched parameters, floats to 3 digits."""
        active = self.active_parameters(params)
        fixed = {p.name for p in self.parameters if p.type == "fixed"}
        return " ".join(f"{n}={_short(v)}" for n, v in active.items() if n not in fixed)

    # -------------------- Section 3: Ax and YAML ---------------------------------------

    def ax_parameter_configs(self) -> list[Any]:
        """Ax 1.3 parameter configs; ``only_if`` becomes the parent's ``dependent_parameters``."""
        from ax import ChoiceParameterConfig, RangeParameterConfig

        children: dict[str, dict[Scalar, list[str]]] = {}
        for p in self.searched:
            if p.only_if is not None:
                children.setdefault(p.only_if.parent, {}).setdefault(p.only_if.value, []).append(p.name)
        configs: list[Any] = []
        for p in self.searched:
            if p.type in ("float", "int"):
                configs.append(
                    RangeParameterConfig(
                        name=p.name,
                        bounds=(p.low, p.high),  # type: ignore[arg-type]
                        parameter_type=p.type,  # type: ignore[arg-type]
                        scaling="log" if p.log else "linear",
                    )
                )
                continue
            values = list(p.domain)
            configs.append(
                ChoiceParameterConfig(
                    name=p.name,
                    values=values,  # type: ignore[arg-type]
                    parameter_type=_choice_type(values),  # type: ignore[arg-type]
                    # Explicit even for two values, where Ax ignores it, to silence its warning.
                    is_ordered=True if p.type == "bool" else p.ordered,
                    dependent_parameters=children.get(p.name),
                )
            )
        return configs

    def to_dict(self) -> dict[str, Any]:
        es = self.early_stopping
        out = {
            "name": self.name,
            "description": self.description,
            "objective": {
                "metric": self.objective.metric,
                "goal": "minimize" if self.objective.minimize else "maximize",
                "noise": self.objective.noise,
                **({"replicates": self.objective.replicates} if self.objective.noise == "replicates" else {}),
            },
            "budget": {
                "trials": self.budget.trials,
                "sobol_trials": self.budget.sobol_trials,
                "seed": self.budget.seed,
                **(
                    {}
                    if self.budget.warm_start is None
                    else {
                        "warm_start": {
                            "from": self.budget.warm_start.source,
                            "top_k": self.budget.warm_start.top_k,
                        }
                    }
                ),
            },
            "base_overrides": list(self.base_overrides),
            "parameters": {p.name: p.to_dict() for p in self.parameters},
            "trial": {
                "max_attempts": self.trial.max_attempts,
                "max_preemptions": self.trial.max_preemptions,
                "heartbeat_s": self.trial.heartbeat_s,
                "grace_s": self.trial.grace_s,
                "entrypoint": self.trial.entrypoint,
            },
            "early_stopping": None
            if es is None
            else {
                "percentile": es.percentile,
                "min_progression": es.min_progression,
                "min_curves": es.min_curves,
            },
            "tracking": {
                "wandb": self.tracking.wandb,
                "project": self.tracking.project,
                "entity": self.tracking.entity,
            },
        }
        return _objectives_form(out, self.compute_objective)

    def to_yaml(self) -> str:
        """Canonical YAML (defaults spelled out); ``load_space(s.to_yaml()) == s``."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)

    def _names(self) -> str:
        return ", ".join(p.name for p in self.parameters)


def _objectives_form(out: dict[str, Any], compute: Objective | None) -> dict[str, Any]:
    """``to_dict`` of a two-objective space: ``objectives: [<objective>, <compute objective>]``
    in place of ``objective:`` (the key order of the single form is kept)."""
    if compute is None:
        return out
    second = {"metric": compute.metric, "goal": "minimize" if compute.minimize else "maximize"}
    return {("objectives" if k == "objective" else k): ([v, second] if k == "objective" else v) for k, v in out.items()}


def render_value(value: Scalar) -> str:
    """A value as Hydra's override grammar reads it back: true/false, repr of floats, quoted odd strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if _PLAIN_STRING.fullmatch(value) and value.lower() not in _HYDRA_WORDS:
        return value
    return f"'{value}'"


# -------------------- Section 4: Loading and validation ------------------------------


def load_space(source: str | Path) -> SearchSpace:
    """Load and validate a space from a file path or from YAML text.

    A ``Path``, or a one-line string ending in ``.yaml``/``.yml`` or naming an
    existing file, is read as a file; anything else is YAML text. Errors from a
    file are prefixed with its path.
    """
    text, origin = _read_source(source)
    try:
        return _parse(_load_yaml(text))
    except SpaceError as err:
        if origin is None:
            raise
        raise SpaceError(f"{origin}: {err}") from None


def _read_source(source: str | Path) -> tuple[str, str | None]:
    if isinstance(source, Path) or (
        "\n" not in source and (source.endswith((".yaml", ".yml")) or Path(source).is_file())
    ):
        path = Path(source)
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except FileNotFoundError:
            raise SpaceError(f"{path}: search-space file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise SpaceError(f"{path}: cannot read search-space file: {err}") from None
    return source, None


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads ``1e-3`` as a float (YAML 1.1 reads a string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise SpaceError(
                    f"line {key_node.start_mark.line + 1}: duplicate key '{key}' (first at line {seen[key]})"
                )
            if isinstance(key, Hashable):
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 -- _Loader is a SafeLoader
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise SpaceError(f"not valid YAML: {err.problem}{at}") from None
    except yaml.YAMLError as err:
        raise SpaceError(f"not valid YAML: {err}") from None


def _parse(raw: Any) -> SearchSpace:
    if raw is None:
        raise SpaceError(f"the space is empty; expected a mapping with keys {', '.join(_TOP_KEYS)}")
    top = _fields(raw, "", required=("name", "budget", "parameters"), allowed=_TOP_KEYS)
    name = _string(top["name"], "name")
    if not _NAME.fullmatch(name):
        raise SpaceError(f"name: must be 1-64 characters of a-z, 0-9, '_' or '-', got {_show(name)}")
    description = _string(top.get("description", ""), "description", allow_empty=True)
    objective, compute = _objectives(top)
    budget = _budget(top["budget"])
    base = _base_overrides(top.get("base_overrides", []))
    parameters = _parameters(top["parameters"], base)
    if budget.sobol_trials == 0:  # left out: the default for this budget and this many parameters
        searched = sum(p.type != "fixed" for p in parameters)
        budget = replace(budget, sobol_trials=default_sobol_trials(budget.trials, searched))
    trial = _trial(top.get("trial", {}))
    early = top.get("early_stopping")
    if early is not None and compute is not None:
        raise SpaceError(
            "early_stopping: not supported with two objectives (it ranks running trials by one metric); "
            "remove early_stopping or use a single objective"
        )
    raw_tracking = top.get("tracking")
    tracking = Tracking() if raw_tracking is None else _tracking(raw_tracking)
    return SearchSpace(
        name=name,
        description=description,
        objective=objective,
        budget=budget,
        parameters=parameters,
        base_overrides=base,
        trial=trial,
        early_stopping=None if early is None else _early_stopping(early),
        tracking=tracking,
        compute_objective=compute,
    )


def _objectives(top: dict[str, Any]) -> tuple[Objective, Objective | None]:
    """``objective: {...}``, or ``objectives: [<quality objective>, <compute objective>]``.

    The rule for the list form: exactly two entries, the first the quality metric (any metric the
    trials report, validated like ``objective:``, noise settings included), the second one of
    :data:`COMPUTE_METRICS`, minimised. A loss-vs-compute front is what the sweep draws and
    reports; two quality metrics, or a compute metric that nothing reports, would give Ax an
    objective no trial can fill in.
    """
    if "objective" in top and "objectives" in top:
        raise SpaceError(
            "objectives: give either objective: (one metric) or objectives: (a list of two), not both"
        )
    if "objectives" not in top:
        if "objective" not in top:
            raise SpaceError(
                "objective: missing (required; or objectives: [quality, compute] for a loss-vs-compute sweep)"
            )
        return _objective(top["objective"]), None
    raw = top["objectives"]
    if not isinstance(raw, list) or len(raw) != 2:
        got = f"{len(raw)} entries" if isinstance(raw, list) else _show(raw)
        raise SpaceError(
            "objectives: must list exactly 2 {metric, goal} entries, the quality metric then a compute "
            f"metric ({', '.join(COMPUTE_METRICS)}), got {got}; use objective: for a single metric"
        )
    try:
        first = _objective(raw[0])
    except SpaceError as err:  # the same checks as objective:, reported under this entry's name
        message = str(err)
        if message.startswith("objective"):
            message = "objectives[0]" + message[len("objective") :]
        raise SpaceError(message) from None
    f = _fields(raw[1], "objectives[1]", required=("metric", "goal"), allowed=("metric", "goal"))
    metric = _string(f["metric"], "objectives[1].metric")
    if metric == first.metric:
        raise SpaceError(f"objectives[1].metric: {_show(metric)} is already objectives[0]; the two must differ")
    if first.metric in COMPUTE_METRICS:
        raise SpaceError(
            f"objectives[0].metric: {_show(first.metric)} is a compute metric; list the quality metric "
            "(e.g. final_eval_loss) first and the compute metric second"
        )
    if metric not in COMPUTE_METRICS:
        raise SpaceError(
            f"objectives[1].metric: unknown compute metric {_show(metric)}; the trials report "
            f"{', '.join(COMPUTE_METRICS)}"
        )
    if f["goal"] != "minimize":
        raise SpaceError(
            f"objectives[1].goal: a compute metric is minimised (goal: minimize), got {_show(f['goal'])}"
        )
    return first, Objective(metric=metric, minimize=True)


def _objective(raw: Any) -> Objective:
    f = _fields(raw, "objective", required=("metric", "goal"), allowed=("metric", "goal", "noise", "replicates"))
    metric = _string(f["metric"], "objective.metric")
    if not _IDENT.fullmatch(metric):
        raise SpaceError(
            f"objective.metric: must be an identifier ([A-Za-z_][A-Za-z0-9_]*), got {_show(metric)}"
        )
    if f["goal"] not in GOALS:
        raise SpaceError(f"objective.goal: must be one of {', '.join(GOALS)}, got {_show(f['goal'])}")
    noise = f.get("noise", "infer")
    if noise not in NOISE_MODES:
        raise SpaceError(f"objective.noise: must be one of {', '.join(NOISE_MODES)}, got {_show(noise)}")
    replicates = 0
    if noise == "replicates":
        replicates = _int(f.get("replicates", 3), "objective.replicates", minimum=0)
        if replicates < 2:
            raise SpaceError(
                f"objective.replicates: noise: replicates needs at least 2 extra runs to measure a "
                f"standard deviation, got {replicates}"
            )
    elif "replicates" in f:
        raise SpaceError(
            f"objective.replicates: only used with noise: replicates (noise is {noise}); remove it or set noise: replicates"
        )
    return Objective(metric=metric, minimize=f["goal"] == "minimize", noise=noise, replicates=replicates)


def _budget(raw: Any) -> Budget:
    """The budget; ``sobol_trials`` 0 when left out (``_parse`` fills in the default)."""
    f = _fields(raw, "budget", required=("trials",), allowed=("trials", "sobol_trials", "seed", "warm_start"))
    trials = _int(f["trials"], "budget.trials", minimum=1)
    if f.get("sobol_trials") is None:
        sobol = 0
    else:
        sobol = _int(f["sobol_trials"], "budget.sobol_trials", minimum=1)
    if sobol > trials:
        raise SpaceError(f"budget.sobol_trials: must be <= budget.trials ({trials}), got {sobol}")
    seed = f.get("seed", 0)
    warm = None
    if f.get("warm_start") is not None:
        w = _fields(f["warm_start"], "budget.warm_start", required=("from", "top_k"), allowed=("from", "top_k"))
        source = _string(w["from"], "budget.warm_start.from")
        top_k = _int(w["top_k"], "budget.warm_start.top_k", minimum=1)
        if top_k > trials:
            raise SpaceError(f"budget.warm_start.top_k: must be <= budget.trials ({trials}), got {top_k}")
        warm = WarmStart(source=source, top_k=top_k)
    return Budget(
        trials=trials,
        sobol_trials=sobol,
        seed=None if seed is None else _int(seed, "budget.seed", minimum=0),
        warm_start=warm,
    )


def _trial(raw: Any) -> TrialSettings:
    f = _fields(
        raw, "trial", required=(), allowed=("max_attempts", "max_preemptions", "heartbeat_s", "grace_s", "entrypoint")
    )
    default = TrialSettings()
    heartbeat = _number(f.get("heartbeat_s", default.heartbeat_s), "trial.heartbeat_s")
    if heartbeat <= 0:
        raise SpaceError(f"trial.heartbeat_s: must be > 0, got {_show(heartbeat)}")
    grace = _number(f.get("grace_s", default.grace_s), "trial.grace_s")
    if grace < 0:
        raise SpaceError(f"trial.grace_s: must be >= 0, got {_show(grace)}")
    return TrialSettings(
        max_attempts=_int(f.get("max_attempts", default.max_attempts), "trial.max_attempts", minimum=1),
        max_preemptions=_int(
            f.get("max_preemptions", default.max_preemptions), "trial.max_preemptions", minimum=0
        ),
        heartbeat_s=float(heartbeat),
        grace_s=float(grace),
        entrypoint=_entrypoint(f.get("entrypoint", default.entrypoint)),
    )


def _entrypoint(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", value):
        raise SpaceError(f"trial.entrypoint: must be a Python module path such as training.run_trial, got {value!r}")
    return value


def _early_stopping(raw: Any) -> EarlyStopping:
    keys = ("percentile", "min_progression", "min_curves")
    f = _fields(raw, "early_stopping", required=keys, allowed=keys)
    percentile = _number(f["percentile"], "early_stopping.percentile")
    if not 0 < percentile < 100:
        raise SpaceError(
            f"early_stopping.percentile: must be between 0 and 100 (exclusive), got {_show(percentile)}"
        )
    return EarlyStopping(
        percentile=float(percentile),
        min_progression=_int(f["min_progression"], "early_stopping.min_progression", minimum=0),
        min_curves=_int(f["min_curves"], "early_stopping.min_curves", minimum=1),
    )


def _tracking(raw: Any) -> Tracking:
    keys = ("wandb", "project", "entity")
    f = _fields(raw, "tracking", required=(), allowed=keys)
    default = Tracking()
    enabled = f.get("wandb", default.wandb)
    if not isinstance(enabled, bool):
        raise SpaceError(f"tracking.wandb: must be true or false, got {_show(enabled)}")
    project = _string(f.get("project", default.project), "tracking.project")
    entity = f.get("entity")
    if entity is not None:
        entity = _string(entity, "tracking.entity")
    for where, value in (("tracking.project", project), ("tracking.entity", entity)):
        if value is not None and not _WANDB_NAME.fullmatch(value):
            raise SpaceError(
                f"{where}: must start with a letter, then letters, digits, '_', '-' or '.', got {_show(value)}"
            )
    return Tracking(wandb=enabled, project=project, entity=entity)


def _base_overrides(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise SpaceError(
            f"base_overrides: must be a list of Hydra overrides like model=tiny, got {_show(raw)}"
        )
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        where = f"base_overrides[{i}]"
        if not isinstance(item, str) or "=" not in item:
            raise SpaceError(f"{where}: must be a Hydra override key=value, got {_show(item)}")
        key = item.split("=", 1)[0]
        if not _OVERRIDE_KEY.fullmatch(key):
            raise SpaceError(
                f"{where}: {_show(key)} is not a Hydra config path like stage2.max_steps or model"
            )
        bare = key.lstrip("+")
        if bare in seen:
            raise SpaceError(f"{where}: '{bare}' is already set by base_overrides[{seen[bare]}]")
        seen[bare] = i
    return tuple(raw)


def _parameters(raw: Any, base: tuple[str, ...]) -> tuple[Parameter, ...]:
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(
            f"parameters: must be a non-empty mapping of name -> {{type, ...}}, got {_show(raw)}"
        )
    base_keys = {item.split("=", 1)[0].lstrip("+") for item in base}
    order = list(raw)
    parsed: dict[str, Parameter] = {}
    owners: dict[str, list[str]] = {}
    for name, spec in raw.items():
        where = f"parameters.{name}"
        if not isinstance(name, str) or not _IDENT.fullmatch(name):
            raise SpaceError(f"parameters: name {_show(name)} must be an identifier ([A-Za-z_][A-Za-z0-9_]*)")
        p = _parameter(name, spec, parsed, order)
        bare = p.override.lstrip("+")
        if bare in base_keys:
            raise SpaceError(f"{where}.override: '{bare}' is already set in base_overrides")
        # One override may be shared by parameters that are never active together: conditional on
        # different values of the same parent (e.g. one learning-rate range per optimizer choice).
        for other in owners.get(bare, []):
            if not _exclusive(p, parsed[other]):
                raise SpaceError(f"{where}.override: '{bare}' is already set by parameter '{other}'")
        owners.setdefault(bare, []).append(name)
        parsed[name] = p
    if all(p.type == "fixed" for p in parsed.values()):
        raise SpaceError(
            "parameters: at least one parameter must be searched (type float, int, bool or choice)"
        )
    return tuple(parsed.values())


def _exclusive(a: Parameter, b: Parameter) -> bool:
    """Never active in the same trial: both conditional on one parent, on different values of it."""
    return (
        a.only_if is not None
        and b.only_if is not None
        and a.only_if.parent == b.only_if.parent
        and not _same(a.only_if.value, b.only_if.value)
    )


def _parameter(name: str, spec: Any, earlier: dict[str, Parameter], order: list[str]) -> Parameter:
    where = f"parameters.{name}"
    if not isinstance(spec, dict):
        raise SpaceError(
            f"{where}: must be a mapping with a type ({', '.join(PARAMETER_TYPES)}), got {_show(spec)}"
        )
    if "type" not in spec:
        raise SpaceError(f"{where}.type: missing (required; one of {', '.join(PARAMETER_TYPES)})")
    ptype = spec["type"]
    if ptype not in PARAMETER_TYPES:
        raise SpaceError(f"{where}.type: must be one of {', '.join(PARAMETER_TYPES)}, got {_show(ptype)}")
    required = {
        "float": ("low", "high", "override"),
        "int": ("low", "high", "override"),
        "bool": ("override",),
        "choice": ("values", "override"),
        "fixed": ("value", "override"),
    }[ptype]
    f = _fields(spec, where, required=("type", *required), allowed=_PARAM_KEYS[ptype], kind=f"type {ptype}")
    override = _string(f["override"], f"{where}.override")
    if not _OVERRIDE_KEY.fullmatch(override):
        raise SpaceError(
            f"{where}.override: {_show(override)} is not a Hydra config path like stage2.optimizer.lr"
        )
    only_if = _condition(f["only_if"], name, earlier, order) if f.get("only_if") is not None else None
    common = {"name": name, "type": ptype, "override": override, "only_if": only_if}
    if ptype in ("float", "int"):
        return Parameter(**common, **_range(f, where, ptype))
    if ptype == "choice":
        return Parameter(**common, **_choice(f, where))
    if ptype == "fixed":
        return Parameter(**common, value=_scalar(f["value"], f"{where}.value"))
    return Parameter(**common)


def _range(f: dict[str, Any], where: str, ptype: str) -> dict[str, Any]:
    check = _int if ptype == "int" else _number
    low, high = check(f["low"], f"{where}.low"), check(f["high"], f"{where}.high")
    log = f.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}.log: must be true or false, got {_show(log)}")
    if high <= low:
        raise SpaceError(f"{where}.high: must be > low ({_show(low)}), got {_show(high)}")
    if log and low <= 0:
        raise SpaceError(f"{where}.low: must be > 0 for log scale, got {_show(low)}")
    if ptype == "float":
        low, high = float(low), float(high)
    return {"low": low, "high": high, "log": log}


def _choice(f: dict[str, Any], where: str) -> dict[str, Any]:
    raw = f["values"]
    if not isinstance(raw, list):
        raise SpaceError(f"{where}.values: must be a list of at least 2 values, got {_show(raw)}")
    if len(raw) < 2:
        raise SpaceError(
            f"{where}.values: must list at least 2 values (use type: fixed for one), got {_show(raw)}"
        )
    values = [_scalar(v, f"{where}.values[{i}]") for i, v in enumerate(raw)]
    kind = _choice_type(values)
    if kind is None:
        raise SpaceError(
            f"{where}.values: must be all numbers, all strings or all booleans, got {_show(raw)}"
        )
    if kind == "float":
        values = [float(v) for v in values]
    for i, v in enumerate(values):
        if any(_same(v, w) for w in values[:i]):
            raise SpaceError(f"{where}.values: {_show(v)} is listed twice")
    ordered = f.get("ordered", kind in ("int", "float"))
    if not isinstance(ordered, bool):
        raise SpaceError(f"{where}.ordered: must be true or false, got {_show(ordered)}")
    return {"values": tuple(values), "ordered": ordered}


def _condition(raw: Any, name: str, earlier: dict[str, Parameter], order: list[str]) -> Condition:
    where = f"parameters.{name}.only_if"
    if not isinstance(raw, dict) or len(raw) != 1:
        raise SpaceError(
            f"{where}: must map exactly one parent parameter to a value, e.g. {{saliency: true}}, got {_show(raw)}"
        )
    ((parent, value),) = raw.items()
    if parent == name:
        raise SpaceError(f"{where}: '{name}' cannot depend on itself")
    if parent not in earlier:
        if parent in order:
            raise SpaceError(
                f"{where}: parent '{parent}' is defined after '{name}'; move it above "
                "(only earlier parameters may be parents, which rules out cycles)"
            )
        before = ", ".join(earlier) or "none"
        raise SpaceError(f"{where}: unknown parent '{parent}'; parameters defined before '{name}': {before}")
    p = earlier[parent]
    if p.type not in ("bool", "choice"):
        raise SpaceError(
            f"{where}: parent '{parent}' is a {p.type} parameter; only bool and choice parameters can be parents"
        )
    for allowed in p.domain:
        if _same(_plain(value), allowed):
            return Condition(parent=parent, value=allowed)
    raise SpaceError(f"{where}.{parent}: must be one of {_show(list(p.domain))}, got {_show(value)}")


# -------------------- Section 5: Small validators ------------------------------------


def _fields(
    raw: Any, where: str, *, required: Sequence[str], allowed: Sequence[str], kind: str | None = None
) -> dict[str, Any]:
    """``raw`` as a dict after checking it is a mapping with no unknown and no missing keys."""
    label = where or "the space"
    if not isinstance(raw, dict):
        raise SpaceError(f"{label}: must be a mapping with keys {', '.join(allowed)}, got {_show(raw)}")
    prefix = f"{where}: " if where else ""
    for key in raw:
        if key not in allowed:
            raise SpaceError(f"{prefix}unknown key {_show(key)}; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in raw:
            needed = f"required for {kind}" if kind else "required"
            raise SpaceError(f"{where + '.' if where else ''}{key}: missing ({needed})")
    return raw


def _string(value: Any, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise SpaceError(f"{where}: must be a non-empty string, got {_show(value)}")
    return value


def _int(value: Any, where: str, *, minimum: int | None = None) -> int:
    if not _is_int(value):
        raise SpaceError(f"{where}: must be an integer, got {_show(value)}")
    if minimum is not None and value < minimum:
        raise SpaceError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _number(value: Any, where: str) -> float | int:
    if not _is_number(value) or not math.isfinite(value):
        raise SpaceError(f"{where}: must be a finite number, got {_show(value)}")
    return value


def _scalar(value: Any, where: str) -> Scalar:
    if isinstance(value, str):
        if not _QUOTABLE_STRING.fullmatch(value):
            raise SpaceError(
                f"{where}: strings must be non-empty, one line, without quotes or backslashes, got {_show(value)}"
            )
        return value
    if isinstance(value, bool) or _is_int(value):
        return value
    if _is_number(value) and math.isfinite(value):
        return float(value)
    raise SpaceError(f"{where}: must be a number, string or boolean, got {_show(value)}")


def _choice_type(values: Sequence[Any]) -> str | None:
    """Ax parameter_type of a value list, or None if the values are of mixed kinds."""
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, str) for v in values):
        return "str"
    if all(_is_int(v) for v in values):
        return "int"
    if all(_is_number(v) for v in values):
        return "float"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """numpy scalars (as Ax may return them) -> the Python scalar."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes, bool, int, float)):
        return value.item()
    return value


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps booleans apart from numbers (Python has True == 1)."""
    return isinstance(a, bool) == isinstance(b, bool) and isinstance(a, str) == isinstance(b, str) and a == b


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML: true/false, null, quoted strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _short(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
