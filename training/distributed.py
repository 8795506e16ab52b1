"""Multi-process training under ``torchrun`` with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m training.run_trial --out r.json -- ...
    (``sweep worker --gpus-per-trial 2`` builds that command)

``run.distributed``: ``auto`` (the default) shards when ``WORLD_SIZE > 1``, i.e. under torchrun, and
runs in one process otherwise; ``fsdp`` is the same but says so; ``none`` refuses a torchrun launch.
Without torchrun nothing here touches ``torch.distributed``: ``current()`` is a one-process context
whose methods are identities, so the training loop has one code path.

What a sharded run does (each point is one of the notebook's FSDP bugs or a rule of the issue):

- Sharding: ``fully_shard`` per decoder layer, then on the root (embeddings, final norm, tied
  lm_head). Parameters are made one dtype first (notebook bug 1: FSDP flattens one dtype per group).
  ``MixedPrecisionPolicy(param_dtype=<run dtype>, reduce_dtype=float32)`` for 16-bit runs (gradients
  are reduce-scattered in fp32); fp32 runs (CPU, the tests) get no casts at all.
- Data: every rank builds the same loaders and draws the same *global* batch, then keeps its own
  contiguous slice (``local_batch``), so the global batch, the data order and the loader's resume
  state are those of the one-process run. FSDP averages gradients over ranks; the losses are means
  over equally many tokens per rank (fixed-length packed blocks), so the gradient is the one-process
  gradient up to summation order. ``stage*.batch_size`` must be a multiple of the world size.
  Cost: every rank tokenises (or, for ``data.source=hf``, streams) the whole data, and the held-out
  eval runs in full on every rank (FSDP needs all ranks in each forward anyway).
- Numbers: the step loss and its parts are averaged over ranks (one all-reduce per step), so every
  rank logs, diverges and stops on the same values; only rank 0 writes metrics, W&B, checkpoints and
  the result JSON. SIGTERM (torchrun forwards it to every rank) is OR-ed across ranks before the
  checkpoint, so no rank enters the collective save alone.
- Clipping (notebook bug 3, NaN): ``clip_grad_norm_`` takes the norm over *all* shards
  (``get_total_norm`` on the DTensor gradients, then ``full_tensor()``: the local shard norms are
  combined across ranks) and scales every shard by the same factor.
- Checkpoints (notebook bug 4, NCCL timeout): gathering a sharded state dict is a collective, so every
  rank calls ``model_state_dict``/``optimizer_state_dict`` (``get_model_state_dict`` /
  ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``: full tensors on rank 0's
  CPU, nothing elsewhere), rank 0 writes through ``CheckpointManager``, and all ranks meet at a barrier
  (``MainRankCheckpoints``). The file has the one-process layout (model keys as ``state_dict()``,
  optimizer state keyed by parameter index), so a checkpoint written by N processes resumes in M.
  Loading: every rank reads the file and keeps its own shards.
- Activation checkpointing (``run.gradient_checkpointing``; notebook bug 5, a hang): HF's per-layer,
  non-reentrant checkpointing is switched on before ``fully_shard``, so each FSDP unit is one decoder
  layer and its recomputation stays inside that unit. FSDP2 has no ``backward_prefetch`` switch: in
  backward it all-gathers layer i, then prefetches layer i-1 in the reverse of the order recorded in
  forward (the same on every rank). The recomputation of layer i runs after layer i's own all-gather;
  it re-enters FSDP's forward hooks, which FSDP2 skips during backward (no unshard, no prefetch), so
  it issues no collective, and every rank issues the same collectives in the same order with
  prefetching left on. (The FSDP1 hang came from recomputation that issued its own all-gathers while
  a backward prefetch was in flight.)
- Optimizers: AdamW shards as is. Muon needs whole matrices for Newton-Schulz: ``GatheredMuon``
  (training/optim/muon_gathered.py) gathers each update in bf16 for NS and keeps the rest sharded.
  MuonClip and APOLLO are refused with FSDP at config time (MuonClip rejects sharded weights; APOLLO's
  random projections are untested on shards).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("training")

MODES = ("auto", "none", "fsdp")


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def validate_distributed_config(cfg: Any, world_size: int | None = None) -> None:
    """Checks that depend on the launch (torchrun's WORLD_SIZE); raises ValueError naming the key."""
    world = world_size_from_env() if world_size is None else world_size
    mode = cfg.run.distributed
    if mode not in MODES:
        raise ValueError(f"run.distributed: got {mode!r}, allowed: {', '.join(MODES)}")
    if world <= 1:
        return
    if mode == "none":
        raise ValueError(
            f"run.distributed: 'none' but launched as {world} processes (WORLD_SIZE={world}); "
            "use run.distributed=auto or fsdp, or launch with plain python"
        )
    stage_sel = cfg.get("stage", "pipeline")
    stages = [s for s in ("stage1_9", "stage2", "stage3") if s in cfg and cfg[s].enabled]
    stages = stages if stage_sel == "pipeline" else [stage_sel]
    for stage in stages:
        s = cfg[stage]
        if s.max_steps <= 0:
            continue
        if stage == "stage3":
            raise ValueError(
                f"stage3: not supported with several processes (WORLD_SIZE={world}); "
                "run Stage 3 in one process (plain python, or sweep worker --gpus-per-trial 1)"
            )
        if s.batch_size % world:
            raise ValueError(
                f"{stage}.batch_size: {s.batch_size} is not divisible by the {world} processes; "
                f"use a multiple of {world} (each rank trains on batch_size/{world} of every batch)"
            )
        if str(s.get("auto_batch_size", "false")).lower() == "true":  # auto: off under FSDP
            raise ValueError(
                f"{stage}.auto_batch_size: not supported with several processes (an OOM probe on one "
                "rank would desynchronise the others); set it to false and give batch_size"
            )
        if s.optimizer.name in ("muonclip", "apollo"):
            raise ValueError(
                f"{stage}.optimizer.name: {s.optimizer.name!r} does not support sharded (FSDP) weights; "
                "use muon or adamw, or train in one process"
            )


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job; with ``world_size == 1`` every method is an identity."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def place(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda`` becomes ``cuda:<LOCAL_RANK>``."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def local_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's contiguous slice of a global batch (rows ``rank*n/W .. (rank+1)*n/W``)."""
        if not self.enabled:
            return batch
        out = {}
        for key, value in batch.items():
            n = value.shape[0]
            if n % self.world_size:
                raise ValueError(
                    f"batch of {n} rows cannot be split over {self.world_size} processes; "
                    f"make the stage's batch_size a multiple of {self.world_size}"
                )
            per = n // self.world_size
            out[key] = value[self.rank * per : (self.rank + 1) * per]
        return out

    def mean_step(self, loss: float, parts: dict[str, float]) -> tuple[float, dict[str, float]]:
        """The step loss and its parts averaged over ranks (one all-reduce)."""
        if not self.enabled:
            return loss, parts
        keys = sorted(parts)
        t = torch.tensor([loss, *(parts[k] for k in keys)], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        t = (t / self.world_size).tolist()
        return t[0], dict(zip(keys, t[1:]))

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def checkpoints(self, manager: Any) -> Any:
        """``manager`` itself in one process; ``MainRankCheckpoints`` around it in several."""
        return MainRankCheckpoints(manager, self) if self.enabled else manager


_SINGLE = DistContext()
_current = _SINGLE


def current() -> DistContext:
    """The context set up by ``setup_distributed`` (the one-process context before or without it)."""
    return _current


def setup_distributed(mode: str, device: torch.device) -> DistContext:
    """Join torchrun's process group when ``WORLD_SIZE > 1`` (idempotent); else the one-process context.

    ``device``: the resolved ``run.device``; CUDA selects NCCL (on ``cuda:<LOCAL_RANK>``), CPU gloo.
    Ranks other than 0 log warnings only, so the progress lines appear once.
    """
    global _current
    world = world_size_from_env()
    if mode not in MODES:
        raise ValueError(f"run.distributed: got {mode!r}, allowed: {', '.join(MODES)}")
    if world <= 1:
        if mode == "fsdp":
            log.warning("run.distributed=fsdp with one process (no torchrun): training unsharded")
        _current = _SINGLE
        return _current
    if mode == "none":
        raise ValueError(
            f"run.distributed: 'none' but launched as {world} processes (WORLD_SIZE={world}); "
            "use run.distributed=auto or fsdp, or launch with plain python"
        )
    rank, local_rank = rank_from_env(), int(os.environ.get("LOCAL_RANK", "0") or 0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # Collectives wait up to 30 min (default 10): the other ranks sit in the barrier while rank 0
        # writes a checkpoint, which for a multi-GB state going to gs:// can take minutes.
        timeout = datetime.timedelta(minutes=30)
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, device_id=torch.device("cuda", local_rank), timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    _current = DistContext(world_size=world, rank=rank, local_rank=local_rank, backend=backend)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
        log.setLevel(logging.WARNING)
    log.info("distributed: FSDP2 over %d processes (%s)", world, backend)
    return _current


def teardown_distributed() -> None:
    """Leave the process group (no-op when none was joined)."""
    global _current
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _current = _SINGLE


# -- model wrapping -------------------------------------------------------------------------------
def uniform_param_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every parameter to ``dtype`` in place (notebook bug 1); buffers keep theirs (float32 RoPE
    frequencies, saliency EMAs). Logs one line when something was cast."""
    cast = [n for n, p in model.named_parameters() if p.dtype != dtype]
    if not cast:
        return
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
    log.info(
        "fsdp: cast %d parameters to %s so every FSDP group has one dtype (first: %s)",
        len(cast),
        dtype,
        cast[0],
    )


def shard_model(
    model: nn.Module, ctx: DistContext, *, dtype: torch.dtype, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` per decoder layer, then the root; a no-op in one process.

    ``dtype``: the parameters' (sharded, master) dtype. ``compute_dtype`` (run.precision=bf16-mixed):
    the dtype FSDP unshards them to for forward/backward, gradients reduced in float32.

    Call it after the BitLinear conversion and any HF gradient checkpointing, before building the
    optimizer and before torch.compile. Returns ``model`` (the same object).
    """
    if not ctx.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from training.bitnet.architecture import decoder_layers

    uniform_param_dtype(model, dtype)
    mesh = init_device_mesh("cuda" if ctx.backend == "nccl" else "cpu", (ctx.world_size,))
    if compute_dtype is not None and compute_dtype != dtype:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    elif dtype in (torch.bfloat16, torch.float16):
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    layers = decoder_layers(model, "run.distributed=fsdp")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # FSDP2 keeps the root's parameters (embeddings, final norm, lm_head) unsharded after forward,
    # for the backward that follows. An eval forward has no backward, so they would stay registered
    # as plain unsharded tensors, and an optimizer built or a state dict taken next would capture
    # those instead of the shards (seen here: the Stage 2 optimizer after Stage 1.9's eval).
    model.register_forward_hook(_reshard_after_no_grad_forward)
    log.info(
        "fsdp: %d decoder layers + root sharded over %d ranks (compute %s, gradient reduction %s)",
        len(layers),
        ctx.world_size,
        mp.param_dtype or dtype,
        mp.reduce_dtype or dtype,
    )
    return model


def _reshard_after_no_grad_forward(module: nn.Module, args: Any, output: Any) -> None:
    if not torch.is_grad_enabled():
        module.reshard()


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


# -- gradient clipping ----------------------------------------------------------------------------
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that is also right on FSDP2 shards; returns the total norm.

    The 2-norm is taken over every gradient of every rank: on DTensor gradients ``get_total_norm``
    yields a partial norm that ``full_tensor()`` combines across ranks, so all ranks see one norm and
    scale their shards by one factor (the notebook's NaN came from clipping each shard by its own
    norm). The result is a plain 0-dim tensor. ``max_norm = inf`` (or <= 0) measures without clipping.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if 0 < max_norm < math.inf:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# -- state dicts ----------------------------------------------------------------------------------
def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state_dict(model: nn.Module) -> dict[str, Any]:
    """``model.state_dict()``; for a sharded model the gathered full one on rank 0 ({} elsewhere).

    Collective when sharded: every rank must call it.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def load_model_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    """Load a full (one-process layout) state dict; a sharded model keeps each rank's shards."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    # A shallow copy: set_model_state_dict replaces the dict's values with this rank's shards.
    set_model_state_dict(model, dict(state), options=_full_options())


def _param_fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Fully qualified names of the optimizer's parameters in its param_groups order."""
    names = {id(p): n for n, p in model.named_parameters()}
    fqns = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(
                    "optimizer holds a parameter that is not in the model; build it from this model"
                )
            fqns.append(names[id(p)])
    return fqns


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()``; for a sharded model the gathered full one (rank 0; {} elsewhere),
    converted to the one-process layout (state keyed by parameter index).

    Collective when sharded. Before the first step (no state) the plain dict is returned: DCP would
    otherwise initialise the state with a zero-gradient step, which advances AdamW's step count.
    """
    if not is_sharded(model) or not optimizer.state:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_fqn = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not by_fqn:
        return {}
    index = {fqn: i for i, fqn in enumerate(_param_fqns(model, optimizer))}
    return {
        "state": {index[fqn]: v for fqn, v in by_fqn["state"].items()},
        "param_groups": [{**g, "params": [index[f] for f in g["params"]]} for g in by_fqn["param_groups"]],
    }


def load_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a one-process-layout optimizer state dict; a sharded model keeps each rank's shards."""
    if not is_sharded(model) or not state.get("state"):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    fqns = _param_fqns(model, optimizer)
    by_fqn = {
        "state": {fqns[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_fqn, options=_full_options())


class MainRankCheckpoints:
    """``CheckpointManager`` for several processes: every rank calls ``save`` with a state gathered
    collectively (``model_state_dict``/``optimizer_state_dict``), rank 0 writes, then all ranks wait
    at a barrier so nobody reads or prunes a half-written checkpoint. Reads go to every rank."""

    def __init__(self, manager: Any, ctx: DistContext) -> None:
        self.manager, self.ctx = manager, ctx

    def save(self, name: str, state: dict[str, Any]) -> str:
        path = self.manager.save(name, state) if self.ctx.is_main else f"{self.manager.root}/{name}.pt"
        self.ctx.barrier()
        return path

    def prune_to(self, name: str) -> None:
        if self.ctx.is_main:
            self.manager.prune_to(name)
        self.ctx.barrier()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.manager, name)
