"""APOLLO (Zhu et al., arXiv:2412.05270) via the apollo-torch package's ``APOLLOAdamW``.

API used, read from apollo_torch/apollo.py (apollo-torch 1.0.x; the package is not installed here,
so only the source was checked, not a run): ``APOLLOAdamW(params, lr, betas, eps, weight_decay, ...)``;
a param group that has a ``"rank"`` key is optimised in a random-projection subspace and needs
``proj`` ("random"), ``scale_type`` ("channel" | "tensor"), ``scale``, ``update_proj_gap`` and
``proj_type`` ("std"); groups without ``"rank"`` get plain AdamW. Per-group ``weight_decay`` is
honoured. Its state holds projector objects, so its state_dict needs ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .param_split import decay_groups, split_muon_params
from .spec import OptimizerSpec

# Upstream defaults (README / HF Trainer integration): APOLLO = channel-wise scaling, scale 1;
# APOLLO-Mini = rank 1, tensor-wise scaling with scale 128 to make up for the rank-1 norm estimate.
_UPDATE_PROJ_GAP = 200
_MINI_SCALE = 128.0


def build_apollo(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """APOLLO on the 2-D matrices of the repeated blocks (the ones Muon would take), AdamW on the rest.

    The low-rank groups use rank min(apollo_rank, smaller side of the matrix): a projection wider than
    the matrix only costs memory. ``apollo_rank == 1`` selects APOLLO-Mini's tensor-wise scaling.
    """
    try:
        from apollo_torch import APOLLOAdamW
    except ModuleNotFoundError as exc:
        if exc.name != "apollo_torch":
            raise
        raise ImportError(
            "optimizer 'apollo' needs the apollo-torch package, which is not installed: pip install apollo-torch"
        ) from None

    matrices, rest = split_muon_params(model)
    mini = spec.apollo_rank == 1
    by_rank: dict[int, list[nn.Parameter]] = {}
    for p in matrices:
        by_rank.setdefault(min(spec.apollo_rank, *p.shape), []).append(p)
    groups: list[dict] = [
        {
            "params": params,
            "weight_decay": spec.weight_decay,
            "rank": rank,
            "proj": "random",
            "scale_type": "tensor" if mini else "channel",
            "scale": _MINI_SCALE if mini else 1.0,
            "update_proj_gap": _UPDATE_PROJ_GAP,
            "proj_type": "std",
        }
        for rank, params in sorted(by_rank.items())
    ]
    groups += decay_groups(rest, spec.weight_decay)
    with warnings.catch_warnings():
        # APOLLOAdamW inherits a FutureWarning about transformers' old AdamW that does not apply to it.
        warnings.filterwarnings(
            "ignore", message="This implementation of AdamW is deprecated", category=FutureWarning
        )
        return APOLLOAdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
