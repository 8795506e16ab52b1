"""APOLLO (Zhu et al., arXiv:2412.05270) via the apollo-torch package's ``APOLLOAdamW``.

API used, read from apollo_torch/apollo.py (apollo-torch 1.0.x; the package is not installed here,
so only the source was checked, not a run): ``APOLLOAdamW(params, lr, betas, eps, weight_decay, ...)``;
a param group that has a ``"rank"`` key is optimised in a random-projection subspace and needs
``proj`` ("random"), ``scale_type`` ("channel" | "tensor"), ``scale``, ``update_proj_gap`` and
``proj_type`` ("std"); groups without ``"rank"`` get plain AdamW. Per-group ``weight_decay`` is
honoured.

Checkpoints: upstream keeps a ``GradientProjector`` object in each low-rank parameter's state, which
only an unrestricted unpickler could load. Checkpoints are loaded with ``weights_only=True``
(training/checkpoint.py), so the optimizer built here turns each projector into a plain dict of its
attributes (ints, floats, strings, the ortho-matrix tensor, the next seed) in ``state_dict()``, and
back into a ``GradientProjector`` in ``load_state_dict()``: a resumed run projects with the same
matrix and seed sequence as an uninterrupted one.
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
        opt = APOLLOAdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    opt.register_state_dict_post_hook(_projectors_to_plain)
    opt.register_load_state_dict_post_hook(_plain_to_projectors)
    return opt


# The projector classes apollo_torch keeps in optimizer state, by the tag its plain form records.
# A fixed table, never a class name read from the checkpoint: loading builds only these.
_PROJECTORS = {"random": ("apollo_torch.random_projector", "GradientProjector")}
_TAG = "apollo_projector"


def _projector_class(kind: str) -> type:
    import importlib

    module, name = _PROJECTORS[kind]
    return getattr(importlib.import_module(module), name)


def _projectors_to_plain(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """state_dict post-hook: each projector object becomes ``{_TAG: kind, **its attributes}``.

    Strings (the kind, ``proj_type``) are stored as UTF-8 bytes: ``Optimizer.load_state_dict`` deep-copies
    the state by rebuilding every iterable as ``type(value)(generator)``, which turns a ``str`` into the
    repr of a generator but rebuilds ``bytes`` intact. The per-parameter dicts of ``state_dict["state"]``
    are the optimizer's live ones, so they are copied, never changed in place: the running optimizer
    keeps its projector objects.
    """
    packed = {}
    for index, per_param in state_dict["state"].items():
        projector = per_param.get("projector")
        if projector is not None and not isinstance(projector, dict):
            kind = next((k for k in _PROJECTORS if isinstance(projector, _projector_class(k))), None)
            if kind is None:
                raise TypeError(
                    f"apollo: cannot checkpoint a {type(projector).__qualname__} projector (only proj='random' "
                    "is supported, as build_apollo configures it)"
                )
            attrs = {k: v.encode() if isinstance(v, str) else v for k, v in vars(projector).items()}
            per_param = {**per_param, "projector": {**attrs, _TAG: kind.encode()}}
        packed[index] = per_param
    return {**state_dict, "state": packed}


def _plain_to_projectors(optimizer: torch.optim.Optimizer) -> None:
    """load_state_dict post-hook: rebuild the projector objects from their plain form."""
    for per_param in optimizer.state.values():
        plain = per_param.get("projector")
        if isinstance(plain, dict):
            attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in plain.items()}
            kind = attrs.pop(_TAG, None)
            if kind not in _PROJECTORS:
                raise ValueError(f"apollo: checkpoint has a projector of unknown kind {kind!r}; expected 'random'")
            projector = _projector_class(kind).__new__(_projector_class(kind))
            vars(projector).update(attrs)
            per_param["projector"] = projector
