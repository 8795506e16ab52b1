"""Automatic micro-batch size: the largest micro-batch that fits in memory, same effective batch.

``stageX.auto_batch_size`` (``auto``, the default: on for one CUDA process, with a memory target;
training/stages/compute_setup.py) keeps the configured effective batch ``batch_size * grad_accum``
(the hyperparameter the sweep tunes) and searches the micro-batch among the *divisors* of it, so
``grad_accum = effective / micro`` is exact and every micro-batch has the same shape: doubling from
the configured ``batch_size`` until a size fails or the effective batch is reached, then a binary
search between the last size that fit and the first that failed. A size "fits" if one real training
step runs: the stage's own loss (teacher forward included), backward and an optimizer step, so
gradients and the optimizer state allocated at the first step are counted. A CUDA
``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` is the same class) or a RuntimeError
saying "out of memory" / "can't allocate memory" means it does not; any other error propagates.

Each probe step is undone: weights and buffers are restored from a CPU snapshot, the optimizer
state from its (normally empty) pre-search copy, gradients are dropped and the RNG is restored, so a
run with the search follows the same trajectory as one configured with the plan it finds. The data
loader is not advanced: probes use the rows of one peeked batch, tiled to the probe size.

Differences from Lightning's ``BatchSizeFinder`` (the notebook's tool):
  - the micro-batch never exceeds the configured effective batch and always divides it (Lightning
    grows the batch itself and leaves accumulation alone, which changes the optimisation);
  - MuonClip's hooks are re-attached and its pending maxima dropped after the search (the
    notebook's ``KeyError: 0`` came from hooks left unregistered by the finder's eval/train cycle;
    ``training.optim.qk_hooks`` never unregisters on eval(), and the recorder is cleared so a failed
    probe's logits cannot leak into the first real QK-clip);
  - on CPU, out-of-memory rarely surfaces as an exception (the OS swaps or kills the process), so
    ``memory_cap_bytes`` (a peak-allocation budget, CUDA only) and ``simulate_oom_above`` (raise a
    real ``torch.OutOfMemoryError`` mid-step above a size, any device) make the search testable and
    let a run keep headroom.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from training.runtime import rng_state, set_rng_state

log = logging.getLogger("training")

Batch = dict[str, torch.Tensor]
_OOM_TEXT = ("out of memory", "can't allocate memory")


class BatchSizeError(RuntimeError):
    """Even a micro-batch of 1 does not fit; the message names the stage key and the fix."""


@dataclass
class MicroBatchPlan:
    micro_batch: int
    grad_accum: int
    effective_batch: int
    trials: list[tuple[int, bool]] = field(default_factory=list)  # (size, fitted) in search order


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors (CUDA's exception class, or the allocators' RuntimeError text)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in _OOM_TEXT)


def divisors(n: int) -> list[int]:
    if n < 1:
        raise ValueError(f"effective batch must be >= 1, got {n}")
    return [d for d in range(1, n + 1) if n % d == 0]


def search_micro_batch(effective: int, fits: Callable[[int], bool], start: int = 1) -> MicroBatchPlan:
    """Largest divisor ``d`` of ``effective`` with ``fits(d)``, assuming fitting is monotone in size.

    Gallops up from the largest divisor <= ``start`` (each next probe at least doubles the size),
    then bisects between the last size that fitted and the first that did not. If ``start`` itself
    fails, bisects below it. Raises BatchSizeError if 1 does not fit.
    """
    cands = divisors(effective)
    trials: list[tuple[int, bool]] = []

    def probe(i: int) -> bool:
        ok = bool(fits(cands[i]))
        trials.append((cands[i], ok))
        return ok

    i = max(j for j, c in enumerate(cands) if c <= max(1, start))
    lo, hi = -1, len(cands)  # lo: largest index known to fit; hi: smallest index known to fail
    if probe(i):
        lo = i
        while lo < len(cands) - 1:
            j = next((k for k, c in enumerate(cands) if c >= 2 * cands[lo]), len(cands) - 1)
            if probe(j):
                lo = j
            else:
                hi = j
                break
    else:
        hi = i
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    if lo < 0:
        raise BatchSizeError("a micro-batch of 1 does not fit in memory")
    micro = cands[lo]
    return MicroBatchPlan(micro, effective // micro, effective, trials)


def tile_batch(batch: Batch, n: int) -> Batch:
    """``n`` rows taken cyclically from ``batch`` (same sequence length, so the same memory per row)."""
    rows = next(iter(batch.values())).shape[0]
    idx = torch.arange(n) % rows
    return {k: v[idx.to(v.device)] for k, v in batch.items()}


def peek_batch(loader: Any) -> Batch:
    """One batch from a loader with ``next_batch``/``state_dict``/``load_state_dict``, position unchanged."""
    state = loader.state_dict()
    batch = loader.next_batch()
    loader.load_state_dict(state)
    return batch


def auto_micro_batch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Batch], Any],
    make_batch: Callable[[int], Batch],
    effective: int,
    *,
    device: torch.device,
    start: int = 1,
    memory_cap_bytes: int | None = None,
    simulate_oom_above: int | None = None,
) -> MicroBatchPlan:
    """Search the micro-batch with real training steps on ``model`` and undo every one of them.

    ``loss_fn(batch)`` returns a loss or ``(loss, metrics)`` and may call a compiled wrapper of
    ``model``; ``model`` is the module whose parameters ``optimizer`` holds (snapshot and restore act
    on it). ``memory_cap_bytes`` (CUDA): a step whose peak allocation exceeds it does not fit.
    """
    if memory_cap_bytes is not None and device.type != "cuda":
        raise ValueError("memory_cap_bytes needs a CUDA device (CPU peak memory is not measurable per step)")
    params = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict(keep_vars=True).items()}
    opt_state = _cpu_copy(optimizer.state_dict())
    rng = rng_state()

    def fits(n: int) -> bool:
        ok = True
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            _probe_step(optimizer, loss_fn, make_batch(n), device, n, simulate_oom_above)
        except Exception as exc:  # only OOM means "does not fit"; anything else is a real error
            if not is_oom(exc):
                raise
            ok = False
        if ok and memory_cap_bytes is not None:
            ok = torch.cuda.max_memory_allocated(device) <= memory_cap_bytes
        _undo(model, optimizer, params, opt_state, device)
        return ok

    try:
        plan = search_micro_batch(effective, fits, start=start)
    finally:
        set_rng_state(rng)
        reattach = getattr(optimizer, "reattach_hooks", None)
        if reattach is not None:
            reattach(model)  # MuonClip: fresh hooks, no maxima left over from a failed probe
    return plan


def _probe_step(optimizer, loss_fn, batch: Batch, device, n: int, simulate_oom_above: int | None) -> None:
    batch = {k: v.to(device) for k, v in batch.items()}
    out = loss_fn(batch)
    loss = out[0] if isinstance(out, tuple) else out
    if simulate_oom_above is not None and n > simulate_oom_above:
        # Raised with the forward's graph alive, like a real OOM in backward.
        raise torch.OutOfMemoryError(f"simulated out of memory: micro-batch {n} > {simulate_oom_above}")
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _undo(model: nn.Module, optimizer, params: dict[str, torch.Tensor], opt_state: dict, device) -> None:
    optimizer.zero_grad(set_to_none=True)
    for name, t in model.state_dict(keep_vars=True).items():
        t.copy_(params[name])
    optimizer.load_state_dict(opt_state)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def fit_trainer_micro_batch(trainer: Any, effective: int, start: int, **kwargs: Any) -> MicroBatchPlan:
    """Run the search for a ``training.stages.trainer.Trainer`` and apply the plan to it.

    Sets ``trainer.loader.batch_size`` and ``trainer.spec.grad_accum``. Call it before loading a
    checkpoint into the trainer: the search restores the optimizer to its state at the call. On
    resume the search runs again (possibly on another machine); the effective batch and the order
    in which the loader hands out blocks do not depend on the micro-batch, so the run continues the
    same trajectory up to summation order.
    """
    sample = peek_batch(trainer.loader)
    try:
        plan = auto_micro_batch(
            trainer.model,
            trainer.optimizer,
            trainer.loss_fn,
            lambda n: tile_batch(sample, n),
            effective,
            device=trainer.device,
            start=start,
            **kwargs,
        )
    except BatchSizeError:
        stage = trainer.spec.stage
        raise BatchSizeError(
            f"{stage}.auto_batch_size: a micro-batch of 1 does not fit in memory; "
            f"lower data.seq_len or set run.gradient_checkpointing=true"
        ) from None
    trainer.loader.batch_size = plan.micro_batch
    trainer.spec.grad_accum = plan.grad_accum
    log.info(
        "%s: auto batch size: micro-batch %d x grad_accum %d = effective %d (tried %s)",
        trainer.spec.stage,
        plan.micro_batch,
        plan.grad_accum,
        plan.effective_batch,
        ", ".join(f"{n}:{'ok' if ok else 'oom'}" for n, ok in plan.trials),
    )
    return plan
