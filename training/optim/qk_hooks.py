"""Forward hooks that record each attention layer's per-head max logit for MuonClip.

Written so the three muon-clip (GAD-cell/muon-clip) bugs in the research notebook cannot happen:
  1. hooks are registered once and never removed by eval()/train(); instead each hook checks
     ``module.training`` on every call, so an eval -> train cycle (Lightning's BatchSizeFinder,
     validation) cannot leave the recorder unhooked;
  2. nothing here logs or owns a writer; the optimizer reads ``take()`` and exposes ``max_logits()``;
  3. the logit math runs in float32 on upcast copies of the (bf16) activations.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .qk_clip import RopeFn, head_max_logits


@dataclass
class AttentionSite:
    """One attention module and what is needed to recompute and clip its logits."""

    name: str
    attn: nn.Module
    head_dim: int
    scaling: float
    rope_fn: RopeFn
    # Per-forward scratch: the pre-hook's rope/mask and the projection outputs, cleared once used.
    pending: dict = field(default_factory=dict)

    @property
    def q_proj(self) -> nn.Module:
        return self.attn.q_proj

    @property
    def k_proj(self) -> nn.Module:
        return self.attn.k_proj


def find_attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every module with ``q_proj`` and ``k_proj`` children (HF Llama-family attention), by current name.

    Located afresh on every call, so a module swap (BitLinear replacing q_proj/k_proj) done before is seen.
    The RoPE function is the model's own ``apply_rotary_pos_emb`` from the attention class's module, so
    the recorded logits use exactly the model's rotary convention.
    """
    sites = []
    for name, module in model.named_modules():
        if not (
            isinstance(getattr(module, "q_proj", None), nn.Module)
            and isinstance(getattr(module, "k_proj", None), nn.Module)
        ):
            continue
        kind = type(module).__name__
        if hasattr(module, "q_norm") or hasattr(module, "k_norm"):
            raise ValueError(
                f"muonclip: {name} ({kind}) normalises q/k (q_norm/k_norm), so scaling W_q/W_k cannot bound its logits; use 'muon'"
            )
        if "position_embeddings" not in inspect.signature(module.forward).parameters:
            raise ValueError(
                f"muonclip: {name} ({kind}) takes no position_embeddings=(cos, sin); supported: HF Llama-family attention"
            )
        rope_fn = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
        if rope_fn is None:
            raise ValueError(f"muonclip: no apply_rotary_pos_emb next to {kind} in {type(module).__module__}")
        head_dim = int(getattr(module, "head_dim", 0))
        if head_dim <= 0:
            raise ValueError(f"muonclip: {name} ({kind}) has no positive head_dim attribute")
        scaling = float(getattr(module, "scaling", head_dim**-0.5))
        sites.append(AttentionSite(name or type(model).__name__, module, head_dim, scaling, rope_fn))
    if not sites:
        raise ValueError("muonclip: found no attention module with q_proj and k_proj children; use 'muon'")
    return sites


class QKLogitRecorder:
    """Running per-head max logit of every attention site since the last ``take()``.

    The max over all forwards between two optimizer steps is kept, so gradient accumulation
    (several micro-batches per step) and activation-checkpoint recomputation (the same forward twice)
    both give the max over the step's data.
    """

    def __init__(self) -> None:
        self.sites: list[AttentionSite] = []
        self._running: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def attach(self, model: nn.Module) -> None:
        """(Re)locate the attention modules of ``model`` and hook them; drops old hooks and pending maxima."""
        sites = find_attention_sites(model)
        self.detach()
        self.sites = sites
        for site in sites:
            self._handles.append(site.attn.register_forward_pre_hook(self._pre_hook(site), with_kwargs=True))
            self._handles.append(site.q_proj.register_forward_hook(self._proj_hook(site, "q")))
            self._handles.append(site.k_proj.register_forward_hook(self._proj_hook(site, "k")))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._running.clear()
        for site in self.sites:
            site.pending.clear()

    def take(self) -> dict[str, torch.Tensor]:
        """The per-head maxima recorded since the last call ({site name: float32 [Hq]}), and reset."""
        out, self._running = self._running, {}
        return out

    def _pre_hook(self, site: AttentionSite):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            site.pending.clear()
            if not module.training:
                return
            rope = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
            site.pending.update(rope=rope, mask=mask, armed=True)

        return hook

    def _proj_hook(self, site: AttentionSite, which: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            pending = site.pending
            if not pending.get("armed"):
                return
            pending[which] = output.detach()
            if "q" in pending and "k" in pending:
                self._record(site, pending["q"], pending["k"], pending["rope"], pending["mask"])
                pending.clear()

        return hook

    def _record(self, site: AttentionSite, q: torch.Tensor, k: torch.Tensor, rope, mask) -> None:
        mask = mask if isinstance(mask, torch.Tensor) else None
        rope = rope if isinstance(rope, tuple | list) and len(rope) == 2 else None
        m = head_max_logits(
            q, k, head_dim=site.head_dim, scaling=site.scaling, rope=rope, rope_fn=site.rope_fn, mask=mask
        )
        prev = self._running.get(site.name)
        self._running[site.name] = m if prev is None else torch.maximum(prev, m)
