"""The cloud path against fake GCS with the real pipeline: a trial preempted in Stage 2 is finished
by another worker from the checkpoint in the bucket, continuing at the saved step, with the final
loss of an uninterrupted run.

Tolerance: fp32 on CPU, one thread in every process, restored RNG / data position / optimizer /
scheduler / lambda state -- the resumed trajectory is the same computation, so the final loss
agrees to rel 1e-5 (in practice bit for bit; the margin covers summation order only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TEST_OVERRIDES

from sweep.experiment import Experiment
from sweep.space import load_space
from sweep.store import open_store

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS_19, STEPS_2, EVERY, PREEMPT_AT = 3, 8, 2, 5


def _space(name: str) -> str:
    return yaml.safe_dump(
        {
            "name": name,
            "objective": {"metric": "final_eval_loss", "goal": "minimize"},
            "budget": {"trials": 1, "sobol_trials": 1, "seed": 0},
            "base_overrides": [
                *TINY_TEST_OVERRIDES,
                f"stage1_9.max_steps={STEPS_19}",
                f"stage2.max_steps={STEPS_2}",
                "stage2.lambda_warmup.warmup_steps=4",
                f"run.checkpoint_every={EVERY}",
            ],
            "parameters": {
                "stage2_lr": {
                    "type": "float",
                    "low": 1e-3,
                    "high": 4e-3,
                    "log": True,
                    "override": "stage2.optimizer.lr",
                }
            },
            "trial": {"max_attempts": 3, "heartbeat_s": 2, "grace_s": 120, "entrypoint": "preempting_trial"},
        }
    )


def _env(fake_gcs, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SWEEP_STORE", "PREEMPT_AT_STAGE2_STEP")}
    env.update(
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        SWEEP_GCS_ENDPOINT=fake_gcs.url,
        PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",  # the same reduction order in every process
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    return env


def _worker(uri: str, worker_id: str, workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "sweep.cli",
        "worker",
        "--store",
        uri,
        "--worker-id",
        worker_id,
        "--workdir",
        str(workdir),
        "--poll",
        "0.5",
        "--idle-timeout",
        "120",
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(0.2)
    return value


def _result(exp_store, attempt: int) -> dict:
    got = exp_store.read(f"trials/0/result-{attempt}.json")
    assert got is not None, f"no result-{attempt}.json"
    return json.loads(got[0])


def test_preempted_trial_resumes_from_the_bucket_on_another_worker(fake_gcs, tmp_path):
    root_uri = f"gs://{fake_gcs.bucket}/resume-{uuid.uuid4().hex[:8]}"
    root = open_store(root_uri, endpoint_url=fake_gcs.url)
    exp = Experiment.init(root, load_space(_space("preempt")))
    uri, exp_store = f"{root_uri}/preempt", root.child("preempt")

    # Worker A: its trial "gets preempted" right after stage 2 step PREEMPT_AT.
    a = _worker(uri, "A", tmp_path / "A", _env(fake_gcs, PREEMPT_AT_STAGE2_STEP=str(PREEMPT_AT)))
    # Meanwhile the uninterrupted reference: the trial's exact overrides, a local checkpoint dir.
    claim = wait_for(lambda: exp_store.read("trials/0/claim.json"), 300, "worker A's claim")
    ref_dir = tmp_path / "ref"
    ref = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training.run_trial",
            "--out",
            str(ref_dir / "result.json"),
            "--",
            *json.loads(claim[0])["overrides"],
            f"run.out_dir={ref_dir}",
            f"run.checkpoint_dir={ref_dir / 'ckpt'}",
        ],
        env=_env(fake_gcs),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out_a, _ = a.communicate(timeout=600)
    assert a.returncode == 0, out_a[-3000:]
    assert "stopped: stopped by signal" in out_a, out_a[-3000:]
    first = _result(exp_store, 1)
    assert first["status"] == "preempted", first
    assert first["reason"] == f"SIGTERM at stage2 step {PREEMPT_AT}", first
    assert first["worker"] == "A" and first["gpu"] == "cpu" and first["seconds"] > 0
    # The checkpoints went to the bucket (none in A's scratch dir): the periodic one at step 4, the
    # preemption one at step 5; the boundary checkpoint stage2-step0 was pruned (keep=2).
    pointer = json.loads(exp_store.read("trials/0/ckpt/latest.json")[0])
    assert pointer == {"latest": f"stage2-step{PREEMPT_AT}", "history": ["stage2-step4", "stage2-step5"]}
    assert exp_store.stat("trials/0/ckpt/stage2-step5.pt").size > 10_000
    assert not list((tmp_path / "A").rglob("*.pt"))

    # Worker B (a fresh machine: another scratch dir) claims the requeued trial and finishes it.
    b = _worker(uri, "B", tmp_path / "B", _env(fake_gcs))
    out_b, _ = b.communicate(timeout=600)
    out_ref, _ = ref.communicate(timeout=600)
    assert b.returncode == 0, out_b[-3000:]
    assert ref.returncode == 0, out_ref[-3000:]
    second = _result(exp_store, 2)
    assert second["status"] == "completed" and second["worker"] == "B", second
    trial_log = (tmp_path / "B" / "trial-0-a2" / "trial.log").read_text()
    assert f"resuming from checkpoint stage2-step{PREEMPT_AT} (stage stage2, step {PREEMPT_AT})" in trial_log

    # It continued at the saved step: attempt 1 logged stage 2 steps 1..5, attempt 2 steps 6..8.
    progress = exp.progress(0)
    steps = {
        n: [r["step"] for r in progress if r["attempt"] == n and r.get("stage") == "stage2" and "loss" in r]
        for n in (1, 2)
    }
    assert steps == {1: list(range(1, PREEMPT_AT + 1)), 2: list(range(PREEMPT_AT + 1, STEPS_2 + 1))}

    # Same numbers as the uninterrupted run.
    reference = json.loads((ref_dir / "result.json").read_text())
    assert second["metrics"]["final_eval_loss"] == pytest.approx(reference["final_eval_loss"], rel=1e-5)
    resumed_curve = [v for _, v in second["stages"]["stage2"]["curve"]]
    assert resumed_curve == pytest.approx([v for _, v in reference["stages"]["stage2"]["curve"]], rel=1e-5)

    # Finished: only the final checkpoint stays in the bucket, and the sweep knows the trial.
    assert sorted(exp_store.list("trials/0/ckpt/")) == ["trials/0/ckpt/final.pt", "trials/0/ckpt/latest.json"]
    status = exp.status()
    assert status.finished and status.rows[0].state == "completed" and status.rows[0].attempt == 2
