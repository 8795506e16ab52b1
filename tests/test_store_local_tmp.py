"""Local store: temp files left by a writer killed before its rename are removed once stale, never listed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from sweep.store import LocalStore
from sweep.store.local import STALE_TMP_S


def _age(path, seconds: float, store: LocalStore) -> None:
    """Set ``path``'s mtime ``seconds`` before the store's (filesystem) clock."""
    then = store.now() - seconds
    os.utime(path, (then, then))


def _stray(store: LocalStore, directory: str, name: str, *, meta: bool = False):
    path = store.root / directory / (".sweep-meta" if meta else "") / f".sweep-tmp-{name}"
    path.write_bytes(b"half a write")
    return path


def test_list_removes_stale_temp_files_and_keeps_fresh_ones(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.write("trials/3/claim.json", b"{}")
    stale = _stray(store, "trials/3", "dead1")
    stale_meta = _stray(store, "trials/3", "dead1", meta=True)  # the sidecar's temp file
    fresh = _stray(store, "trials/3", "live1")
    _age(stale, STALE_TMP_S + 60, store)
    _age(stale_meta, STALE_TMP_S + 60, store)
    _age(fresh, STALE_TMP_S - 60, store)  # inside the margin: might be a live writer's

    assert store.list() == ["trials/3/claim.json"]
    assert not stale.exists() and not stale_meta.exists()
    assert fresh.exists()
    assert store.list("trials/") == ["trials/3/claim.json"]  # still never listed
    assert store.read("trials/3/claim.json")[0] == b"{}"


def test_a_write_removes_stale_temp_files_in_its_directory(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.write("trials/3/claim.json", b"{}")
    stale = _stray(store, "trials/3", "dead2")
    other_dir = _stray(store, "", "dead3")  # another directory: left to list() or its own writes
    _age(stale, STALE_TMP_S * 2, store)
    _age(other_dir, STALE_TMP_S * 2, store)
    store.write("trials/3/heartbeat.json", b"{}")
    assert not stale.exists() and other_dir.exists()


def test_writer_killed_between_temp_write_and_rename(tmp_path):
    """A real kill -9 in the window: the temp files stay hidden, and go once older than the margin."""
    root = tmp_path / "s"
    ready = tmp_path / "ready"
    child = textwrap.dedent(
        f"""
        import os, time
        from sweep.store import LocalStore
        def frozen_replace(src, dst):  # the writer stops right before its first rename
            open({str(ready)!r}, "w").close()
            time.sleep(600)
        os.replace = frozen_replace
        LocalStore({str(root)!r}).write("trials/1/result.json", b"never renamed")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "writer did not reach the rename"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    store = LocalStore(root)
    leftovers = list((root / "trials" / "1").rglob(".sweep-tmp-*"))
    assert len(leftovers) == 2  # the data's and the sidecar's temp files
    assert store.list() == []  # within the margin: kept, and hidden
    assert all(p.exists() for p in leftovers)
    for p in leftovers:  # an hour later, as the filesystem clock sees it
        _age(p, STALE_TMP_S + 1, store)
    assert store.list() == []
    assert not any(p.exists() for p in leftovers)
    store.write("trials/1/result.json", b"retried")
    assert store.read("trials/1/result.json")[0] == b"retried"
