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
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from training.batch_size import fit_trainer_micro_batch
from training.bitnet import bitlinear_modules
from training.checkpoint import CheckpointManager
from training.compute import all_params, stage_flops, trainable_params
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
    # Seconds earlier attempts spent up to the checkpoint this one resumes from (trial_seconds).
    prior_s = float(state.get("trial_seconds", 0.0)) if state else 0.0

    def elapsed() -> float:
        return prior_s + time.perf_counter() - t0

    # Loaded in the student's master dtype (the copy is exact); setup_compute then stores the frozen
    # teacher in its own dtype (bf16 under bf16-mixed).
    teacher, tokenizer = load_teacher(cfg, device, precision.param_dtype)
    data = build_data(cfg, tokenizer)
    student = build_student(cfg, teacher)
    model = student.model
    # Counted before sharding, for train_flops (training/compute.py).
    params = {"student_trainable": trainable_params(model), "teacher": all_params(teacher)}
    enable_gradient_checkpointing(model, cfg)
    setup_compute(cfg, model, teacher, device, precision)  # run.precision, model.gemm
    note_resume_across_modes(state, model, precision)
    # FSDP2 under torchrun (a no-op in one process); bf16-mixed: float32 shards, bf16 unsharded compute.
    shard_model(model, dctx, dtype=precision.param_dtype, compute_dtype=precision.autocast_dtype)
    fwd = maybe_compile(model, cfg, device)
    runs = stages_to_run(cfg)
    if not _needs_local_teacher(cfg, runs):
        teacher = None  # every distilling stage uses a served teacher: free the local copy now
    start = STAGES.index(resume_stage) if resume_stage in STAGES else 0
    offsets = {s: sum(cfg[r].max_steps for r in runs[: runs.index(s)]) for s in runs}
    result = PipelineResult(
        status="running",
        conversion=asdict(student.summary) if hasattr(student.summary, "__dataclass_fields__") else {},
        params=params,
    )

    def account() -> None:
        """Tokens, train_flops and seconds of the stages so far (also for a diverged/preempted run)."""
        for name, st in result.stages.items():
            n_teacher = params.get("stage3_teacher", params["teacher"]) if name == "stage3" else params["teacher"]
            st.train_flops = stage_flops(name, st.tokens, params["student_trainable"], n_teacher)
        result.tokens = sum(s.tokens for s in result.stages.values())
        result.train_flops = sum(s.train_flops for s in result.stages.values())
        result.seconds = time.perf_counter() - t0
        result.trial_seconds = elapsed()

    def periodic_eval(batches, steady) -> Callable[[], tuple[float, float]]:
        """``stageX.eval_every``: held-out CE at lambda = 1 (the model that would be exported at that
        step), lambda restored afterwards; no RNG is drawn, so a resumed run evaluates identically."""

        def run() -> tuple[float, float]:
            saved = student.lam.value
            student.lam.set_value(1.0)
            try:
                return evaluate_lm(fwd if steady() else model, batches, device)
            finally:
                student.lam.set_value(saved)

        return run

    def with_lambda(loss_fn):
        """The stage's loss with the step's lambda in its metrics (a "lambda" key in each record)."""

        def fn(batch):
            loss, parts = loss_fn(batch)
            return loss, {**parts, "lambda": student.lam.value}

        return fn

    def finish(status: str, reason: str | None = None) -> PipelineResult:
        result.status, result.reason = status, reason
        account()
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
        served19 = s19.connect_teacher(cfg, tokenizer, model)  # None unless stage1_9.teacher.url
        loader19 = served19.wrap(data.stage1_9, "stage1_9") if served19 else data.stage1_9
        # stage1_9.lambda_warmup (off by default: lambda = 1 throughout, as before).
        student.lam.schedule = lambda_schedule(cfg, "stage1_9")
        hooks = []
        if student.lam.schedule is not None:
            stateful["lambda"] = student.lam
            hooks.append(student.lam.set_step)
        if student.saliency:
            hooks.append(lambda step: student.saliency.step(model, step))

        def before19(step: int) -> None:
            for hook in hooks:
                hook(step)

        steady19 = lambda: student.saliency is None  # noqa: E731 - the value at lambda = 1 for eval
        trainer = Trainer(
            _spec("stage1_9", c19, 0),
            model,
            opt,
            sched,
            loader19,
            with_lambda(
                s19.make_loss_fn(
                    cfg,
                    steady_forward(fwd, model, lambda: student.saliency is None and student.lam.value == 1.0),
                    served19 or teacher,
                )
            ),
            device=device,
            eval_fn=periodic_eval(data.eval, steady19) if c19.eval_every else None,
            before_step=before19 if hooks else None,
            stateful=stateful,
            metrics=metrics,
            checkpoints=ckpts,
            checkpoint_extra=lambda: {"trial_seconds": elapsed()},
        )
        _auto_batch(trainer, c19, cfg, dctx.enabled)
        if resume_stage == "stage1_9":
            trainer.load_state_dict(state)
        try:
            loop = trainer.fit()
        finally:
            if served19 is not None:
                served19.close()
        stage = StageResult.from_loop("stage1_9", loop)
        result.stages["stage1_9"] = stage
        if loop.status != "completed":
            return finish(loop.status, loop.reason)
        # Stage 1.9's final lambda: where its warmup ends (1: config.py requires warmup_steps <=
        # max_steps), else the constant 1. Stage 2's lambda_start=continue starts from it.
        end = student.lam.schedule.value(c19.max_steps) if student.lam.schedule is not None else student.lam.value
        student.lam.schedule = None
        student.lam.set_value(end)
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
        # stage2.lambda_start: restart the warmup at 0, or continue from the lambda Stage 1.9 ended at
        # (the controller's value now: 1 after Stage 1.9 or Stage 1). A resumed run reads it back.
        if resume_stage == "stage2":
            lam_start = float(state.get("stage2_lambda_start", 0.0))
        else:
            lam_start = 0.0 if c2.lambda_start == "restart" else student.lam.value
        student.lam.schedule = lambda_schedule(cfg, "stage2", lam_start)
        opt, sched = optimizer_for(c2, model)
        earlier = {k: asdict(v) for k, v in result.stages.items()}
        trainer = Trainer(
            _spec("stage2", c2, cfg.run.checkpoint_every),
            model,
            opt,
            sched,
            data.stage2,
            with_lambda(s2.make_loss_fn(steady_forward(fwd, model, lambda: student.lam.value == 1.0))),
            device=device,
            eval_fn=periodic_eval(data.eval, lambda: True) if c2.eval_every else None,
            before_step=student.lam.set_step,
            stateful={"lambda": student.lam},
            metrics=metrics,
            checkpoints=ckpts,
            checkpoint_extra=lambda: {
                "earlier_stages": earlier,
                "stage2_lambda_start": lam_start,
                "trial_seconds": elapsed(),
            },
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
        served3 = s3.connect_teacher(cfg, tokenizer, model)  # None unless stage3.teacher.url
        if served3 is None and (teacher is None or c3.teacher.pretrained):
            teacher = s3.load_stage3_teacher(cfg, device, precision.teacher_dtype, model)
            prepare_teacher(teacher, device, precision)  # bf16-mixed: the same autocast as the student
        params["stage3_teacher"] = all_params(teacher) if served3 is None else 0  # served: the server's FLOPs
        loss3 = s3.make_loss_fn(cfg, model, teacher, fwd, served=served3)
        opt, sched = optimizer_for(c3, model)
        earlier3 = {k: asdict(v) for k, v in result.stages.items()}
        trainer = Trainer(
            _spec("stage3", c3, cfg.run.checkpoint_every),
            model,
            opt,
            sched,
            served3.wrap(data3.loader, "stage3") if served3 else data3.loader,
            loss3.fn,
            device=device,
            eval_fn=periodic_eval(data3.eval, lambda: True) if c3.eval_every else None,
            metrics=metrics,
            checkpoints=ckpts,
            checkpoint_extra=lambda: {"earlier_stages": earlier3, "trial_seconds": elapsed()},
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
        stage.metrics = extra  # in the result: the sweep can optimise stage3_accuracy (results.py)
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
    account()
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


def _needs_local_teacher(cfg: DictConfig, runs: list[str]) -> bool:
    """Whether a stage in ``runs`` distils from the in-memory FP teacher (not a served one)."""
    if "stage1_9" in runs and not cfg.stage1_9.teacher.url:
        return True
    return "stage3" in runs and not cfg.stage3.teacher.url and not cfg.stage3.teacher.pretrained


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
