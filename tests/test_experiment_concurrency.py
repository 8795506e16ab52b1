"""Eight workers (threads, each with its own Experiment, as separate processes would have) share one
experiment on a memory store and on a directory store: nothing is handed out twice, every result lands."""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sweep.experiment import Claim, Experiment
from sweep.space import load_space
from sweep.store import Store, open_store

WORKERS = 8
SPACE = """
name: crowd
objective: {metric: final_eval_loss, goal: minimize}
budget: {trials: 11, sobol_trials: 8, seed: 1}
parameters:
  stage1_9_lr: {type: float, low: 1.0e-3, high: 8.0e-3, log: true, override: stage1_9.optimizer.lr}
  stage2_lr: {type: float, low: 1.0e-3, high: 8.0e-3, log: true, override: stage2.optimizer.lr}
  saliency: {type: bool, override: stage1_9.saliency.enabled}
  initial_k: {type: choice, values: [0.05, 0.1, 0.15, 0.2], override: stage1_9.saliency.initial_k,
              only_if: {saliency: true}}
"""


def loss(p: dict) -> float:
    value = 2.0 + math.log(p["stage1_9_lr"] / 3e-3) ** 2 + math.log(p["stage2_lr"] / 2.4e-3) ** 2
    return value + (0.2 + p["initial_k"] if p["saliency"] else 0.0)


@pytest.fixture(params=["memory", "local"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "memory":
        return open_store(f"memory://crowd-{uuid.uuid4().hex}")
    return open_store(str(tmp_path / "sweeps"))


def test_eight_workers_share_one_experiment(root: Store) -> None:
    space = load_space(SPACE)
    Experiment.init(root, space)
    guard = threading.Lock()
    live: dict[int, str] = {}  # trial index -> worker running it right now
    handed: list[Claim] = []
    reported: dict[int, float] = {}

    def work(worker: str) -> int:
        exp = Experiment.open(root, "crowd")
        rng = random.Random(worker)
        ran = 0
        while True:
            result = exp.claim(worker)
            if result.finished:
                return ran
            if result.claim is None:
                time.sleep(0.05)
                continue
            claim = result.claim
            with guard:
                assert claim.trial_index not in live, (
                    f"trial {claim.trial_index} given to {worker} and {live}"
                )
                live[claim.trial_index] = worker
                handed.append(claim)
            exp.heartbeat(claim.trial_index, claim.attempt, {"step": 1, "loss": 9.0})
            time.sleep(rng.uniform(0, 0.05))  # "train", so that claims interleave with running trials
            value = loss(claim.params)
            exp.report_result(
                claim.trial_index, claim.attempt, {"status": "completed", "final_eval_loss": value}
            )
            with guard:
                reported[claim.trial_index] = value
                del live[claim.trial_index]
            ran += 1

    with ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(work, f"w{i}") for i in range(WORKERS)]
        ran = [f.result(timeout=600) for f in futures]  # re-raises any worker's assertion

    assert sum(ran) == 11
    assert sorted(c.trial_index for c in handed) == list(range(11))
    assert not any(c.is_requeue or c.attempt != 1 for c in handed)
    assert len({tuple(sorted(c.params.items())) for c in handed}) == 11  # no parameter set twice
    final = Experiment.open(root, "crowd")
    status = final.status()
    assert status.finished and status.counts["completed"] == 11
    assert all(r.ingested for r in status.rows)
    assert {r.index: r.loss for r in status.rows} == pytest.approx(reported)
    assert [r.phase for r in status.rows] == ["Sobol"] * 8 + ["BoTorch"] * 3
    df = final.client()._experiment.lookup_data().df
    assert sorted(df["trial_index"].tolist()) == list(range(11))  # each result ingested exactly once
