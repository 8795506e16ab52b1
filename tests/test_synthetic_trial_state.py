"""The synthetic trial's checkpoint (state.json) is replaced atomically: never torn, never half-read."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from sweep.testing.synthetic_trial import _Checkpoint


def test_crash_mid_write_leaves_the_previous_state_readable(tmp_path, monkeypatch):
    ckpt = _Checkpoint(str(tmp_path))
    ckpt.write(3)

    def torn_write(self, data, *args, **kwargs):  # the process dies halfway through writing
        with open(self, "w") as fh:
            fh.write(data[: len(data) // 2])
        raise OSError("killed mid-write")

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", torn_write)
        with pytest.raises(OSError, match="killed mid-write"):
            ckpt.write(4)
    assert _Checkpoint(str(tmp_path)).read() == 3  # a resume starts after step 3, not with a JSON error
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # the torn temp file is gone


def test_a_reader_never_sees_a_partial_state(tmp_path):
    ckpt = _Checkpoint(str(tmp_path))
    ckpt.write(0)
    done = threading.Event()
    seen, errors = [], []

    def reader() -> None:
        while not done.is_set():
            try:
                seen.append(json.loads((tmp_path / "state.json").read_text())["step"])
            except (ValueError, KeyError) as exc:
                errors.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for step in range(1, 201):
            ckpt.write(step)
    finally:
        done.set()
        thread.join()
    assert not errors, errors[:3]
    assert seen == sorted(seen) and ckpt.read() == 200
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
