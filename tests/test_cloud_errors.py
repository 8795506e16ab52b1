"""GCS failures people hit, end to end against fake GCS: a missing bucket, no permission (403),
transient 429/5xx -- on the checkpoint path (gcsfs inside the trial), through the experiment's store
and at the command line (one line, an exit code) -- plus the worker's trial environment and GPU name.

Faults come from a small HTTP proxy in front of fake-gcs-server that answers chosen requests itself
(the request never reaches the server) or forwards them and then replaces the answer (the request
took effect but its response is "lost"), so every retry path runs over real HTTP.
"""

from __future__ import annotations

import csv
import http.client
import json
import math
import stat
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import torch

from sweep import cli
from sweep.experiment import Experiment
from sweep.space import load_space
from sweep.store import LocalStore, open_store
from sweep.store.backoff import Backoff
from sweep.store.gcs import GCSStore
from sweep.store.gcs_http import GCSClient
from sweep.worker import gpu_name, store_env
from training.checkpoint import CheckpointError, CheckpointManager

# (method, path) -> None to forward, ("before", status) to answer instead, ("after", status) to
# forward and then answer with status.
Policy = Callable[[str, str], tuple[str, int] | None]


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.policy: Policy = lambda method, path: None
        self.log: list[tuple[str, str, str]] = []  # (method, path, what happened)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                path = urlsplit(self.path).path
                with proxy.lock:
                    fault = proxy.policy(self.command, path)
                if fault and fault[0] == "before":
                    proxy._note(self.command, path, f"{fault[1]} before")
                    return self._reply(fault[1], {"Content-Type": "application/json"}, _error(fault[1]))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "transfer-encoding")
                }
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault and fault[0] == "after":
                    proxy._note(self.command, path, f"{fault[1]} after")
                    return self._reply(fault[1], {"Content-Type": "application/json"}, _error(fault[1]))
                proxy._note(self.command, path, str(resp.status))
                self._reply(resp.status, dict(resp.getheaders()), data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _note(self, method: str, path: str, what: str) -> None:
        with self.lock:
            self.log.append((method, path, what))

    def injected(self, kind: str = "") -> list[tuple[str, str, str]]:
        return [e for e in self.log if e[2].endswith(("before", "after")) and kind in e[2]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _error(status: int) -> bytes:
    return json.dumps({"error": {"code": status, "message": f"injected {status}"}}).encode()


def every(n: int, status: int, when: str = "before", start: int = 0) -> Policy:
    """Fault every n-th request (counting from ``start``)."""
    count = {"n": start}

    def policy(method: str, path: str):
        count["n"] += 1
        return (when, status) if count["n"] % n == 0 else None

    return policy


@pytest.fixture
def proxy(fake_gcs) -> Iterator[FaultProxy]:
    p = FaultProxy(fake_gcs.url)
    yield p
    p.close()


def ckpt_root(fake_gcs, bucket: str | None = None) -> str:
    return f"gs://{bucket or fake_gcs.bucket}/ckpt-{uuid.uuid4().hex[:8]}/trials/0/ckpt"


# -- the checkpoint path (training.checkpoint over gcsfs) -----------------------------------------------


def test_checkpoints_reach_fake_gcs_through_the_store_endpoint_variable(fake_gcs, monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("SWEEP_GCS_ENDPOINT", fake_gcs.url)
    root = ckpt_root(fake_gcs)
    manager = CheckpointManager(root)
    assert manager.load_latest() is None
    for step in (0, 2, 4):
        manager.save(f"stage2-step{step}", {"step": step, "w": torch.full((4,), float(step))})
    manager.prune_to("stage2-step4")
    # The store (the same endpoint) sees exactly what the trial wrote.
    store = open_store(root.rsplit("/trials/", 1)[0])
    assert store.list("trials/0/ckpt/") == ["trials/0/ckpt/latest.json", "trials/0/ckpt/stage2-step4.pt"]
    again = CheckpointManager(root).load_latest()
    assert again["step"] == 4 and torch.equal(again["w"], torch.full((4,), 4.0))


def test_checkpoint_in_a_missing_bucket_names_the_bucket_and_the_fix(fake_gcs, monkeypatch):
    monkeypatch.setenv("SWEEP_GCS_ENDPOINT", fake_gcs.url)
    manager = CheckpointManager(ckpt_root(fake_gcs, bucket="no-such-ckpt-bucket"))
    for op in (manager.load_latest, lambda: manager.save("a", {"x": 1})):
        with pytest.raises(CheckpointError) as info:
            op()
        message = str(info.value)
        assert "\n" not in message
        assert "bucket 'no-such-ckpt-bucket' does not exist" in message
        assert message.endswith("create it with: gcloud storage buckets create gs://no-such-ckpt-bucket")


def test_checkpoint_permission_denied_is_one_line_and_not_retried(fake_gcs, proxy, monkeypatch):
    monkeypatch.setenv("SWEEP_GCS_ENDPOINT", proxy.url)
    manager = CheckpointManager(ckpt_root(fake_gcs))
    proxy.policy = lambda method, path: ("before", 403) if method == "POST" else None
    with pytest.raises(CheckpointError) as info:
        manager.save("stage2-step2", {"x": 1})
    message = str(info.value)
    assert "\n" not in message and f"bucket '{fake_gcs.bucket}'" in message
    assert "Forbidden" in message and "roles/storage.objectAdmin" in message
    assert len(proxy.injected("403")) == 1


def test_checkpoint_transient_errors_are_retried_and_nothing_is_lost(fake_gcs, proxy, monkeypatch):
    monkeypatch.setenv("SWEEP_GCS_ENDPOINT", proxy.url)
    root = ckpt_root(fake_gcs)
    manager = CheckpointManager(root)
    states = {f"stage2-step{s}": {"step": s, "w": torch.randn(64)} for s in (2, 4, 6)}
    faults = iter([("before", 503), None, ("after", 503), ("before", 429), None, ("after", 500), None])
    proxy.policy = lambda method, path: next(faults, None)
    for name, state in states.items():
        manager.save(name, state)
    assert [e[2] for e in proxy.injected()] == ["503 before", "503 after", "429 before", "500 after"]
    proxy.policy = every(2, 503)  # every other request of the reads fails once
    loaded = CheckpointManager(root).load_latest()
    assert loaded["step"] == 6 and torch.equal(loaded["w"], states["stage2-step6"]["w"])
    assert CheckpointManager(root).history() == ["stage2-step4", "stage2-step6"]
    assert len(proxy.injected()) >= 5


# -- the experiment over a flaky GCS ------------------------------------------------------------------------

SMALL = """
name: flaky
objective: {metric: final_eval_loss, goal: minimize}
budget: {trials: 3, sobol_trials: 3, seed: 1}
parameters:
  x: {type: float, low: 0, high: 1, override: x}
trial: {max_attempts: 2, heartbeat_s: 30, grace_s: 120}
"""


def test_experiment_over_transient_gcs_errors_loses_nothing(fake_gcs, proxy):
    prefix = f"flaky-{uuid.uuid4().hex[:8]}"
    client = GCSClient(endpoint_url=proxy.url, backoff=Backoff(initial_s=0.001, max_s=0.01), max_attempts=8)
    flaky = GCSStore(fake_gcs.bucket, prefix, client=client)
    # One request in 4 fails before reaching GCS; one in 7 takes effect but its answer is lost.
    before, after = every(4, 503), every(7, 503, "after", start=3)
    proxy.policy = lambda method, path: before(method, path) or after(method, path)
    exp = Experiment.init(flaky, load_space(SMALL))
    losses = {}
    for _ in range(3):
        claim = exp.claim("w").claim
        losses[claim.trial_index] = (claim.params["x"] - 0.3) ** 2
        exp.heartbeat(claim.trial_index, claim.attempt, [{"stage": "stage2", "step": 1, "loss": 1.0}])
        exp.report_result(
            claim.trial_index,
            claim.attempt,
            {"status": "completed", "metrics": {"final_eval_loss": losses[claim.trial_index]}},
        )
    assert exp.claim("w").finished
    assert len(proxy.injected("before")) >= 10 and len(proxy.injected("after")) >= 5
    # Read back without faults: every trial once, every result ingested exactly once.
    clean = Experiment.open(GCSStore(fake_gcs.bucket, prefix, endpoint_url=fake_gcs.url), "flaky")
    status = clean.status()
    assert sorted(losses) == [0, 1, 2]
    assert {r.index: (r.state, r.attempt) for r in status.rows} == {i: ("completed", 1) for i in range(3)}
    assert all(math.isclose(r.loss, losses[r.index]) for r in status.rows)
    data = clean.client()._experiment.lookup_data().df
    assert sorted(data["trial_index"].tolist()) == [0, 1, 2]
    assert [len(clean.progress(i)) for i in range(3)] == [1, 1, 1]


# -- the command line: one line, an exit code ---------------------------------------------------------------


def test_cli_store_errors_are_one_line_with_exit_code_1(fake_gcs, proxy, monkeypatch, capsys):
    monkeypatch.setenv("SWEEP_GCS_ENDPOINT", proxy.url)
    store = f"gs://{fake_gcs.bucket}/cli-{uuid.uuid4().hex[:8]}/exp"
    proxy.policy = lambda method, path: ("before", 403)
    code = cli.main(["status", "--store", store])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert f"permission denied (HTTP 403) on bucket '{fake_gcs.bucket}'" in err
    assert "roles/storage.objectAdmin" in err and "gcloud auth application-default login" in err
    proxy.policy = lambda method, path: ("before", 401)
    code = cli.main(["status", "--store", store])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "run `gcloud auth application-default login`" in err


def test_cli_missing_bucket_is_one_line_with_exit_code_1(fake_gcs, monkeypatch, capsys):
    monkeypatch.setenv("SWEEP_GCS_ENDPOINT", fake_gcs.url)
    code = cli.main(["status", "--store", "gs://no-such-cli-bucket/sweeps/exp"])
    err = capsys.readouterr().err
    assert code == 1 and err == (
        "error: bucket 'no-such-cli-bucket' does not exist (create it with: gcloud storage buckets create "
        "gs://no-such-cli-bucket); needed for gs://no-such-cli-bucket/sweeps/exp/space.yaml\n"
    )


# -- what the worker hands its trials -------------------------------------------------------------------------


def test_trials_get_the_store_endpoint_only_for_an_emulated_gcs(fake_gcs, tmp_path):
    class Exp:
        def __init__(self, store):
            self.store = store

    assert store_env(Exp(GCSStore(fake_gcs.bucket, "x", endpoint_url=fake_gcs.url))) == {
        "SWEEP_GCS_ENDPOINT": fake_gcs.url
    }
    assert store_env(Exp(LocalStore(str(tmp_path)))) == {}
    assert store_env(Exp(open_store("memory://env-test"))) == {}


def test_gpu_name_from_nvidia_smi_or_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_name() == "cpu"
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'case "$*" in *"-i 1"*) echo "NVIDIA A100-SXM4-80GB";; '
        '*) echo "NVIDIA A100-SXM4-80GB"; echo "NVIDIA A100-SXM4-80GB";; esac\n'
    )
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    assert gpu_name("1") == "NVIDIA A100-SXM4-80GB"
    assert gpu_name() == "2x NVIDIA A100-SXM4-80GB"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_name() == "cpu"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_name() == "cpu"


def test_a_gcs_result_carries_gpu_and_seconds(fake_gcs, tmp_path, monkeypatch):
    """The worker's result has ``gpu`` and ``seconds`` (the trial's cost), through the real subprocess
    path, and the report's trials.csv shows them as ``gpu`` and ``hours``."""
    from sweep.worker import Worker, WorkerOptions

    monkeypatch.setenv("PATH", str(tmp_path / "no-nvidia-smi"))
    root = GCSStore(fake_gcs.bucket, f"cost-{uuid.uuid4().hex[:8]}", endpoint_url=fake_gcs.url)
    space = load_space(
        "name: cost\nobjective: {metric: final_eval_loss, goal: minimize}\nbudget: {trials: 1, sobol_trials: 1}\n"
        "base_overrides: [function=branin, steps=2]\nparameters:\n  x1: {type: float, low: -5, high: 10, override: x1}\n"
        "  x2: {type: float, low: 0, high: 15, override: x2}\n"
        "trial: {max_attempts: 1, heartbeat_s: 1, grace_s: 30, entrypoint: sweep.testing.synthetic_trial}\n"
    )
    exp = Experiment.init(root, space)
    summary = Worker(exp, "w", WorkerOptions(workdir=tmp_path, poll_s=0.2, python=sys.executable)).run()
    assert summary.completed == 1
    result = json.loads(root.read("cost/trials/0/result-1.json")[0])
    assert result["gpu"] == "cpu" and 0 < result["seconds"] < 120
    # The synthetic trial checkpointed into the bucket, through the endpoint the worker exported.
    assert "cost/trials/0/ckpt/state.json" in root.list("cost/trials/0/ckpt/")
    # trials.csv carries the cost columns: GPU type and hours.
    from sweep.report import write_report

    write_report(exp, tmp_path / "report", ax=False)
    (row,) = list(csv.DictReader((tmp_path / "report" / "trials.csv").open()))
    assert row["gpu"] == "cpu" and float(row["hours"]) == pytest.approx(result["seconds"] / 3600, abs=1e-4)
