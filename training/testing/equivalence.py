"""Compare two training setups: logits, gradients and N-step loss curves.

Generic over how the two sides were built (eager vs ``torch.compile``, one process vs FSDP, bf16 vs
fp8): parameters are matched by name after removing wrapper prefixes (``_orig_mod.`` from
``torch.compile``, a leading ``module.`` from DDP) and sharded tensors (DTensor) are gathered with
``full_tensor()`` before comparing. All arithmetic is float64 on CPU copies, so the tools add no
rounding of their own to what is being measured.

Differences from the research notebook's ``wrinklefree.testing.equivalence``: its
``compare_gradients`` is ``compare_gradient_cosine`` here and also reports the global cosine (all
gradients as one vector) and the relative norm difference, because one per-parameter minimum can
hide a uniform scale error (a missing 1/grad_accum) that cosine alone cannot see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]
LossOut = torch.Tensor | tuple[torch.Tensor, Any]


# ---- reports -----------------------------------------------------------------------------------
@dataclass
class LogitsReport:
    """Per-token cosine of two models' logit vectors over the valid (unpadded) tokens."""

    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    tokens: int

    def ok(self, min_cosine: float = 0.9999) -> bool:
        return self.min_cosine >= min_cosine


@dataclass
class GradientReport:
    """Cosine of the gradients of the same loss in two models, per parameter and over all of them."""

    per_param: dict[str, float]
    min_cosine: float
    min_param: str
    global_cosine: float
    # | |g_a| - |g_b| | / |g_a| over all gradients: catches a uniform scale error cosine cannot see.
    rel_norm_diff: float
    loss_a: float
    loss_b: float

    def ok(self, min_cosine: float = 0.999, max_rel_norm_diff: float = 1e-3) -> bool:
        return self.min_cosine >= min_cosine and self.rel_norm_diff <= max_rel_norm_diff


@dataclass
class StepsReport:
    """Per-step losses of two setups and their relative differences |a - b| / max(|a|, tiny)."""

    losses_a: list[float]
    losses_b: list[float]
    rel_diffs: list[float] = field(default_factory=list)
    max_rel_diff: float = 0.0

    def ok(self, rtol: float = 1e-3) -> bool:
        return self.max_rel_diff <= rtol

    def first_step_over(self, rtol: float) -> int | None:
        """The first step (1-based) whose relative difference exceeds ``rtol``, or None."""
        return next((i + 1 for i, d in enumerate(self.rel_diffs) if d > rtol), None)


# ---- logits ------------------------------------------------------------------------------------
@torch.no_grad()
def compare_logits_cosine(
    model_a: nn.Module, model_b: nn.Module, batch: Batch, *, train_mode: bool = False
) -> LogitsReport:
    """Forward ``batch`` (``input_ids`` and, if present, ``attention_mask``) through both models.

    Runs in eval mode unless ``train_mode`` (each model's mode is restored afterwards). Eval mode keeps
    train-only side effects (MuonClip's logit recorder, dropout) out of the comparison.
    """
    mask = batch.get("attention_mask")
    inputs = {"input_ids": batch["input_ids"]}
    if mask is not None:
        inputs["attention_mask"] = mask
    la = _run_in_mode(model_a, train_mode, lambda: _logits(model_a(**inputs)))
    lb = _run_in_mode(model_b, train_mode, lambda: _logits(model_b(**inputs)))
    if la.shape != lb.shape:
        raise ValueError(f"logits shapes differ: {tuple(la.shape)} vs {tuple(lb.shape)}")
    la, lb = la.detach().to("cpu", torch.float64), lb.detach().to("cpu", torch.float64)
    if mask is not None:
        valid = mask.to("cpu").bool()
        la, lb = la[valid], lb[valid]
    else:
        la, lb = la.reshape(-1, la.shape[-1]), lb.reshape(-1, lb.shape[-1])
    cos = torch.nn.functional.cosine_similarity(la, lb, dim=-1, eps=1e-30)
    return LogitsReport(
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        max_abs_diff=float((la - lb).abs().max()),
        tokens=int(cos.numel()),
    )


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _run_in_mode(model: nn.Module, train: bool, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    was = model.training
    model.train(train)
    try:
        return fn()
    finally:
        model.train(was)


# ---- gradients ---------------------------------------------------------------------------------
def compare_gradient_cosine(
    model_a: nn.Module,
    model_b: nn.Module,
    batch: Batch,
    loss_fn: Callable[[nn.Module, Batch], LossOut],
) -> GradientReport:
    """Backward ``loss_fn(model, batch)`` in each model and compare the gradients parameter by parameter.

    ``loss_fn`` may return a loss tensor or a ``(loss, metrics)`` tuple (the stage loss functions'
    shape). Existing ``.grad``s are cleared before and after, so the models are left without
    gradients. A parameter whose gradient is zero in both models counts as cosine 1; one that has a
    gradient in one model only is an error (the two setups do not train the same parameters).
    """
    ga, loss_a = _grads(model_a, batch, loss_fn)
    gb, loss_b = _grads(model_b, batch, loss_fn)
    if set(ga) != set(gb):
        only_a, only_b = sorted(set(ga) - set(gb)), sorted(set(gb) - set(ga))
        raise ValueError(f"parameters with gradients differ: only in a {only_a[:5]}, only in b {only_b[:5]}")
    if not ga:
        raise ValueError("no parameter received a gradient; check loss_fn and requires_grad")
    per_param: dict[str, float] = {}
    dot = na2 = nb2 = 0.0
    for name in sorted(ga):
        a, b = ga[name], gb[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: gradient shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        d, a2, b2 = float((a * b).sum()), float((a * a).sum()), float((b * b).sum())
        dot, na2, nb2 = dot + d, na2 + a2, nb2 + b2
        per_param[name] = _cos(d, a2, b2)
    min_param = min(per_param, key=per_param.__getitem__)
    na, nb = math.sqrt(na2), math.sqrt(nb2)
    return GradientReport(
        per_param=per_param,
        min_cosine=per_param[min_param],
        min_param=min_param,
        global_cosine=_cos(dot, na2, nb2),
        rel_norm_diff=abs(na - nb) / na if na > 0 else (0.0 if nb == 0 else math.inf),
        loss_a=loss_a,
        loss_b=loss_b,
    )


def _cos(dot: float, a2: float, b2: float) -> float:
    if a2 == 0.0 and b2 == 0.0:
        return 1.0
    if a2 == 0.0 or b2 == 0.0:
        return 0.0
    return dot / math.sqrt(a2 * b2)


def _grads(model: nn.Module, batch: Batch, loss_fn) -> tuple[dict[str, torch.Tensor], float]:
    model.zero_grad(set_to_none=True)
    out = loss_fn(model, batch)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    grads = {
        canonical_name(n): _full(p.grad).detach().to("cpu", torch.float64).clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return grads, float(loss.detach().float())


def canonical_name(name: str) -> str:
    """A parameter name without wrapper prefixes (``_orig_mod.`` anywhere, a leading ``module.``)."""
    name = name.replace("_orig_mod.", "")
    return name[len("module.") :] if name.startswith("module.") else name


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---- N steps -----------------------------------------------------------------------------------
class TrainingSetup:
    """One training step per call: next batch, ``loss_fn``, backward, clip, optimizer and scheduler step.

    ``loss_fn(batch)`` returns a loss or ``(loss, metrics)`` (the stage loss functions' shape);
    ``batches`` is cycled. To compare the project's real loop instead, use ``from_trainer``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Batch], LossOut],
        batches: Iterable[Batch],
        *,
        scheduler: Any = None,
        grad_clip: float = 0.0,
    ) -> None:
        self.model, self.optimizer, self.loss_fn, self.scheduler = model, optimizer, loss_fn, scheduler
        self.grad_clip = grad_clip
        self._batches: Sequence[Batch] = list(batches)
        if not self._batches:
            raise ValueError("TrainingSetup needs at least one batch")
        self._i = 0

    def __call__(self) -> float:
        batch = self._batches[self._i % len(self._batches)]
        self._i += 1
        self.model.train()
        out = self.loss_fn(batch)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach().float())

    @staticmethod
    def from_trainer(trainer: Any) -> Callable[[], float]:
        """A step function that runs ``trainer`` (a ``training.stages.trainer.Trainer``) one more step.

        Goes through ``Trainer.fit`` (accumulation, clipping, scheduler, divergence check), so what is
        compared is exactly the loop ``run_pipeline`` runs.
        """

        def step() -> float:
            trainer.spec.max_steps = trainer.step + 1
            result = trainer.fit()
            if result.status != "completed":
                raise RuntimeError(f"{trainer.spec.stage}: {result.status}: {result.reason}")
            return float(result.curve[-1][1])

        return step


def run_n_steps_and_compare(
    make_setup_a: Callable[[], Callable[[], float]],
    make_setup_b: Callable[[], Callable[[], float]],
    n: int,
) -> StepsReport:
    """Build setup A and run it ``n`` steps, then the same for B; compare the per-step losses.

    A setup is a zero-argument callable that runs one optimizer step and returns its loss (e.g. a
    ``TrainingSetup``). The two run one after the other, not interleaved, so each factory must seed
    whatever it needs: both sides see the same RNG stream only if their factories make it so.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    losses_a = _run(make_setup_a(), n)
    losses_b = _run(make_setup_b(), n)
    return compare_losses(losses_a, losses_b)


def _run(step: Callable[[], float], n: int) -> list[float]:
    return [float(step()) for _ in range(n)]


def compare_losses(losses_a: Sequence[float], losses_b: Sequence[float]) -> StepsReport:
    """Per-step relative difference of two loss curves of equal length (e.g. single vs multi-process)."""
    a, b = [float(x) for x in losses_a], [float(x) for x in losses_b]
    if len(a) != len(b) or not a:
        raise ValueError(f"loss curves must be non-empty and of equal length, got {len(a)} and {len(b)}")
    rel = [_rel(x, y) for x, y in zip(a, b)]
    return StepsReport(losses_a=a, losses_b=b, rel_diffs=rel, max_rel_diff=max(rel))


def _rel(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)):
        return 0.0 if a == b else math.inf
    return abs(a - b) / max(abs(a), 1e-12)
