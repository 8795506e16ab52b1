"""One training loop for every stage.

A stage supplies a ``loss_fn(batch) -> (loss, metrics)`` and, optionally, a ``before_step(step)``
hook (lambda warmup, saliency curriculum); the Trainer owns everything else: gradient
accumulation, clipping, the optimizer/scheduler step, NaN/inf detection ("diverged at step N" is
a result, not a crash), periodic eval, progress lines with tokens/s, metrics records, checkpoints
and exact resume (model, optimizer, scheduler, RNG, data position and the stage's own state).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from training.checkpoint import CheckpointManager
from training.distributed import (
    DistContext,
    clip_grad_norm_,
    current,
    load_model_state_dict,
    load_optimizer_state_dict,
    model_state_dict,
    optimizer_state_dict,
)
from training.runtime import STOP, rng_state, set_rng_state
from training.tracking import MetricsLogger

log = logging.getLogger("training")

LossFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class LoopSpec:
    stage: str
    max_steps: int
    grad_accum: int = 1
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0


@dataclass
class LoopResult:
    status: str  # completed | diverged | preempted
    steps: int
    curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    diverged_at: int | None = None
    reason: str | None = None


class Trainer:
    def __init__(
        self,
        spec: LoopSpec,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loader: Any,
        loss_fn: LossFn,
        *,
        device: torch.device,
        eval_fn: Callable[[], tuple[float, float]] | None = None,
        before_step: Callable[[int], None] | None = None,
        stateful: dict[str, Any] | None = None,
        metrics: MetricsLogger | None = None,
        checkpoints: CheckpointManager | None = None,
        checkpoint_extra: Callable[[], dict] | None = None,
        global_step_offset: int = 0,
        dist: DistContext | None = None,
    ) -> None:
        self.spec, self.model, self.optimizer, self.scheduler = spec, model, optimizer, scheduler
        self.loader, self.loss_fn, self.device = loader, loss_fn, device
        self.eval_fn, self.before_step = eval_fn, before_step
        self.stateful = stateful or {}
        self.metrics = metrics or MetricsLogger(None)
        self.checkpoints = checkpoints
        self.checkpoint_extra = checkpoint_extra or (lambda: {})
        self.offset = global_step_offset
        # Several processes (FSDP): batch slicing, loss averaging and the stop vote; else identities.
        self.dist = dist or current()
        self.step = 0
        self.result = LoopResult(status="running", steps=0)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.spec.stage,
            "step": self.step,
            # Gathered from the shards under FSDP (a collective: every rank saves, rank 0 writes).
            "model": model_state_dict(self.model),
            "optimizer": optimizer_state_dict(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "loader": self.loader.state_dict(),
            "stateful": {k: v.state_dict() for k, v in self.stateful.items()},
            "result": self.result.__dict__.copy(),
            **self.checkpoint_extra(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["stage"] != self.spec.stage:
            raise ValueError(f"checkpoint is for stage {state['stage']!r}, not {self.spec.stage!r}")
        load_model_state_dict(self.model, state["model"])
        load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        for k, v in self.stateful.items():
            v.load_state_dict(state["stateful"][k])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.result = LoopResult(**state["result"])
        log.info("%s: resumed at step %d", self.spec.stage, self.step)

    def save(self, name: str) -> str | None:
        if self.checkpoints is None:
            return None
        return self.checkpoints.save(name, self.state_dict())

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> LoopResult:
        spec, res = self.spec, self.result
        res.status = "running"
        t_start, tok_window, t_window = time.perf_counter() - res.seconds, 0, time.perf_counter()
        while self.step < spec.max_steps:
            if self.before_step is not None:
                self.before_step(self.step)
            self.model.train()
            step_loss, parts = 0.0, {}
            for _ in range(spec.grad_accum):
                local = self.dist.local_batch(self.loader.next_batch())  # this rank's rows of the batch
                batch = {k: v.to(self.device, non_blocking=True) for k, v in local.items()}
                loss, metrics = self.loss_fn(batch)
                (loss / spec.grad_accum).backward()
                step_loss += loss.detach().float().item() / spec.grad_accum
                for k, v in metrics.items():
                    parts[k] = parts.get(k, 0.0) + float(v) / spec.grad_accum
                tokens = int(batch["input_ids"].numel()) * self.dist.world_size
                res.tokens += tokens
                tok_window += tokens
            step_loss, parts = self.dist.mean_step(step_loss, parts)
            grad_norm = clip_grad_norm_(
                self.model.parameters(), spec.grad_clip if spec.grad_clip > 0 else float("inf")
            )
            if not math.isfinite(step_loss) or not torch.isfinite(grad_norm):
                return self._diverged(step_loss, float(grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            res.steps = self.step
            res.curve.append((self.step, step_loss))
            res.seconds = time.perf_counter() - t_start
            record = {
                "stage": spec.stage,
                "step": self.step,
                "max_steps": spec.max_steps,  # for progress bars (sweep run / sweep status)
                "global_step": self.offset + self.step,
                "loss": step_loss,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens": res.tokens,
                **parts,
            }
            if self.step % spec.log_every == 0 or self.step == spec.max_steps:
                now = time.perf_counter()
                record["tokens_per_s"] = tok_window / max(now - t_window, 1e-9)
                tok_window, t_window = 0, now
                log.info(
                    "%s step %d/%d loss %.4f lr %.2e %.0f tok/s",
                    spec.stage,
                    self.step,
                    spec.max_steps,
                    step_loss,
                    record["lr"],
                    record["tokens_per_s"],
                )
            if self.eval_fn is not None and spec.eval_every and self.step % spec.eval_every == 0:
                # stageX.eval_every: the step's record carries the held-out loss (the worker tails the
                # metrics file into progress.jsonl); its time is left out of the next tokens/s window.
                t_eval = time.perf_counter()
                eval_loss, eval_sem = self.eval_fn()
                eval_s = time.perf_counter() - t_eval
                t_window += eval_s
                res.eval_curve.append((self.step, eval_loss))
                record.update(eval_loss=eval_loss, eval_batch_sem=eval_sem, eval_seconds=eval_s)
            self.metrics.log(record)
            if (
                spec.checkpoint_every
                and self.step % spec.checkpoint_every == 0
                and self.step < spec.max_steps
            ):
                self.save(f"{spec.stage}-step{self.step}")
            if self.dist.any(STOP.requested):
                res.status = "preempted"
                res.reason = f"{STOP.signal_name} at {spec.stage} step {self.step}"
                self.save(f"{spec.stage}-step{self.step}")
                return res
        res.status = "completed"
        return res

    def _diverged(self, loss: float, grad_norm: float) -> LoopResult:
        res = self.result
        res.status = "diverged"
        res.diverged_at = self.step + 1
        res.reason = (
            f"diverged at {self.spec.stage} step {self.step + 1} (loss={loss}, grad_norm={grad_norm})"
        )
        log.warning(res.reason)
        self.metrics.log({"stage": self.spec.stage, "step": self.step + 1, "event": "diverged", "loss": loss})
        return res


@torch.no_grad()
def evaluate_lm(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> tuple[float, float]:
    """Mean held-out cross-entropy over fixed eval batches and its standard error across batches."""
    was_training = model.training
    model.eval()
    losses = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]
        )
        losses.append(out.loss.float().item())
    model.train(was_training)
    if not losses:
        raise ValueError("evaluation needs at least one eval batch (data.eval_blocks must be >= 1)")
    mean = sum(losses) / len(losses)
    if len(losses) < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in losses) / (len(losses) - 1)
    return mean, math.sqrt(var / len(losses))
