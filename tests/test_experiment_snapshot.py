"""experiment.json: a damaged one is reported and left alone; the compact form is a faithful Ax
snapshot; status and the CLI's read paths never import Ax (or torch)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from sweep.experiment import CorruptSnapshot, Experiment
from sweep.space import load_space
from sweep.store import Store, open_store

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "search_spaces" / "stage19_stage2.yaml"
SMALL = """
name: snap
objective: {metric: final_eval_loss, goal: minimize}
budget: {trials: 8, sobol_trials: 3}
parameters:
  lr: {type: float, low: 1.0e-3, high: 8.0e-3, log: true, override: stage2.optimizer.lr}
  saliency: {type: bool, override: stage1_9.saliency.enabled}
  k: {type: choice, values: [0.05, 0.1, 0.2], override: stage1_9.saliency.initial_k, only_if: {saliency: true}}
"""


def loss(p: dict) -> float:
    return (p["lr"] - 0.003) ** 2 * 1e5 + (p.get("k", 0.0) if p["saliency"] else 0.5)


@pytest.fixture(params=["memory", "local"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "memory":
        return open_store(f"memory://snap-{uuid.uuid4().hex}")
    return open_store(str(tmp_path / "sweeps"))


def run_some(exp: Experiment, n: int) -> None:
    for _ in range(n):
        claim = exp.claim("w").claim
        exp.report_result(
            claim.trial_index, claim.attempt, {"status": "completed", "final_eval_loss": loss(claim.params)}
        )


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda data: data[: len(data) // 2], "not valid JSON: "),
        (lambda data: b"\x00\xff garbage", "not valid JSON: "),
        (lambda data: b'{"experiment": {"properties": {}}}', "not an Ax client snapshot (KeyError: "),
        (lambda data: b"[1, 2]", "not valid JSON: top level is list, not an object"),
    ],
    ids=["truncated", "garbage", "not-ax", "not-an-object"],
)
def test_a_damaged_snapshot_is_reported_and_never_replaced(root: Store, damage, why: str) -> None:
    exp = Experiment.init(root, load_space(SMALL))
    run_some(exp, 2)
    good = root.read("snap/experiment.json")[0]
    broken = damage(good)
    root.write("snap/experiment.json", broken)
    fresh = Experiment.open(root, "snap")  # a worker that has no decoded copy in memory
    with pytest.raises(CorruptSnapshot) as err:
        fresh.claim("w2")
    message = str(err.value)
    assert message.startswith(
        f"{root.uri}/snap/experiment.json ({len(broken)} bytes) cannot be read back: {why}"
    )
    assert "It was left unchanged" in message and "\n" not in message
    assert root.read("snap/experiment.json")[0] == broken
    assert root.stat("snap/lease") is None  # the lease was released despite the error
    if why.startswith("not valid JSON"):
        with pytest.raises(CorruptSnapshot):
            fresh.status()
    # The worker that had the good version decoded must not "repair" it with its copy either.
    with pytest.raises(CorruptSnapshot):
        exp.claim("w1")
    assert root.read("snap/experiment.json")[0] == broken


def test_compact_snapshot_is_a_faithful_ax_snapshot(root: Store, tmp_path: Path) -> None:
    from ax import Client

    from sweep import ax_client

    exp = Experiment.init(root, load_space(SMALL))
    run_some(exp, 5)  # Sobol and BoTorch trials, all with data
    ours = root.read("snap/experiment.json")[0]
    space = load_space(SMALL)
    client, ledger = ax_client.decode(json.loads(ours), space)  # Ax's decoder consumes its input
    # Ax's own snapshot of the very same state, for comparison.
    full = json.dumps(client._to_json_snapshot())
    assert len(ours) < len(full) * 0.6
    (tmp_path / "ours.json").write_bytes(ours)
    via_ax = Client.load_from_json_file(str(tmp_path / "ours.json"))  # Ax's public loader reads ours
    reference = ax_client.decode(json.loads(full), space)[0]
    for c in (via_ax, reference):
        assert len(c._experiment.trials) == 5
    frame = lambda c: c._experiment.lookup_data().df.sort_values("trial_index").reset_index(drop=True)  # noqa: E731
    assert frame(via_ax).equals(frame(reference))
    assert ax_client.node_names(client) == {0: "Sobol", 1: "Sobol", 2: "Sobol", 3: "MBM", 4: "MBM"}
    # Same state -> the same next proposal, whichever form it was loaded from.
    assert ax_client.generate(client) == ax_client.generate(reference)
    assert ledger.trials[3].phase == "BoTorch" and ledger.trials[3].ingested == [1]
    assert ledger.trials[4].ingested == []  # reported, waiting for the next claim to fold it in


def test_open_falls_back_to_the_space_inside_the_snapshot(root: Store) -> None:
    Experiment.init(root, load_space(SMALL))
    root.delete("snap/space.yaml")  # as if init died between its two writes
    assert Experiment.open(root, "snap").space == load_space(SMALL)


def test_status_and_reporting_never_import_ax(tmp_path: Path) -> None:
    exp = Experiment.init(open_store(str(tmp_path)), load_space(NOTEBOOK))
    claim = exp.claim("w1").claim
    script = f"""
import sys, time
t0 = time.perf_counter()
from sweep.experiment import Experiment
from sweep.store import open_store
took = time.perf_counter() - t0
exp = Experiment.open(open_store({str(tmp_path)!r}), "stage19_stage2")
exp.heartbeat(0, 1, [{{"step": 3, "loss": 4.2}}])
exp.report_result(0, 1, {{"status": "completed", "final_eval_loss": 3.0}})
status = exp.status()
assert status.rows[0].state == "completed" and not status.rows[0].ingested, status.rows
heavy = sorted(m for m in ("ax", "torch", "botorch", "pandas") if m in sys.modules)
print(heavy, took)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    heavy, took = out.stdout.split("]")
    assert heavy == "["
    assert float(took) < 1.0
    assert claim.trial_index == 0
