"""Rebuild a finished trial's BitNet student from its final checkpoint and export it for transformers.

    python -m training.export_trial --checkpoint gs://B/P/EXP/trials/3/ckpt --out gs://B/P/EXP/best \\
        [--info JSON] -- <the trial's Hydra overrides>

The final checkpoint holds the student's ``state_dict`` only, so the student is rebuilt the way the
pipeline built it -- the config composed from the trial's overrides, the teacher loaded, Stage 1
(``build_student``: SubLN + BitLinear, saliency layers when the trial used them) -- then the weights
are loaded and written with ``export_bitnet`` (loadable by ``AutoModelForCausalLM.from_pretrained``),
on the CPU, in the dtype the trial trained in. ``--out`` is a local folder or any fsspec URI (a
``gs://`` one reaches the same endpoint as the sweep store); ``sweep_trial.json`` there records which
trial it is (``--info``). A destination that holds something other than an earlier export is refused.

Exit codes: 0 exported, 2 bad input (one line on stderr), 1 failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

MARKER = "sweep_trial.json"


class ExportError(Exception):
    """Bad input for an export; printed as one line, exit code 2."""


def export_trial(
    checkpoint_dir: str, out: str, overrides: list[str], info: dict[str, Any] | None = None
) -> str:
    import fsspec
    import torch

    from training.api import compose_config
    from training.bitnet import bitlinear_modules, export_bitnet
    from training.checkpoint import CheckpointManager, storage_options
    from training.stages.common import build_student, load_teacher

    fs, path = fsspec.core.url_to_fs(out, **storage_options(out))
    earlier = _earlier_export(fs, path, out)  # refuse a wrong destination before any heavy work
    cfg = compose_config([*overrides, "run.device=cpu"])
    ckpts = CheckpointManager(checkpoint_dir)
    if "final" not in ckpts.history():
        raise ExportError(f"{checkpoint_dir}: no final checkpoint (the trial did not complete)")
    state = ckpts.load("final")
    weights = state["model"]
    dtype = next((t.dtype for t in weights.values() if t.is_floating_point()), torch.float32)

    teacher, tokenizer = load_teacher(cfg, torch.device("cpu"), dtype)
    student = build_student(cfg, teacher)
    del teacher
    model = student.model
    for m in bitlinear_modules(model):
        if hasattr(m, "protect_k"):
            m.protect_k = 0.0  # as after Stage 1.9: the exported model is fully ternary
    model.load_state_dict(weights)
    model.eval()

    if earlier:
        fs.rm(path, recursive=True)
    with tempfile.TemporaryDirectory(prefix="sweep-export-") as tmp:
        local = Path(tmp)
        export_bitnet(model, local, tokenizer)
        (local / MARKER).write_text(json.dumps(info or {}, indent=1, default=str))
        fs.makedirs(path, exist_ok=True)
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(f), f"{path.rstrip('/')}/{f.relative_to(local).as_posix()}")
    return out


def _earlier_export(fs: Any, path: str, out: str) -> bool:
    """Whether ``path`` holds an earlier export (to be replaced); ExportError if it holds anything else."""
    try:
        existing = fs.find(path)
    except FileNotFoundError:
        return False
    if not existing:
        return False
    if not any(p.rstrip("/").endswith(f"/{MARKER}") for p in existing):
        raise ExportError(
            f"--out {out}: holds {len(existing)} file(s) that are not an earlier export (no {MARKER}); "
            "pick an empty destination"
        )
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.export_trial", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--checkpoint", required=True, help="the trial's checkpoint folder (local or gs://)")
    parser.add_argument("--out", required=True, help="destination folder (local or gs://)")
    parser.add_argument("--info", default="{}", help="JSON written to sweep_trial.json")
    parser.add_argument("overrides", nargs="*", help="the trial's Hydra overrides (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    from training.api import ConfigError
    from training.checkpoint import CheckpointError

    try:
        info = json.loads(args.info)
        out = export_trial(args.checkpoint, args.out, args.overrides, info)
    except (ExportError, ConfigError, json.JSONDecodeError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
