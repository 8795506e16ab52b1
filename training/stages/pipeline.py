"""Stage 1 -> Stage 1.9 -> Stage 2, resumable at any optimizer step.

Checkpoints are named ``<stage>-step<N>`` plus ``final``. A Stage 1.9 checkpoint resumes Stage 1.9;
the boundary checkpoint ``stage2-step0`` (written when Stage 1.9 ends) and later Stage 2 ones resume
Stage 2 without the teacher. The Stage 1.9 result travels inside the Stage 2 checkpoints.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from training.bitnet import bitlinear_modules
from training.checkpoint import CheckpointManager
from training.results import PipelineResult, StageResult
from training.runtime import resolve_device, resolve_dtype, seed_everything
from training.stages import stage1_9 as s19
from training.stages import stage2 as s2
from training.stages.common import (
    build_data,
    build_student,
    lambda_schedule,
    load_teacher,
    maybe_compile,
    optimizer_for,
)
from training.stages.trainer import LoopSpec, Trainer, evaluate_lm
from training.tracking import MetricsLogger

log = logging.getLogger("training")


def run_pipeline(cfg: DictConfig) -> PipelineResult:
    t0 = time.perf_counter()
    device = resolve_device(cfg.run.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    seed_everything(cfg.run.seed)
    out_dir = Path(cfg.run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpts = CheckpointManager(cfg.run.checkpoint_dir or str(out_dir / "ckpt"))
    metrics = MetricsLogger(
        cfg.run.metrics_file or out_dir / "metrics.jsonl",
        cfg.run.wandb,
        OmegaConf.to_container(cfg, resolve=True),
        out_dir,
    )
    state = ckpts.load_latest() if cfg.run.resume else None
    resume_stage = state["stage"] if state else None
    if resume_stage:
        log.info(
            "resuming from checkpoint %s (stage %s, step %d)",
            ckpts.latest_name(),
            resume_stage,
            state["step"],
        )
    if resume_stage == "final":
        return PipelineResult.from_dict(state["pipeline_result"])

    teacher, tokenizer = load_teacher(cfg, device, dtype)
    data = build_data(cfg, tokenizer)
    student = build_student(cfg, teacher)
    model = student.model
    fwd = maybe_compile(model, cfg)
    result = PipelineResult(
        status="running",
        conversion=asdict(student.summary) if hasattr(student.summary, "__dataclass_fields__") else {},
    )

    def finish(status: str, reason: str | None = None) -> PipelineResult:
        result.status, result.reason = status, reason
        result.seconds = time.perf_counter() - t0
        result.tokens = sum(s.tokens for s in result.stages.values())
        result.checkpoints = [f"{ckpts.root}/{n}.pt" for n in ckpts.history()]
        metrics.log({"stage": "pipeline", "event": status, "final_eval_loss": result.final_eval_loss})
        metrics.finish()
        return result

    # ---- Stage 1.9 ----------------------------------------------------------------------------
    c19 = cfg.stage1_9
    if c19.enabled and c19.max_steps > 0 and resume_stage in (None, "stage1_9"):
        opt, sched = optimizer_for(c19, model)
        stateful = {"saliency": student.saliency} if student.saliency else {}
        trainer = Trainer(
            _spec("stage1_9", c19, 0),
            model,
            opt,
            sched,
            data.stage1_9,
            s19.make_loss_fn(cfg, fwd, teacher),
            device=device,
            before_step=(lambda step: student.saliency.step(model, step)) if student.saliency else None,
            stateful=stateful,
            metrics=metrics,
            checkpoints=ckpts,
        )
        if resume_stage == "stage1_9":
            trainer.load_state_dict(state)
        loop = trainer.fit()
        stage = StageResult.from_loop("stage1_9", loop)
        result.stages["stage1_9"] = stage
        if loop.status != "completed":
            return finish(loop.status, loop.reason)
        stage.eval_loss, stage.eval_loss_sem = evaluate_lm(fwd, data.eval, device)
        log.info("stage1_9 done: eval loss %.4f +- %.4f", stage.eval_loss, stage.eval_loss_sem)
    elif resume_stage == "stage2":
        result.stages.update({k: StageResult(**v) for k, v in state.get("earlier_stages", {}).items()})
    del teacher  # Stage 2 needs no teacher: free its memory before the student trains alone.

    # ---- Stage 2 ------------------------------------------------------------------------------
    c2 = cfg.stage2
    for m in bitlinear_modules(model):
        if hasattr(m, "protect_k"):
            m.protect_k = 0.0  # Stage 2 trains fully ternary; saliency protection ends with Stage 1.9.
    if c2.enabled and c2.max_steps > 0:
        student.lam.schedule = lambda_schedule(cfg)
        opt, sched = optimizer_for(c2, model)
        earlier = {k: asdict(v) for k, v in result.stages.items()}
        trainer = Trainer(
            _spec("stage2", c2, cfg.run.checkpoint_every),
            model,
            opt,
            sched,
            data.stage2,
            s2.make_loss_fn(fwd),
            device=device,
            before_step=student.lam.set_step,
            stateful={"lambda": student.lam},
            metrics=metrics,
            checkpoints=ckpts,
            checkpoint_extra=lambda: {"earlier_stages": earlier},
            global_step_offset=c19.max_steps if c19.enabled else 0,
        )
        if resume_stage == "stage2":
            trainer.load_state_dict(state)
        else:
            trainer.save("stage2-step0")  # the stage boundary: a requeued trial restarts here, not at 1.9
        loop = trainer.fit()
        result.stages["stage2"] = StageResult.from_loop("stage2", loop)
        if loop.status != "completed":
            return finish(loop.status, loop.reason)

    # ---- Final eval at lambda = 1 (the ternary model that would be exported) ----------------------
    student.lam.schedule = None
    student.lam.set_value(1.0)
    result.final_eval_loss, result.final_eval_loss_sem = evaluate_lm(fwd, data.eval, device)
    last = result.stages.get("stage2") or result.stages.get("stage1_9")
    if last is not None:
        last.eval_loss, last.eval_loss_sem = result.final_eval_loss, result.final_eval_loss_sem
    log.info("final eval loss %.4f +- %.4f", result.final_eval_loss, result.final_eval_loss_sem)
    result.status = "completed"
    result.seconds = time.perf_counter() - t0
    result.tokens = sum(s.tokens for s in result.stages.values())
    ckpts.save(
        "final",
        {"stage": "final", "step": 0, "model": model.state_dict(), "pipeline_result": result.to_dict()},
    )
    if cfg.run.keep_final_only:
        ckpts.prune_to("final")
    return finish("completed")


def _spec(stage: str, c: DictConfig, checkpoint_every: int) -> LoopSpec:
    return LoopSpec(
        stage=stage,
        max_steps=c.max_steps,
        grad_accum=c.grad_accum,
        grad_clip=c.grad_clip,
        log_every=c.log_every,
        eval_every=c.eval_every,
        checkpoint_every=checkpoint_every,
    )
