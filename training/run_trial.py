"""Run one sweep trial in its own process and write its result as JSON.

    python -m training.run_trial --out result.json -- model=tiny stage2.optimizer.lr=0.002

The sweep worker starts this as a subprocess (isolation from OOM, CUDA faults and leaks). SIGTERM
checkpoints after the current optimizer step and writes ``status: preempted``; a later run with the
same ``run.checkpoint_dir`` resumes from there. Exit code: 0 for a result (completed, diverged or
preempted), 2 for a bad config, 1 for a crash (the JSON then holds the error).

Several GPUs: ``python -m torch.distributed.run --standalone --nproc-per-node K -m training.run_trial
...`` trains with FSDP2 (training/distributed.py); only rank 0 writes the result JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from training.api import ConfigError, compose_config, run_pipeline
from training.checkpoint import UnsafeCheckpointError
from training.distributed import rank_from_env, teardown_distributed
from training.runtime import STOP
from training.teacher.errors import ServedTeacherError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.run_trial", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides (or list them after --)")
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *args.rest]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    STOP.install()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        cfg = compose_config(overrides)
    except ConfigError as exc:
        _write(out, {"status": "failed", "reason": f"bad config: {exc}", "infrastructure": False})
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_pipeline(cfg)
    except UnsafeCheckpointError as exc:
        # Not an infrastructure failure: another worker would find the same planted file. One line, no
        # traceback; the reason names the checkpoint so an operator can delete it.
        _write(out, {"status": "failed", "reason": str(exc), "infrastructure": False})
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ServedTeacherError as exc:
        # One line naming the field and the fix; the sweep retries (resuming from the checkpoint) only
        # when the server was at fault (down, stalled), not for a mismatch a retry would repeat.
        _write(out, {"status": "failed", "reason": str(exc), "infrastructure": exc.infrastructure})
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a crash must still leave a result behind for the worker
        tail = traceback.format_exc().splitlines()[-12:]
        _write(
            out,
            {
                "status": "failed",
                "reason": f"{type(exc).__name__}: {exc}",
                "traceback": tail,
                "infrastructure": True,
            },
        )
        raise
    teardown_distributed()  # not after a crash: torchrun ends the other ranks, which may sit in a collective
    payload = result.to_dict()
    # The sweep's metrics: final_eval_loss, eval_batch_sem (a diagnostic, not trial noise),
    # train_flops and trial_seconds (training/results.py). Top-level final_eval_loss(_sem) stay too.
    payload["metrics"] = result.metrics()
    payload["overrides"] = overrides
    _write(out, payload)
    return 0


def _write(path: Path, payload: dict) -> None:
    if rank_from_env() != 0:
        return  # under torchrun only rank 0 writes the result (every rank computes the same one)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
