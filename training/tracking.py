"""Where training numbers go: console lines, a JSONL file (tailed by the sweep worker), and
Weights & Biases when ``run.wandb.enabled`` (absent wandb is one log line, nothing more).

W&B mode ``auto`` (the default) is ``$WANDB_MODE`` when set, else online when ``WANDB_API_KEY``
is set and offline otherwise; the key itself is read by wandb from the environment and never
passes through configs, overrides or logs. A sweep trial is described by the worker in
``$SWEEP_TRIAL`` (JSON: experiment, trial index, attempt, phase, parameters); that goes into the
run's config next to the composed Hydra config. Each stage the run enters (``stage1_9``,
``stage2``) is added to the run's tags.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("training")

TRIAL_ENV = "SWEEP_TRIAL"  # set by sweep.worker (sweep/trial_tracking.py)
_NOT_STAGES = ("run", "pipeline")


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
        self._stages: set[str] = set()

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **record}
        if self.path:
            # One line per record, flushed at once, so a tailing worker never reads a partial line
            # beyond the last newline.
            with self.path.open("a") as fh:
                fh.write(json.dumps(record, default=float) + "\n")
        if self._wandb is not None:
            self._log_wandb(record)

    def _log_wandb(self, record: dict[str, Any]) -> None:
        stage = str(record.get("stage", "run"))
        if stage not in self._stages and stage not in _NOT_STAGES:
            self._stages.add(stage)
            self._wandb.tags = (*self._wandb.tags, stage)
        step = record.get("global_step")
        payload = {
            f"{stage}/{k}": v
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("time", "global_step")
        }
        if payload:
            self._wandb.log(payload, step=step)
        if stage == "pipeline" and record.get("final_eval_loss") is not None:
            self._wandb.summary["final_eval_loss"] = record["final_eval_loss"]

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def wandb_mode(cfg_mode: str) -> str:
    """The W&B mode for ``run.wandb.mode``: auto -> $WANDB_MODE, else online iff WANDB_API_KEY is set."""
    if cfg_mode != "auto":
        return cfg_mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def trial_info() -> dict[str, Any]:
    """The sweep trial this process runs, from ``$SWEEP_TRIAL`` ({} outside a sweep)."""
    raw = os.environ.get(TRIAL_ENV)
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except ValueError:
        log.warning("%s is not JSON; the W&B run config will not name the trial", TRIAL_ENV)
        return {}
    return info if isinstance(info, dict) else {}


def _start_wandb(cfg: Any, run_config: dict, out_dir: str | Path | None):
    if not cfg.enabled:
        return None
    try:
        import wandb
    except ImportError:
        log.info("wandb is not installed: W&B logging is off (pip install wandb to enable it)")
        return None
    mode = wandb_mode(cfg.mode)
    trial = trial_info()
    config = dict(run_config)
    if trial:
        # Trial index and parameters first-class in the run config, for W&B's tables and filters.
        config["sweep"] = trial
        config["trial_index"] = trial.get("trial_index")
        config["params"] = trial.get("params", {})
    try:
        run = wandb.init(
            project=cfg.project,
            entity=getattr(cfg, "entity", None),
            group=cfg.group,
            name=cfg.name,
            tags=list(cfg.tags),
            config=config,
            mode=mode,
            dir=str(out_dir) if out_dir else None,
            reinit="finish_previous",
        )
    except Exception as exc:  # noqa: BLE001 -- tracking must never cost a training run
        log.warning(
            "W&B run could not start (%s mode): %s: %s; training continues without W&B",
            mode,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return None
    log.info("W&B run %s (%s mode, project=%s, group=%s)", run.id, mode, cfg.project, cfg.group)
    return run
