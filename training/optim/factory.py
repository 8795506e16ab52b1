"""build_optimizer: OptimizerSpec + model -> a torch.optim.Optimizer."""

from __future__ import annotations

import torch
from torch import nn

from .apollo import build_apollo
from .muon_adamw import MuonAdamW
from .muonclip import MuonClip
from .param_split import decay_groups, split_muon_params
from .spec import OptimizerSpec


def build_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """The optimizer ``spec.name`` over the trainable parameters of ``model``.

    Build it *after* any module swap (BitLinear conversion): parameters and MuonClip's hooks are taken
    from the model as it is now.
    """
    if spec.name == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("adamw: the model has no trainable parameters")
        return torch.optim.AdamW(
            decay_groups(params, spec.weight_decay), lr=spec.lr, betas=spec.betas, eps=spec.eps
        )
    common = dict(
        lr=spec.lr,
        adamw_lr=spec.resolved_adamw_lr,
        weight_decay=spec.weight_decay,
        momentum=spec.momentum,
        nesterov=spec.nesterov,
        betas=spec.betas,
        eps=spec.eps,
        ns_dtype=spec.ns_dtype,
    )
    if spec.name == "muon":
        muon_params, adamw_params = split_muon_params(model)
        return MuonAdamW(muon_params, adamw_params, **common)
    if spec.name == "muonclip":
        return MuonClip(model, tau=spec.qk_clip_tau, **common)
    return build_apollo(model, spec)
