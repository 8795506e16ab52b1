"""`sweep export-best`: the best trial's BitNet model, exported for transformers into the store.

    sweep export-best --store gs://BUCKET/sweeps/EXP [--trial N] [--out DEST]

A completed trial keeps its final checkpoint (``trials/<i>/ckpt/final.pt``: the student's state
dict). Rebuilding the student needs torch and the trial's config, so the work runs in a subprocess,
``python -m training.export_trial``, given the trial's overrides (the space's base overrides plus
its parameters, exactly what the trial ran with). The result goes to ``<experiment>/best/`` in the
store unless ``--out`` names another place, with ``sweep_trial.json`` recording the trial, its
parameters and loss. Loading it back: ``AutoModelForCausalLM.from_pretrained(<that folder>)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from sweep.cli import UserError
from sweep.experiment import SweepError


def checkpoint_location(exp: Any, trial: int) -> str | None:
    """Where trial ``trial`` checkpoints, as the trial process sees it (None for memory://)."""
    from sweep.experiment import _external_location  # the same rule as Claim.checkpoint_uri

    return _external_location(exp.store, f"trials/{trial}/ckpt/")


def export_best(
    exp: Any, *, trial: int | None = None, out: str | None = None, python: str = sys.executable
) -> str:
    """Export the best completed trial (or ``trial``) to ``out`` (default ``<experiment>/best``)."""
    from sweep.experiment import _external_location
    from sweep.worker import store_env

    status = exp.status()
    if trial is None:
        row = status.best
        if row is None:
            raise UserError(f"experiment '{exp.name}' has no completed trial yet; nothing to export")
    else:
        row = next((r for r in status.rows if r.index == trial), None)
        if row is None:
            raise UserError(
                f"--trial {trial}: experiment '{exp.name}' has no such trial (trials 0..{len(status.rows) - 1})"
            )
        if row.state != "completed":
            raise UserError(f"--trial {trial}: it is {row.state}; only a completed trial has a final model")
    ckpt = checkpoint_location(exp, row.index)
    if ckpt is None:
        raise UserError(
            f"{exp.uri}: a memory:// store holds no checkpoints; run the sweep on a directory or gs:// store"
        )
    final_key = f"trials/{row.index}/ckpt/final.pt"
    if exp.store.stat(final_key) is None:
        raise UserError(
            f"trial {row.index} has no final checkpoint at {exp.store.where(final_key)}; only trials run by "
            "`sweep worker` (which checkpoints into the store) can be exported"
        )
    dest = out or _external_location(exp.store, "best")
    info = {
        "experiment": exp.name,
        "store": exp.uri,
        "trial": row.index,
        "params": row.params,
        "loss": row.loss,
        "sem": row.sem,
        "metric": status.metric,
        "checkpoint": f"{ckpt.rstrip('/')}/final.pt",
    }
    cmd = [
        python,
        "-m",
        "training.export_trial",
        "--checkpoint",
        ckpt,
        "--out",
        dest,
        "--info",
        json.dumps(info, default=str),
        "--",
        *exp.space.overrides(row.params),
    ]
    env = {**os.environ, **store_env(exp)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
        last = last.removeprefix("error: ")
        error = UserError if proc.returncode == 2 else SweepError
        raise error(f"export of trial {row.index} failed (exit {proc.returncode}): {last[:500]}")
    return dest
