"""Stage 1 -> Stage 1.9 -> Stage 2 -> Stage 3, resumable at any optimizer step.

Which stages run: ``stage=pipeline`` (the default) runs Stage 1 and then every enabled stage in
order (Stage 3 is off unless a stage3 preset or ``stage3.enabled=true`` turns it on);
``stage=stage1_9|stage2|stage3`` runs Stage 1 (conversion) and then that stage alone, whatever its
enabled flag. ``stage=stage3`` thus distils a freshly converted student unless
``stage3.init_checkpoint`` points at a trained one (e.g. an earlier pipeline's ``final.pt``).

Checkpoints are named ``<stage>-step<N>`` plus ``final``. A Stage 1.9 checkpoint resumes Stage 1.9;
the boundary checkpoints ``stage2-step0`` / ``stage3-step0`` (written when a stage starts) and later
ones resume that stage without redoing the earlier ones. Earlier stages' results travel inside the
later stages' checkpoints. Stage 3 reloads the FP teacher (freed during Stage 2).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from training.batch_size import fit_trainer_micro_batch
from training.bitnet import bitlinear_modules
from training.checkpoint import CheckpointManager
from training.distributed import model_state_dict, setup_distributed, shard_model
from training.precision import note_resume_across_modes, resolve_precision
from training.results import PipelineResult, StageResult
from training.runtime import resolve_device, seed_everything
from training.stages import stage1_9 as s19
from training.stages import stage2 as s2
from training.stages import stage3 as s3
from training.stages.common import (
    build_data,
    build_student,
    enable_gradient_checkpointing,
    lambda_schedule,
    load_teacher,
    maybe_compile,
    optimizer_for,
    steady_forward,
)
from training.stages.compute_setup import (
    auto_batch_enabled,
    memory_target_bytes,
    prepare_teacher,
    setup_compute,
)
from training.stages.trainer import LoopSpec, Trainer, evaluate_lm
from training.tracking import MetricsLogger

log = logging.getLogger("training")

STAGES = ("stage1_9", "stage2", "stage3")


def stages_to_run(cfg: DictConfig) -> list[str]:
    """The trained stages ``cfg.stage`` selects, in order (see the module doc)."""
    chosen = [s for s in STAGES if cfg[s].enabled] if cfg.stage == "pipeline" else [cfg.stage]
    return [s for s in chosen if cfg[s].max_steps > 0]


def run_pipeline(cfg: DictConfig) -> PipelineResult:
    t0 = time.perf_counter()
    # Under torchrun: join the process group, one GPU per rank (training/distributed.py).
    dctx = setup_distributed(cfg.run.distributed, resolve_device(cfg.run.device))
    device = dctx.place(resolve_device(cfg.run.device))
    precision = resolve_precision(cfg.run.precision, device)
    seed_everything(cfg.run.seed)
    out_dir = Path(cfg.run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpts = dctx.checkpoints(CheckpointManager(cfg.run.checkpoint_dir or str(out_dir / "ckpt")))
    metrics = MetricsLogger(None)  # ranks other than 0 write no metrics file and no W&B run
    if dctx.is_main:
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

    # Loaded in the student's master dtype (the copy is exact); setup_compute then stores the frozen
    # teacher in its own dtype (bf16 under bf16-mixed).
    teacher, tokenizer = load_teacher(cfg, device, precision.param_dtype)
    data = build_data(cfg, tokenizer)
    student = build_student(cfg, teacher)
    model = student.model
    enable_gradient_checkpointing(model, cfg)
    setup_compute(cfg, model, teacher, device, precision)  # run.precision, model.gemm
    note_resume_across_modes(state, model, precision)
    # FSDP2 under torchrun (a no-op in one process); bf16-mixed: float32 shards, bf16 unsharded compute.
    shard_model(model, dctx, dtype=precision.param_dtype, compute_dtype=precision.autocast_dtype)
    fwd = maybe_compile(model, cfg, device)
    runs = stages_to_run(cfg)
    start = STAGES.index(resume_stage) if resume_stage in STAGES else 0
    offsets = {s: sum(cfg[r].max_steps for r in runs[: runs.index(s)]) for s in runs}
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
    if resume_stage in ("stage2", "stage3"):
        result.stages.update({k: StageResult(**v) for k, v in state.get("earlier_stages", {}).items()})
    if "stage1_9" in runs and start <= 0:
        opt, sched = optimizer_for(c19, model)
        stateful = {"saliency": student.saliency} if student.saliency else {}
        trainer = Trainer(
            _spec("stage1_9", c19, 0),
            model,
            opt,
            sched,
            data.stage1_9,
            s19.make_loss_fn(cfg, steady_forward(fwd, model, lambda: student.saliency is None), teacher),
            device=device,
            before_step=(lambda step: student.saliency.step(model, step)) if student.saliency else None,
            stateful=stateful,
            metrics=metrics,
            checkpoints=ckpts,
        )
        _auto_batch(trainer, c19, cfg, dctx.enabled)
        if resume_stage == "stage1_9":
            trainer.load_state_dict(state)
        loop = trainer.fit()
        stage = StageResult.from_loop("stage1_9", loop)
        result.stages["stage1_9"] = stage
        if loop.status != "completed":
            return finish(loop.status, loop.reason)
        stage.eval_loss, stage.eval_loss_sem = evaluate_lm(fwd, data.eval, device)
        log.info("stage1_9 done: eval loss %.4f +- %.4f", stage.eval_loss, stage.eval_loss_sem)
    if "stage2" in runs:
        teacher = None  # Stage 2 needs no teacher: free its memory before the student trains alone.

    # ---- Stage 2 ------------------------------------------------------------------------------
    c2 = cfg.stage2
    for m in bitlinear_modules(model):
        if hasattr(m, "protect_k"):
            m.protect_k = 0.0  # Stage 2 trains fully ternary; saliency protection ends with Stage 1.9.
    if "stage2" in runs and start <= 1:
        student.lam.schedule = lambda_schedule(cfg)
        opt, sched = optimizer_for(c2, model)
        earlier = {k: asdict(v) for k, v in result.stages.items()}
        trainer = Trainer(
            _spec("stage2", c2, cfg.run.checkpoint_every),
            model,
            opt,
            sched,
            data.stage2,
            s2.make_loss_fn(steady_forward(fwd, model, lambda: student.lam.value == 1.0)),
            device=device,
            before_step=student.lam.set_step,
            stateful={"lambda": student.lam},
            metrics=metrics,
            checkpoints=ckpts,
            checkpoint_extra=lambda: {"earlier_stages": earlier},
            global_step_offset=offsets["stage2"],
        )
        _auto_batch(trainer, c2, cfg, dctx.enabled)
        if resume_stage == "stage2":
            trainer.load_state_dict(state)
        else:
            trainer.save("stage2-step0")  # the stage boundary: a requeued trial restarts here, not at 1.9
        loop = trainer.fit()
        result.stages["stage2"] = StageResult.from_loop("stage2", loop)
        if loop.status != "completed":
            return finish(loop.status, loop.reason)
        if "stage3" in runs:
            # Stage 3 changes the model; Stage 2's own eval is the ternary model as Stage 2 left it.
            student.lam.schedule = None
            student.lam.set_value(1.0)
            s2r = result.stages["stage2"]
            s2r.eval_loss, s2r.eval_loss_sem = evaluate_lm(fwd, data.eval, device)

    # ---- Stage 3 ------------------------------------------------------------------------------
    c3 = cfg.stage3
    if "stage3" in runs:
        student.lam.schedule = None
        student.lam.set_value(1.0)  # Stage 3 distils the fully ternary student.
        data3 = s3.build_task_data(cfg, tokenizer, data.stage3, data.eval)
        if c3.init_checkpoint and resume_stage != "stage3":
            s3.load_init_checkpoint(model, c3.init_checkpoint)
        if teacher is None or c3.teacher:
            teacher = s3.load_stage3_teacher(cfg, device, precision.teacher_dtype, model)
            prepare_teacher(teacher, device, precision)  # bf16-mixed: the same autocast as the student
        loss3 = s3.make_loss_fn(cfg, model, teacher, fwd)
        opt, sched = optimizer_for(c3, model)
        earlier3 = {k: asdict(v) for k, v in result.stages.items()}
        trainer = Trainer(
            _spec("stage3", c3, cfg.run.checkpoint_every),
            model,
            opt,
            sched,
            data3.loader,
            loss3.fn,
            device=device,
            metrics=metrics,
            checkpoints=ckpts,
            checkpoint_extra=lambda: {"earlier_stages": earlier3},
            global_step_offset=offsets["stage3"],
        )
        _auto_batch(trainer, c3, cfg, dctx.enabled)
        if resume_stage == "stage3":
            trainer.load_state_dict(state)
        else:
            trainer.save("stage3-step0")
        try:
            loop = trainer.fit()
        finally:
            loss3.close()
        stage = StageResult.from_loop("stage3", loop)
        result.stages["stage3"] = stage
        if loop.status != "completed":
            return finish(loop.status, loop.reason)
        stage.eval_loss, stage.eval_loss_sem = evaluate_lm(fwd, data3.eval, device)
        extra = s3.task_metrics(cfg, data3, tokenizer, model, device)  # eager: no recompile for a one-off
        metrics.log({"stage": "stage3", "event": "eval", "eval_loss": stage.eval_loss, **extra})
        log.info(
            "stage3 done: %s eval loss %.4f +- %.4f %s",
            c3.data.task,
            stage.eval_loss,
            stage.eval_loss_sem,
            " ".join(f"{k} {v:.3f}" for k, v in extra.items()),
        )
        teacher = None

    # ---- Final eval at lambda = 1 (the ternary model that would be exported) ----------------------
    student.lam.schedule = None
    student.lam.set_value(1.0)
    result.final_eval_loss, result.final_eval_loss_sem = evaluate_lm(fwd, data.eval, device)
    last = None if "stage3" in runs else result.stages.get("stage2") or result.stages.get("stage1_9")
    if last is not None:
        last.eval_loss, last.eval_loss_sem = result.final_eval_loss, result.final_eval_loss_sem
    log.info("final eval loss %.4f +- %.4f", result.final_eval_loss, result.final_eval_loss_sem)
    result.status = "completed"
    result.seconds = time.perf_counter() - t0
    result.tokens = sum(s.tokens for s in result.stages.values())
    ckpts.save(
        "final",
        {"stage": "final", "step": 0, "model": model_state_dict(model), "pipeline_result": result.to_dict()},
    )
    if cfg.run.keep_final_only:
        ckpts.prune_to("final")
    return finish("completed")


def _auto_batch(trainer: Trainer, c: DictConfig, cfg: DictConfig, distributed: bool) -> None:
    """``stageX.auto_batch_size`` (auto: on for one CUDA process): the largest micro-batch within the
    memory target, grad accumulation keeping ``batch_size * grad_accum``."""
    if auto_batch_enabled(c.auto_batch_size, trainer.device, distributed):
        fit_trainer_micro_batch(
            trainer,
            c.batch_size * c.grad_accum,
            start=c.batch_size,
            memory_cap_bytes=memory_target_bytes(c, cfg.run, trainer.device),
        )


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
