"""Hydra command line for single runs of the Stage 1 -> 1.9 -> 2 (-> 3) pipeline.

Tiny CPU run (offline, a few minutes on 2 cores):
    python scripts/train.py model=tiny stage1_9.max_steps=50 stage2.max_steps=50

Stage 3 alone (Stage 1 conversion, then BitDistill distillation on the built-in labelled task;
stage3.init_checkpoint=<dir>/final.pt starts from a trained student instead):
    python scripts/train.py model=tiny stage=stage3 stage3=classification

Stage 3 from a teacher served by vLLM (docs/served-teacher.md; tests/fake_vllm_server.py stands in):
    python scripts/train.py model=tiny stage=stage3 stage3=classification stage3.teacher.url=http://127.0.0.1:8000

Real run:
    python scripts/train.py model=smollm2_135m data=fineweb run.out_dir=runs/smollm2
"""

from __future__ import annotations

import json
import logging
import sys

from training.api import ConfigError, compose_config, run_pipeline
from training.runtime import STOP
from training.teacher.errors import ServedTeacherError


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    try:
        cfg = compose_config(sys.argv[1:])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    STOP.install()
    try:
        result = run_pipeline(cfg)
    except ServedTeacherError as exc:  # one line naming the field and the fix
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in result.to_dict().items() if k != "stages"}
    summary["stages"] = {k: {"status": s.status, "steps": s.steps, "eval_loss": s.eval_loss,
                             "first_loss": s.curve[0][1] if s.curve else None,
                             "last_loss": s.curve[-1][1] if s.curve else None}
                         for k, s in result.stages.items()}
    print(json.dumps(summary, indent=1, default=float))
    if result.final_eval_loss is not None:
        print(f"final eval loss: {result.final_eval_loss:.4f} +- {result.final_eval_loss_sem:.4f} ({result.status})")
    else:
        print(f"run ended: {result.status} ({result.reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
