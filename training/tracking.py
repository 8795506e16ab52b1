"""Where training numbers go: console lines, a JSONL file (tailed by the sweep worker), and
Weights & Biases when enabled (offline unless WANDB_API_KEY is set; absent wandb is one log line)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("training")


class MetricsLogger:
    def __init__(
        self,
        jsonl_path: str | Path | None,
        wandb_cfg: Any = None,
        run_config: dict | None = None,
        out_dir: str | Path | None = None,
    ) -> None:
        self.path = Path(jsonl_path) if jsonl_path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wandb = _start_wandb(wandb_cfg, run_config or {}, out_dir) if wandb_cfg is not None else None

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **record}
        if self.path:
            # One line per record, flushed at once, so a tailing worker never reads a partial line
            # beyond the last newline.
            with self.path.open("a") as fh:
                fh.write(json.dumps(record, default=float) + "\n")
        if self._wandb is not None:
            stage = record.get("stage", "run")
            step = record.get("global_step")
            payload = {
                f"{stage}/{k}": v
                for k, v in record.items()
                if isinstance(v, (int, float)) and k not in ("time", "global_step")
            }
            self._wandb.log(payload, step=step)

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(cfg: Any, run_config: dict, out_dir: str | Path | None):
    if not cfg.enabled:
        return None
    try:
        import wandb
    except ImportError:
        log.info("wandb is not installed: W&B logging is off (pip install wandb to enable it)")
        return None
    mode = cfg.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(
        project=cfg.project,
        group=cfg.group,
        name=cfg.name,
        tags=list(cfg.tags),
        config=run_config,
        mode=mode,
        dir=str(out_dir) if out_dir else None,
        reinit="finish_previous",
    )
    log.info("W&B run %s (%s mode, group=%s)", run.id, mode, cfg.group)
    return run
