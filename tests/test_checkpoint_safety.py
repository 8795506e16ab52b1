"""Checkpoints from the store are never unpickled: a planted pickle is refused on resume and on export,
and nothing in it runs; what the trainer saves stays loadable with weights_only=True."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

from training.checkpoint import CheckpointManager, UnsafeCheckpointError, check_plain, load_plain


class Planted:
    """What an attacker with write access to trials/<i>/ckpt/ would upload: unpickling runs a command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(ckpt_dir, name: str, marker, *, raw: bool) -> None:
    """Write ``<name>.pt`` carrying the payload and point latest.json at it, as the attacker would."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {"stage": name if name == "final" else "stage2", "step": 1, "model": {}, "x": Planted(str(marker))}
    if raw:
        data = pickle.dumps(state)  # a plain pickle, not torch's zip format
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    (ckpt_dir / f"{name}.pt").write_bytes(data)
    (ckpt_dir / "latest.json").write_text(json.dumps({"latest": name, "history": [name]}))


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "raw-pickle"])
def test_planted_pickle_is_refused_by_the_manager_and_nothing_runs(tmp_path, raw):
    marker = tmp_path / "ran"
    plant(tmp_path / "ckpt", "stage2-step1", marker, raw=raw)
    with pytest.raises(UnsafeCheckpointError) as err:
        CheckpointManager(str(tmp_path / "ckpt")).load_latest()
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{tmp_path / 'ckpt'}/stage2-step1.pt" in msg and "refused" in msg and "not plain tensors" in msg
    assert not marker.exists(), "the planted payload ran"


def test_resume_refuses_a_planted_checkpoint_with_one_line(tiny_overrides, tmp_path, capsys):
    from training import run_trial

    marker = tmp_path / "ran"
    ckpt = tmp_path / "ckpt"
    plant(ckpt, "stage2-step1", marker, raw=False)
    out = tmp_path / "result.json"
    code = run_trial.main(
        ["--out", str(out), "--", *tiny_overrides, f"run.out_dir={tmp_path / 'run'}",
         f"run.checkpoint_dir={ckpt}", "run.resume=true"]
    )  # fmt: skip
    assert not marker.exists(), "the planted payload ran on resume"
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{ckpt}/stage2-step1.pt" in line and "not plain tensors" in line
    result = json.loads(out.read_text())
    # Not retried elsewhere as an infrastructure failure: every worker would meet the same file.
    assert result["status"] == "failed" and result["infrastructure"] is False
    assert "not plain tensors" in result["reason"]


def test_export_refuses_a_planted_final_checkpoint_with_one_line(tiny_overrides, tmp_path, capsys):
    from training import export_trial

    marker = tmp_path / "ran"
    ckpt = tmp_path / "ckpt"
    plant(ckpt, "final", marker, raw=False)
    out = tmp_path / "best"
    code = export_trial.main(["--checkpoint", str(ckpt), "--out", str(out), "--", *tiny_overrides])
    assert not marker.exists(), "the planted payload ran during export"
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{ckpt}/final.pt" in line and "refused" in line and "not plain tensors" in line
    assert not out.exists()


def test_save_refuses_state_that_a_safe_load_could_not_read(tmp_path):
    ckpts = CheckpointManager(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match=r"field rng\.numpy\[1\] is a numpy\.ndarray") as err:
        ckpts.save("stage2-step1", {"rng": {"numpy": ("MT19937", np.zeros(3, np.uint32))}})
    assert "\n" not in str(err.value)
    assert ckpts.latest_name() is None and not list((tmp_path / "ckpt").glob("*.pt"))


def test_plain_state_round_trips_through_a_safe_load(tmp_path):
    from collections import OrderedDict

    from training.runtime import rng_state, set_rng_state

    state = {
        "model": OrderedDict(w=torch.randn(3, 2), b=torch.nn.Parameter(torch.zeros(2))),
        "rng": rng_state(),
        "loader": {"epoch": 1, "position": 7},
        "result": {"curve": [(1, 2.5)], "reason": None, "flag": True, "dtype": torch.bfloat16},
    }
    check_plain(state, "test")
    ckpts = CheckpointManager(str(tmp_path / "ckpt"))
    ckpts.save("stage2-step1", state)
    loaded = ckpts.load_latest()
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["loader"] == state["loader"] and loaded["result"] == state["result"]
    # The RNG state survives as plain values: restoring it replays the same draws.
    expected = (np.random.rand(), np.random.randn(), torch.rand(1).item())
    set_rng_state(loaded["rng"])
    assert (np.random.rand(), np.random.randn(), torch.rand(1).item()) == expected


def test_load_plain_refuses_garbage_naming_where(tmp_path):
    with pytest.raises(UnsafeCheckpointError, match=r"^checkpoint gs://b/x\.pt: refused"):
        load_plain(b"not a checkpoint", "gs://b/x.pt")
