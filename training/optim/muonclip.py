"""MuonClip: Muon + AdamW with Kimi K2's per-head QK-clip after every step."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .muon_adamw import MuonAdamW
from .param_split import split_muon_params
from .qk_clip import qk_clip_
from .qk_hooks import QKLogitRecorder


class MuonClip(MuonAdamW):
    """``MuonAdamW`` over ``split_muon_params(model)`` plus QK-clip with threshold ``tau``.

    Forward hooks on each attention's q_proj/k_proj record, while the module is in train mode, the
    per-head max of the post-RoPE, scaled pre-softmax logits of the step's forwards (see
    ``qk_hooks``). After the Muon/AdamW update, heads whose max exceeded ``tau`` get their W_q/W_k
    rows scaled so the logit scales by tau / max (``qk_clip.qk_clip_``). As in Kimi K2 the max comes from
    the forward that produced the gradients, i.e. before this step's update, so right after a step
    the bound holds up to the update's own effect on the logits.

    Differences from Kimi K2 / GAD-cell muon-clip:
      - GQA: a shared key head is never rescaled; the query head takes the whole factor (see ``qk_clip_``).
      - Under ``torch.distributed`` the per-head maxima are all-reduced (MAX) before clipping, so DDP
        replicas apply identical clips; sharded weights (FSDP/DTensor) are rejected at construction.
      - BitLinear q_proj/k_proj: the latent full-precision rows are scaled; the ternary weights are
        re-quantised with a per-tensor absmean scale, so there the logit bound is approximate.
      - torch.compile: dynamo traces the hooks (checked with its eager backend), so the logit
        recomputation (about one extra QK^T per layer, in float32) runs inside the compiled forward.

    Call ``reattach_hooks(model)`` after anything that rebuilds modules (a module swap) or installs a
    fresh model object; plain eval()/train() cycles need nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        adamw_lr: float,
        tau: float = 100.0,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_dtype: str = "bfloat16",
    ) -> None:
        if not tau > 0:
            raise ValueError(f"qk_clip_tau={tau!r} must be > 0")
        muon_params, adamw_params = split_muon_params(model)
        super().__init__(
            muon_params,
            adamw_params,
            lr=lr,
            adamw_lr=adamw_lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            betas=betas,
            eps=eps,
            ns_dtype=ns_dtype,
        )
        self.tau = float(tau)
        self._recorder = QKLogitRecorder()
        self._last: dict[str, torch.Tensor] = {}
        self.reattach_hooks(model)

    def reattach_hooks(self, model: nn.Module) -> None:
        """Find q_proj/k_proj by name in ``model`` as it is now and hook them (old hooks removed).

        Raises if a found W_q/W_k is not one of this optimizer's Muon parameters: that means the
        modules were swapped after the optimizer was built, and its parameters are stale.
        """
        self._recorder.attach(model)
        muon_ids = {id(p) for g in self.param_groups if g.get("part") == "muon" for p in g["params"]}
        for site in self._recorder.sites:
            for proj in ("q_proj", "k_proj"):
                w = getattr(site.attn, proj).weight
                if _is_sharded(w):
                    self._recorder.detach()
                    raise ValueError(
                        f"muonclip: {site.name}.{proj}.weight is sharded (DTensor/FSDP); unsupported, use 'muon'"
                    )
                if id(w) not in muon_ids:
                    self._recorder.detach()
                    raise ValueError(
                        f"muonclip: {site.name}.{proj}.weight is not optimised by this optimizer; "
                        "build the optimizer after swapping modules (e.g. to BitLinear)"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = super().step(closure)
        self._clip(self._recorder.take())
        return loss

    def _clip(self, recorded: dict[str, torch.Tensor]) -> None:
        sites = [s for s in self._recorder.sites if s.name in recorded or _distributed()]
        if not sites:
            self._last = {}
            return
        maxima = [recorded.get(s.name, _unrecorded(s)) for s in sites]
        if _distributed():
            # Ranks saw different micro-batches; every replica must apply the same scaling.
            flat = torch.cat([m.to(maxima[0].device) for m in maxima])
            dist.all_reduce(flat, op=dist.ReduceOp.MAX)
            maxima = list(flat.split([m.numel() for m in maxima]))
        self._last = {site.name: m.detach() for site, m in zip(sites, maxima)}
        # One device sync for all layers instead of one per layer.
        over = torch.stack([(m > self.tau).any() for m in maxima]).tolist()
        for site, head_max, clip in zip(sites, maxima, over):
            if clip:
                qk_clip_(
                    site.q_proj.weight,
                    site.k_proj.weight,
                    head_max,
                    self.tau,
                    site.head_dim,
                    q_bias=site.q_proj.bias,
                    k_bias=site.k_proj.bias,
                )

    def max_logits(self) -> dict[str, float]:
        """Per attention layer, the largest head's max logit seen by the last ``step()`` (before clipping).

        Empty before the first step with a train-mode forward. For logging, e.g. ``max(d.values())``.
        """
        return {name: float(m.max()) for name, m in self._last.items()}

    def max_logits_per_head(self) -> dict[str, torch.Tensor]:
        """Like ``max_logits`` but the float32 [num_heads] vector per layer (on CPU)."""
        return {name: m.detach().cpu() for name, m in self._last.items()}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _unrecorded(site) -> torch.Tensor:
    n_heads = site.q_proj.weight.shape[0] // site.head_dim
    return torch.full((n_heads,), float("-inf"), device=site.q_proj.weight.device)


def _is_sharded(w: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed: nothing can be sharded
        return False
    return isinstance(w, DTensor)
