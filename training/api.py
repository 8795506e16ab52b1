"""The training API the sweep (and users) call.

from training.api import compose_config, run_pipeline
result = run_pipeline(compose_config(["model=tiny", "stage2.optimizer.lr=2e-3"]))
print(result.final_eval_loss, result.final_eval_loss_sem)
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from training.config import ConfigError, compose_config
from training.results import PipelineResult, StageResult
from training.stages.pipeline import run_pipeline

__all__ = [
    "ConfigError",
    "PipelineResult",
    "StageResult",
    "compose_config",
    "run_pipeline",
    "run_stage1_9",
    "run_stage2",
    "run_stage3",
]


def run_stage1_9(cfg: DictConfig) -> StageResult:
    """Stage 1 + Stage 1.9 only; the result's eval_loss is the student's held-out CE at lambda = 1."""
    result = run_pipeline(_only(cfg, "stage1_9"))
    return _stage(result, "stage1_9")


def run_stage2(cfg: DictConfig) -> StageResult:
    """Stage 1 + Stage 2 only (the notebook's "no Stage 1.9" ablation)."""
    result = run_pipeline(_only(cfg, "stage2"))
    return _stage(result, "stage2")


def run_stage3(cfg: DictConfig) -> StageResult:
    """Stage 1 + Stage 3 only (from ``stage3.init_checkpoint`` if set); eval_loss is on Stage 3's
    eval data (the task's held-out answers, or the LM eval blocks for ``stage3.data.task=lm``)."""
    result = run_pipeline(_only(cfg, "stage3"))
    return _stage(result, "stage3")


def _only(cfg: DictConfig, stage: str) -> DictConfig:
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    cfg.stage = stage  # the selector: Stage 1 then this stage alone (training/stages/pipeline.py)
    return cfg


def _stage(result: PipelineResult, stage: str) -> StageResult:
    if stage in result.stages:
        return result.stages[stage]
    return StageResult(stage=stage, status=result.status, steps=0, reason=result.reason)
