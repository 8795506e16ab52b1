"""``budget.warm_start``: the best configurations of an earlier experiment, checked against a new space.

A sweep on the tiny model or on SmolLM2-135M is cheap; one on Qwen3-4B is not. Warm start carries
what the cheap sweep learned over: the new experiment's first trials are the ``top_k`` best
completed configurations of experiment ``from``, re-run under the new space's base overrides.
Everything is checked when the experiment is created (``sweep init``), so a bad pointer is one line
and nothing is written:

* ``from`` must hold an experiment (its ``experiment.json``);
* it must have at least ``top_k`` completed trials with a finite objective;
* each chosen configuration must fit the new space: every parameter it searched exists here, and
  its value is inside this space's domain (the error names the parameter and the value).

Ranking uses the *old* experiment's objective and goal. Only parameters the old space searched
travel; its fixed values were part of its setting, not of what it found.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sweep.ledger import COMPLETED, Ledger
from sweep.space import SearchSpace, SpaceError, load_space
from sweep.store import StoreError, open_store

SNAPSHOT = "experiment.json"


def warm_start_configs(space: SearchSpace) -> list[dict[str, Any]]:
    """``[{"params", "source", "value"}]`` best first, or [] without warm start; SpaceError if it cannot be used."""
    warm = space.budget.warm_start
    if warm is None:
        return []
    where = "budget.warm_start.from"
    try:
        got = open_store(warm.source).read(SNAPSHOT)
    except (StoreError, ValueError) as err:
        raise SpaceError(f"{where}: cannot read {warm.source!r}: {err}") from None
    if got is None:
        raise SpaceError(
            f"{where}: no experiment at {warm.source!r} (no {SNAPSHOT}); give the URI of an experiment "
            "folder, e.g. ./sweeps/tiny_cpu or gs://bucket/sweeps/stage19_stage2"
        )
    try:
        ledger = Ledger.from_snapshot(json.loads(got[0].decode("utf-8")))
        old = load_space(ledger.space_yaml)
    except (UnicodeDecodeError, ValueError) as err:  # SpaceError is a ValueError
        raise SpaceError(f"{where}: {warm.source!r} is not a readable experiment: {err}") from None
    metric, minimize = old.objective.metric, old.objective.minimize
    done = [
        t
        for t in ledger.trials.values()
        if t.state == COMPLETED and _finite(t.metrics.get(metric))
    ]
    if len(done) < warm.top_k:
        raise SpaceError(
            f"budget.warm_start.top_k: {warm.source!r} has {len(done)} completed trial(s) with a finite "
            f"{metric}, fewer than top_k={warm.top_k}; lower top_k or let that sweep run longer"
        )
    done.sort(key=lambda t: (float(t.metrics[metric]) if minimize else -float(t.metrics[metric]), t.index))
    fixed_there = {p.name for p in old.parameters if p.type == "fixed"}
    known_here = {p.name for p in space.parameters}
    out = []
    for t in done[: warm.top_k]:
        params = {k: v for k, v in t.params.items() if k not in fixed_there}
        for name, value in params.items():
            if name not in known_here:
                raise SpaceError(
                    f"{where}: trial {t.index} of {warm.source!r} searched {name}={value!r}, which this space "
                    f"does not have; add parameter '{name}' or warm-start from a matching experiment"
                )
        try:
            active = space.active_parameters(params)
        except SpaceError as err:
            raise SpaceError(f"{where}: trial {t.index} of {warm.source!r} does not fit this space: {err}") from None
        out.append(
            {
                "params": active,
                "source": f"{warm.source} trial {t.index}",
                "value": float(t.metrics[metric]),
            }
        )
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
