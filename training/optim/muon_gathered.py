"""Muon for FSDP2-sharded matrices: the orthogonalisation runs on the gathered full matrix.

torch.optim.Muon's Newton-Schulz iteration is a function of the *whole* matrix (a Frobenius norm,
then X @ X.T products), so it cannot run on a row shard by itself. Handed FSDP2's DTensor parameters,
torch.optim.Muon does not fail, but DTensor runs the bf16 iteration on shards with its own
redistributions, and the step is not the one-process step: with identical gradients on a random
2-layer model (2 ranks, gloo) the parameters after one step differed by up to 3.5e-4, against a
largest update of 7.7e-3 (measured here). ``GatheredMuon`` instead keeps the elementwise parts sharded
(momentum buffer, Nesterov blend, weight decay, the update itself) and gathers only the matrix NS
needs; with identical gradients its step equals torch.optim.Muon's on the full matrices bit for bit
(tests/test_fsdp.py):

    per step and Muon matrix:  one all-gather of the bf16 update (NS casts to bf16 first anyway, so
                               gathering in bf16 changes nothing), NS on the full matrix on every rank,
                               then each rank keeps its own rows.

Cost against single-process Muon: the same NS FLOPs on every rank (redundant, not split), plus one
all-gather of every hidden matrix in bf16 per optimizer step, i.e. the volume of one extra FSDP
forward all-gather of the decoder weights. Memory: one full matrix and NS's temporaries at a time.
The momentum buffer stays sharded. For a plain (unsharded) parameter the step is exactly
torch.optim.Muon's, so single-process runs are unchanged.

A group with ``ns_dtype: float32`` runs the same quintic iteration in float32 instead (gathered in
float32 when sharded): on CPUs bfloat16 matmuls are ~14x slower than float32. The update keeps its
direction and scale but is not bfloat16's: ~1% apart (relative norm) on a random matrix, ~23% on a real
first-step gradient of a small Llama (cosine > 0.95), because bfloat16 rounding perturbs the gradient's
small singular directions and the iteration lifts every singular value towards 1. This is not
torch.optim.Muon's (nor the notebook's) numerics, so it is opt-in (``stageX.optimizer.ns_dtype``).
"""

from __future__ import annotations

import torch
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz


def is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed: nothing is sharded
        return False
    return isinstance(t, DTensor)


def newton_schulz_fp32(grad: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's ``_zeropower_via_newtonschulz`` operation for operation, in float32."""
    a, b, c = ns_coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)  # a copy: the caller's update is never modified in place
    for _ in range(ns_steps):
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


def _orthogonalise(update: torch.Tensor, group: dict) -> torch.Tensor:
    fp32 = group.get("ns_dtype", "bfloat16") == "float32"
    ns = newton_schulz_fp32 if fp32 else _zeropower_via_newtonschulz
    if not is_dtensor(update):
        return ns(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
    from torch.distributed.tensor import distribute_tensor

    full = update.to(torch.float32 if fp32 else torch.bfloat16).full_tensor()
    ortho = ns(full, group["ns_coefficients"], group["ns_steps"], group["eps"])
    # src_data_rank=None: every rank holds the same full result and keeps its own shard (no traffic).
    return distribute_tensor(ortho, update.device_mesh, update.placements, src_data_rank=None)


class GatheredMuon(torch.optim.Muon):
    """torch.optim.Muon whose step also accepts FSDP2 (DTensor) parameters; see the module docstring."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.ndim != 2:
                    raise ValueError(
                        f"muon: parameter of shape {tuple(p.shape)} is not a matrix; give it to AdamW"
                    )
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                # The same sequence of operations as torch.optim.Muon's _single_tensor_muon.
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = _orthogonalise(update, group)
                adjusted_lr = _adjust_lr(lr, group["adjust_lr_fn"], p.shape)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-adjusted_lr)
        return loss
