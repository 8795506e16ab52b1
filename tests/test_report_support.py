"""Helpers for the report, status and early-stopping tests (no tests here): stores built through
the real Experiment API, holding trials in every state with progress curves, without running
any trial process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sweep.experiment import Experiment
from sweep.space import load_space
from sweep.store import Store, open_store


def mixed_space_yaml(name: str = "mixed", *, trials: int = 8, sobol: int = 8, extra: str = "") -> str:
    """The stage19_stage2 parameter shape (log-scale LRs, a bool with conditional children) on the
    synthetic objective; a long grace so nothing goes stale while a test runs."""
    return f"""
name: {name}
objective: {{metric: final_eval_loss, goal: minimize}}
budget: {{trials: {trials}, sobol_trials: {sobol}, seed: 5}}
base_overrides: [function=mixed, steps=6, step_s=0.0]
parameters:
  stage1_9_lr: {{type: float, low: 1.0e-3, high: 8.0e-3, log: true, override: stage1_9_lr}}
  stage2_lr: {{type: float, low: 1.0e-3, high: 8.0e-3, log: true, override: stage2_lr}}
  saliency: {{type: bool, override: saliency}}
  initial_k: {{type: choice, values: [0.05, 0.1, 0.2], ordered: true, override: initial_k,
              only_if: {{saliency: true}}}}
trial: {{max_attempts: 3, heartbeat_s: 1, grace_s: 3600, entrypoint: sweep.testing.synthetic_trial}}
{extra}
"""


def curve(stage: str, steps: int, start: float, end: float) -> list[dict[str, Any]]:
    """Progress records of a loss falling linearly from ``start`` to ``end`` over ``steps`` steps."""
    span = max(steps - 1, 1)
    return [
        {"stage": stage, "step": s, "loss": start + (end - start) * (s - 1) / span}
        for s in range(1, steps + 1)
    ]


def report_completed(exp: Experiment, claim: Any, loss: float, *, steps: int = 10) -> None:
    """Upload stage 1.9 + stage 2 curves ending near ``loss`` and report it as the objective."""
    records = curve("stage1_9", steps, 2.0 + loss, 1.0 + loss) + curve(
        "stage2", steps, 1.5 + loss, loss + 0.05
    )
    exp.heartbeat(claim.trial_index, claim.attempt, records)
    exp.report_result(
        claim.trial_index,
        claim.attempt,
        {"status": "completed", "final_eval_loss": loss, "final_eval_loss_sem": 0.01, "seconds": 12.5},
    )


def build_mixed_sweep(root: Path) -> tuple[Experiment, Store]:
    """A sweep caught mid-flight, with trials in every state:

    0, 1, 2 completed (losses 3.0, 2.5, 2.75) · 3 failed (a bad config) · 4 preempted then
    handed out again (running, attempt 2, with progress) · 5 preempted and queued again
    (requeued) · 6 early-stopped · 7 not created yet (budget 8).
    """
    store = open_store(str(root))
    exp = Experiment.init(store, load_space(mixed_space_yaml()))
    claims = [exp.claim("w1").claim for _ in range(7)]
    for claim, loss in zip(claims[:3], (3.0, 2.5, 2.75)):
        report_completed(exp, claim, loss)
    exp.report_result(
        3,
        1,
        {
            "status": "failed",
            "infrastructure": False,
            "reason": "bad config: stage2.optimizer.lr must be > 0",
        },
    )
    exp.heartbeat(4, 1, curve("stage1_9", 4, 3.0, 2.6))
    exp.report_result(4, 1, {"status": "preempted", "reason": "SIGTERM at stage1_9 step 4"})
    exp.heartbeat(6, 1, curve("stage1_9", 10, 3.0, 2.0) + curve("stage2", 5, 5.0, 4.6))
    exp.report_result(
        6,
        1,
        {
            "status": "early_stopped",
            "reason": "early-stopped at stage2 step 5 (loss 4.6000): worse than the 50th percentile",
            "metrics": {"final_eval_loss": 4.6, "last_loss": 4.6, "stopped_at_step": 5},
        },
    )
    again = exp.claim("w2").claim  # ingests the above and hands trial 4 out again
    assert again is not None and (again.trial_index, again.attempt) == (4, 2)
    exp.heartbeat(4, 2, curve("stage1_9", 10, 2.6, 1.9) + curve("stage2", 3, 3.3, 3.1))
    exp.heartbeat(5, 1, curve("stage1_9", 2, 3.0, 2.9))
    exp.report_result(5, 1, {"status": "preempted", "reason": "spot instance reclaimed"})
    exp.ingest()
    return exp, store.child("mixed")


def stored_results(exp_store: Store) -> dict[int, dict[str, Any]]:
    """trial index -> its newest result file, read straight from the store."""
    out: dict[int, dict[str, Any]] = {}
    for key in exp_store.list("trials/"):
        leaf = key.rsplit("/", 1)[1]
        if leaf.startswith("result-"):
            index = int(key.split("/")[1])
            out[index] = json.loads(exp_store.read(key)[0])
    return out
