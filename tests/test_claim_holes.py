"""Regression tests for holes in the claim path found by a red-team pass (issue 11, items 4-8, 9b).

Each test reproduces one hole against the store directly, with threads standing in for workers:
a slow BoTorch fit, a claimer frozen between its snapshot and its claim file, a claimer hung
inside Ax, a space.yaml edited mid-sweep, spot preemptions, and a long trial's progress.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import pytest

from sweep import ax_client
from sweep.experiment import PROGRESS_SEGMENT_BYTES, Experiment, TrialSuperseded
from sweep.ledger import Ledger
from sweep.space import SpaceError, load_space
from sweep.store import Conflict, open_store


def space_yaml(name: str, *, trial: str, base: str = "[steps=3]") -> str:
    return f"""
name: {name}
objective: {{metric: final_eval_loss, goal: minimize}}
budget: {{trials: 6, sobol_trials: 6, seed: 1}}
base_overrides: {base}
parameters:
  x: {{type: float, low: 0, high: 1, override: x}}
trial: {trial}
"""


def completed(loss: float = 1.0) -> dict:
    return {"status": "completed", "metrics": {"final_eval_loss": loss}}


def ledger_of(exp: Experiment) -> Ledger:
    return Ledger.from_snapshot(json.loads(exp.store.read("experiment.json")[0]))


@pytest.fixture(params=["memory", "gcs"])
def root_uri(request) -> str:
    if request.param == "memory":
        return f"memory://holes-{uuid.uuid4().hex}"
    fake = request.getfixturevalue("fake_gcs")
    request.getfixturevalue("monkeypatch").setenv("SWEEP_GCS_ENDPOINT", fake.url)
    return f"gs://{fake.bucket}/holes-{uuid.uuid4().hex[:8]}"


# -- item 4: the claim time is taken after generation ------------------------------------------


def test_a_slow_fit_does_not_make_the_fresh_claim_look_stale(monkeypatch):
    root = open_store(f"memory://slowfit-{uuid.uuid4().hex}")
    # Stale after 1.5 s of silence; each generation takes 3 s (a slow BoTorch fit).
    exp = Experiment.init(root, load_space(space_yaml("slowfit", trial="{heartbeat_s: 0.5, grace_s: 1.0}")))
    real = ax_client.generate

    def slow_generate(client):
        time.sleep(3.0)
        return real(client)

    monkeypatch.setattr(ax_client, "generate", slow_generate)
    first = exp.claim("A").claim
    # The next claimer arrives at once, before A's worker could heartbeat: A's trial is fresh.
    second = exp.claim("B").claim
    assert (first.trial_index, second.trial_index) == (0, 1)
    trial0 = ledger_of(exp).trials[0]
    assert (trial0.state, trial0.attempt, trial0.worker) == ("running", 1, "A"), trial0.reason


# -- item 5: claim.json is fenced ----------------------------------------------------------------


class FreezeAt:
    """Make every write of one store object hang from its first write of a ``leaf`` key until thaw()."""

    def __init__(self, store, leaf: str) -> None:
        self.real_write, self.leaf = store.write, leaf
        self.frozen, self._thawed = threading.Event(), threading.Event()
        store.write = self.write

    def write(self, key, data, if_version=None):
        if key.endswith(self.leaf) and not self._thawed.is_set():
            self.frozen.set()
        if self.frozen.is_set():
            self._thawed.wait(120)
        return self.real_write(key, data, if_version=if_version)

    def thaw(self) -> None:
        self._thawed.set()


def test_a_frozen_claimer_cannot_overwrite_its_successors_claim(root_uri):
    space = load_space(space_yaml("fenced", trial="{heartbeat_s: 0.5, grace_s: 1.0}"))
    Experiment.init(open_store(root_uri), space)
    exp_a = Experiment.open(open_store(root_uri), "fenced", lease_ttl_s=3.0)
    exp_b = Experiment.open(open_store(root_uri), "fenced", lease_ttl_s=3.0)
    freeze = FreezeAt(exp_a.store, "claim.json")  # A freezes (keepalive too) right after its snapshot CAS
    claims_a, errors = [], []

    def claim_a() -> None:
        try:
            claims_a.append(exp_a.claim("A"))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=claim_a, daemon=True)
    thread.start()
    assert freeze.frozen.wait(120), "A never reached its claim file"
    # B waits out A's lease, finds A's trial 0 silent (A never started it) and hands it out again.
    got_b = exp_b.claim("B").claim
    assert (got_b.trial_index, got_b.attempt, got_b.is_requeue) == (0, 2, True)
    exp_b.heartbeat(0, 2)
    freeze.thaw()  # A wakes up and goes on writing its (older) claim of attempt 1
    thread.join(120)
    assert not thread.is_alive() and not errors, errors

    claim = json.loads(exp_b.store.read("trials/0/claim.json")[0])
    assert (claim["attempt"], claim["worker"]) == (2, "B")
    assert claims_a[0].claim.trial_index == 1  # A's claim started over and took a new trial
    exp_b.heartbeat(0, 2)  # the live attempt is not told it was superseded
    exp_b.report_result(0, 2, completed(0.5))  # and its result is accepted
    exp_b.ingest()
    assert ledger_of(exp_b).trials[0].state == "completed"
    with pytest.raises(TrialSuperseded):
        exp_a.heartbeat(0, 1)


# -- item 6: the lease hold is bounded -----------------------------------------------------------


def test_a_hung_lease_holder_is_cut_off_and_waiters_wait_on(monkeypatch, caplog):
    root = open_store(f"memory://hung-{uuid.uuid4().hex}")
    Experiment.init(root, load_space(space_yaml("hung", trial="{heartbeat_s: 30, grace_s: 60}")))
    exp_a = Experiment.open(root, "hung", lease_ttl_s=1.0, lease_max_hold_s=2.0)
    # B gives up nothing: its "timeout" is only how often it says it is still waiting.
    exp_b = Experiment.open(root, "hung", lease_ttl_s=1.0, lease_timeout_s=0.5, lease_max_hold_s=2.0)
    real, unhang = ax_client.generate, threading.Event()
    entered = threading.Event()

    def generate(client):
        if threading.current_thread().name == "hung-claimer" and not unhang.is_set():
            entered.set()
            unhang.wait(120)  # deadlocked inside Ax, keepalive still running
        return real(client)

    monkeypatch.setattr(ax_client, "generate", generate)
    results_a: list = []
    thread = threading.Thread(target=lambda: results_a.append(exp_a.claim("A")), name="hung-claimer", daemon=True)
    thread.start()
    assert entered.wait(60)
    caplog.set_level(logging.WARNING, logger="sweep.experiment")
    started = time.monotonic()
    got_b = exp_b.claim("B").claim  # old code: LeaseTimeout after 0.5 s
    waited = time.monotonic() - started
    assert got_b.trial_index == 0
    assert waited < 30, waited
    assert any("still waiting for the lease" in r.getMessage() for r in caplog.records)
    unhang.set()  # A wakes up: its claim is aborted (lease given up) and starts over
    thread.join(60)
    assert results_a and results_a[0].claim.trial_index == 1
    trials = ledger_of(exp_b).trials
    assert {i: t.worker for i, t in trials.items()} == {0: "B", 1: "A"}


# -- item 7: overrides are frozen per trial; a changed space.yaml is refused --------------------


def test_a_requeue_runs_the_configuration_of_the_first_attempt():
    root = open_store(f"memory://frozen-{uuid.uuid4().hex}")
    trial = "{max_attempts: 3, heartbeat_s: 30, grace_s: 60}"
    exp = Experiment.init(root, load_space(space_yaml("frozen", trial=trial, base="[steps=3]")))
    first = exp.claim("A").claim
    assert "steps=3" in first.overrides
    exp.report_result(0, 1, {"status": "preempted"})
    # The space in the store is edited mid-sweep: steps=3 -> steps=300.
    edited = space_yaml("frozen", trial=trial, base="[steps=300]")
    exp.store.write("space.yaml", load_space(edited).to_yaml().encode())
    with pytest.raises(SpaceError) as err:
        Experiment.open(root, "frozen")
    assert "space.yaml differs from the space experiment 'frozen' was created with" in str(err.value)
    assert "\n" not in str(err.value)
    # A worker that loaded the edited space anyway (it opened before a check existed, or built
    # the Experiment by hand) still runs attempt 2 with attempt 1's overrides and entrypoint.
    stale_worker = Experiment(exp.store, "frozen", load_space(edited))
    second = stale_worker.claim("B").claim
    assert (second.trial_index, second.attempt) == (0, 2)
    assert second.overrides == first.overrides and "steps=300" not in second.overrides
    assert second.entrypoint == first.entrypoint == "training.run_trial"
    assert ledger_of(exp).trials[0].overrides == list(first.overrides)


def test_the_cli_refuses_a_changed_space_in_one_line(tmp_path, capsys):
    from sweep.cli import main

    store = tmp_path / "sweeps"
    trial = "{heartbeat_s: 30, grace_s: 60}"
    exp = Experiment.init(open_store(str(store)), load_space(space_yaml("clifrozen", trial=trial)))
    exp.store.write("space.yaml", load_space(space_yaml("clifrozen", trial=trial, base="[steps=9]")).to_yaml().encode())
    code = main(["status", "--store", str(store), "--name", "clifrozen"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "differs from the space experiment 'clifrozen' was created with" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


# -- item 8: preemptions have their own budget --------------------------------------------------


def test_preemptions_do_not_use_up_the_failure_budget():
    root = open_store(f"memory://preempt-{uuid.uuid4().hex}")
    trial = "{max_attempts: 2, max_preemptions: 3, heartbeat_s: 30, grace_s: 60}"
    exp = Experiment.init(root, load_space(space_yaml("preempt", trial=trial)))
    for attempt in (1, 2, 3):  # three spot preemptions: more than max_attempts, still queued
        claim = exp.claim("w").claim
        assert (claim.trial_index, claim.attempt) == (0, attempt)
        exp.report_result(0, attempt, {"status": "preempted", "reason": "spot VM reclaimed"})
    claim = exp.claim("w").claim
    assert (claim.trial_index, claim.attempt) == (0, 4)
    exp.report_result(0, 4, {"status": "failed", "reason": "CUDA error"})  # failure 1 of 2
    claim = exp.claim("w").claim
    assert (claim.trial_index, claim.attempt) == (0, 5)
    row = next(r for r in exp.status().rows if r.index == 0)
    assert (row.state, row.preemptions) == ("running", 3)
    exp.report_result(0, 5, {"status": "failed", "reason": "CUDA error"})  # failure 2 of 2
    exp.ingest()
    record = ledger_of(exp).trials[0]
    assert record.state == "failed" and record.preemptions == 3
    assert record.reason == "CUDA error (gave up after 2 attempts, after 3 preemptions)"


def test_preemptions_past_their_limit_fail_the_trial_with_the_reason():
    root = open_store(f"memory://preempt2-{uuid.uuid4().hex}")
    trial = "{max_attempts: 3, max_preemptions: 1, heartbeat_s: 30, grace_s: 60}"
    exp = Experiment.init(root, load_space(space_yaml("preempt2", trial=trial)))
    for attempt in (1, 2):
        exp.claim("w")
        exp.report_result(0, attempt, {"status": "preempted", "reason": "spot VM reclaimed"})
    exp.ingest()
    record = ledger_of(exp).trials[0]
    assert record.state == "failed"
    assert "gave up after 2 preemptions; raise trial.max_preemptions (1)" in record.reason


def test_status_and_report_show_preemptions(tmp_path):
    from rich.console import Console

    from sweep.report import collect, load_view, render_status, trial_record

    store = tmp_path / "sweeps"
    trial = "{max_attempts: 2, max_preemptions: 5, heartbeat_s: 30, grace_s: 60}"
    exp = Experiment.init(open_store(str(store)), load_space(space_yaml("shown", trial=trial)))
    exp.claim("w")
    exp.report_result(0, 1, {"status": "preempted"})
    exp.claim("w")
    console = Console(width=200, record=True)
    view = load_view(exp)
    console.print(render_status(view))
    text = console.export_text()
    assert "preemptions 1" in text and "2 (1p)" in text
    assert trial_record(collect(exp, view)[0], "final_eval_loss")["preemptions"] == 1


# -- item 9: progress is appended in bounded segments -------------------------------------------


def test_progress_appends_cost_a_bounded_write_however_long_the_trial():
    root = open_store(f"memory://progress-{uuid.uuid4().hex}")
    exp = Experiment.init(root, load_space(space_yaml("progress", trial="{heartbeat_s: 30, grace_s: 60}")))
    exp.claim("w")
    sizes: list[int] = []
    real = exp.store.write

    def write(key, data, if_version=None):
        if "progress" in key:
            sizes.append(len(data))
        return real(key, data, if_version=if_version)

    exp.store.write = write
    batch = [{"stage": "stage2", "step": s, "loss": 3.0 - s * 1e-4, "pad": "x" * 200} for s in range(20)]
    total = 0
    for beat in range(120):  # ~120 heartbeats of 20 records: ~600 KB of progress in all
        records = [{**r, "step": beat * 20 + r["step"]} for r in batch]
        exp.heartbeat(0, 1, records)
        total += sum(len(json.dumps(r)) for r in records)
    assert total > 5 * PROGRESS_SEGMENT_BYTES
    assert max(sizes) <= PROGRESS_SEGMENT_BYTES + 10_000  # a segment plus one heartbeat's batch
    steps = [r["step"] for r in exp.progress(0)]
    assert steps == list(range(120 * 20))  # every record, in order, across segments
    # A fresh reader process (no cached tail) appends to the last segment, not over it.
    Experiment.open(root, "progress").append_progress(0, 1, [{"stage": "stage2", "step": 99999}])
    assert [r["step"] for r in exp.progress(0)][-2:] == [120 * 20 - 1, 99999]


def test_a_garbled_progress_line_does_not_hide_the_rest():
    root = open_store(f"memory://garbled-{uuid.uuid4().hex}")
    exp = Experiment.init(root, load_space(space_yaml("garbled", trial="{heartbeat_s: 30, grace_s: 60}")))
    exp.claim("w")
    exp.heartbeat(0, 1, [{"step": 1}])
    key = exp.store.list("trials/0/progress/")[0]
    data, version = exp.store.read(key)
    exp.store.write(key, data + b"{not json\n\xff\xfe\n[1, 2]\n", if_version=version)
    Experiment.open(root, "garbled").append_progress(0, 1, [{"step": 2}])
    assert [r["step"] for r in exp.progress(0)] == [1, 2]


def test_claim_file_writes_are_conditional():
    """The fencing depends on a CAS write; a store that ignores if_version would break it."""
    root = open_store(f"memory://cas-{uuid.uuid4().hex}")
    exp = Experiment.init(root, load_space(space_yaml("cas", trial="{heartbeat_s: 30, grace_s: 60}")))
    seen: list = []
    real = exp.store.write

    def write(key, data, if_version=None):
        if key.endswith("claim.json"):
            seen.append(if_version)
        return real(key, data, if_version=if_version)

    exp.store.write = write
    exp.claim("w")
    assert seen and all(v is not None for v in seen)
    with pytest.raises(Conflict):
        real("trials/0/claim.json", b"{}", if_version="not-the-version")
