"""The only module that talks to Ax: build a client, (de)serialise snapshots, generate, record outcomes.

``import ax`` pulls in torch and takes seconds, so :mod:`sweep.experiment`
imports this module lazily, on the first call that needs Ax (init, claim,
ingest); ``sweep status`` never does.

Snapshot format. ``experiment.json`` is an ``ax.Client`` JSON snapshot that
``ax.Client.load_from_json_file`` reads, written in a compact form because the
claim path decodes and encodes it on every claim:

* the generation strategy's embedded copy of the whole experiment is written
  as null (Ax's decoder ignores it when it is handed the experiment anyway);
* the generation strategy keeps only the generator runs Ax reads back (the
  last one of each node and the last overall: the model state Sobol resumes
  from), as Ax's own SQL store does when it loads with reduced state;
* the experiment's data is one ``Data`` block rather than one per trial: Ax's
  decoder concatenates the per-trial blocks anyway, and each block costs a
  pandas parse (~5 ms) on load and a sort on save.

Measured on this 2-core machine with the stage19_stage2 space (Sobol, zero-cost
objective): at 30 trials 143 KB, encode 0.01 s, decode 0.03 s (Ax's own
``_to_json_snapshot``: 400 KB, 0.24 s / 0.17 s); at 100 trials 452 KB, 0.04 s /
0.13 s (Ax's: 1.3 MB, 0.97 s / 0.55 s). The next trial generated after a round
trip is identical either way (see tests/test_experiment_snapshot.py).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from ax import Client
from ax.core.data import Data
from ax.exceptions.core import DataRequiredError, OptimizationComplete
from ax.exceptions.generation_strategy import MaxParallelismReachedException
from ax.storage.json_store.decoder import generation_strategy_from_json, object_from_json
from ax.storage.json_store.encoder import object_to_json
from ax.utils.common.logger import set_stderr_log_level

from sweep.ledger import PROPERTY, Ledger
from sweep.space import SearchSpace

# Ax logs every generated and completed trial at INFO on stderr; the worker logs its own line per
# claim, so keep Ax to warnings unless asked (SWEEP_AX_LOG_LEVEL=INFO).
set_stderr_log_level(getattr(logging, os.environ.get("SWEEP_AX_LOG_LEVEL", "WARNING").upper(), logging.WARNING))
# Two-objective sweeps give Ax no objective thresholds on purpose (a FLOP budget or a loss bar is not
# known before the sweep): Ax infers the reference point from the data, and says so on every
# proposal; BoTorch's MOO helper adds a torch copy-construct warning. Neither is actionable here.
warnings.filterwarnings("ignore", message="Encountered a `MultiObjective` without objective thresholds")
warnings.filterwarnings("ignore", message="To copy construct from a tensor", module="ax.generators.torch.botorch_moo_utils")


@dataclass(frozen=True)
class Generated:
    index: int
    params: dict[str, Any]
    node: str  # Ax generation node name: "Sobol" or "MBM"


@dataclass(frozen=True)
class Wait:
    """Ax cannot propose a trial until more results arrive."""

    reason: str


@dataclass(frozen=True)
class Exhausted:
    """Ax will propose no more trials (the search space or strategy is used up)."""

    reason: str


def new_client(space: SearchSpace) -> Client:
    """A fresh client: the space's parameters, its objective, Sobol for ``sobol_trials`` then BoTorch."""
    client = Client(random_seed=space.budget.seed)
    client.configure_experiment(
        parameters=space.ax_parameter_configs(), name=space.name, description=space.description or None
    )
    # One metric, or "-final_eval_loss, -train_flops": Ax's multi-objective form (qNEHVI on the front).
    client.configure_optimization(objective=space.ax_objective)
    client.configure_generation_strategy(
        initialization_budget=space.budget.sobol_trials,
        initialization_random_seed=space.budget.seed,
        # The notebook's recipe is N Sobol points, not the centre plus N-1.
        initialize_with_center=False,
        # Warm-start configurations and noise replicates are attached trials: they must not use
        # up the Sobol count (replicates would put duplicate points in the space-filling design).
        # Their data still counts as observed before BoTorch takes over.
        use_existing_trials_for_initialization=False,
    )
    return client


# -------------------- Snapshots --------------------------------------------------------


def encode(client: Client, ledger: Ledger) -> bytes:
    """The compact snapshot (see the module docstring) with ``ledger`` in the experiment's properties."""
    experiment, strategy = client._experiment, client._generation_strategy
    experiment._properties[PROPERTY] = ledger.to_json()
    data, runs = experiment.data, strategy._generator_runs
    keep: dict[tuple[str, str | None], int] = {}
    for i, run in enumerate(runs):
        keep[(run._generation_node_name, run._generator_key)] = i
    kept = sorted({*keep.values(), len(runs) - 1}) if runs else []
    # Encode without the per-trial data blocks and without the strategy's copy of the
    # experiment; restored in `finally` so the live client is never left altered.
    experiment.data = Data()
    strategy._experiment, strategy._generator_runs = None, [runs[i] for i in kept]
    try:
        experiment_json = object_to_json(experiment)
        strategy_json = object_to_json(strategy)
    finally:
        experiment.data = data
        strategy._experiment, strategy._generator_runs = experiment, runs
    if len(data.full_df):
        experiment_json["data_by_trial"] = {"0": {"0": object_to_json(data)}}
    snapshot = {"_type": "Client", "experiment": experiment_json, "generation_strategy": strategy_json}
    return json.dumps(snapshot).encode("utf-8")


def decode(snapshot: dict[str, Any], space: SearchSpace) -> tuple[Client, Ledger]:
    """Client and ledger from a parsed snapshot; ValueError (with Ax's reason) if it is not one of ours."""
    try:
        experiment = object_from_json(snapshot["experiment"])
        strategy = generation_strategy_from_json(snapshot["generation_strategy"], experiment=experiment)
    except Exception as err:  # noqa: BLE001 -- Ax's decoder raises whatever malformed JSON trips on
        raise ValueError(f"not an Ax client snapshot ({type(err).__name__}: {err})") from err
    ledger = Ledger.from_json(experiment._properties.get(PROPERTY))
    # Ax's own loader drops the client's random seed; ours comes from the space.
    client = Client(random_seed=space.budget.seed)
    client.set_experiment(experiment)
    client.set_generation_strategy(strategy)
    return client, ledger


# -------------------- Generating and recording -----------------------------------------


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run BoTorch single-threaded, then restore the process's setting.

    The model is tiny (one point per trial), so intra-op threads buy nothing, and
    on a busy CPU their spin-waiting is ruinous: one BoTorch proposal took 35 s
    with torch's default 2 threads and 1.5 s with 1, measured on this project's
    2-core machine shared with other jobs.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def generate(client: Client) -> Generated | Wait | Exhausted:
    """One new trial (Ax marks it RUNNING, so later proposals treat it as pending)."""
    try:
        with _one_torch_thread():
            proposed = client.get_next_trials(max_trials=1)
    except (DataRequiredError, MaxParallelismReachedException) as err:
        return Wait(f"Ax needs more completed trials before proposing another: {err}")
    except OptimizationComplete as err:
        return Exhausted(f"Ax has nothing left to propose: {err}")
    if not proposed:
        return Wait("Ax proposed no trial right now; waiting for running trials to finish")
    ((index, params),) = proposed.items()
    node = client._experiment.trials[index].generator_runs[0]._generation_node_name
    return Generated(index=index, params=dict(params), node=str(node))


def attach(client: Client, params: dict[str, Any]) -> int:
    """A trial with given parameters (warm start, noise replicate); Ax marks it RUNNING."""
    return client.attach_trial(parameters=dict(params))


def arm_parameters(client: Client, index: int) -> dict[str, Any]:
    """The parameters Ax holds for trial ``index`` (the full parameterization it generated)."""
    return dict(client._experiment.trials[index].arm.parameters)


def set_sem(client: Client, metric: str, sem: float) -> int:
    """Give every observation of ``metric`` the standard error ``sem``; the number of rows changed.

    The replicate-measured noise arrives after the first trials completed without one; rewriting
    their SEM keeps the model's data uniform (BoTorch refuses a mix of known and unknown noise).
    """
    experiment = client._experiment
    df = experiment.data.full_df
    if df.empty:
        return 0
    df = df.copy()
    rows = df["metric_name"] == metric
    df.loc[rows, "sem"] = float(sem)
    experiment.data = Data(df=df)
    return int(rows.sum())


def complete(
    client: Client,
    index: int,
    metric: str,
    value: tuple[float, float | None],
    extra: dict[str, float] | None = None,
) -> None:
    """Complete trial ``index`` with the objective ``(mean, sem)`` and, in a two-objective sweep,
    the other objectives' values (``extra``, see :func:`extra_objective_data`)."""
    mean, sem = value
    client.complete_trial(
        index, raw_data={metric: mean if sem is None else (mean, sem), **extra_objective_data(extra)}
    )


def extra_objective_data(values: dict[str, float] | None) -> dict[str, float]:
    """Ax raw data for the compute objectives: bare means, so Ax infers their noise.

    ``train_flops`` is deterministic and ``trial_seconds`` is measured once per trial: neither comes
    with a standard error, and no SEM is better than a made-up one.
    """
    return {name: float(v) for name, v in (values or {}).items()}


def early_stop(client: Client, index: int, metric: str, value: tuple[float, float | None] | None) -> None:
    if value is None:
        # Ax refuses EARLY_STOPPED without data; ABANDONED is its word for "stopped, nothing to learn".
        client.mark_trial_abandoned(index)
        return
    mean, sem = value
    client.attach_data(index, raw_data={metric: mean if sem is None else (mean, sem)})
    client.mark_trial_early_stopped(index)


def fail(client: Client, index: int, reason: str) -> None:
    client.mark_trial_failed(index, failed_reason=reason)


def node_names(client: Client) -> dict[int, str]:
    """Generation node of every trial (tests and reports)."""
    return {i: t.generator_runs[0]._generation_node_name for i, t in client._experiment.trials.items()}
