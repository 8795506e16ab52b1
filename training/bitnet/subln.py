"""SubLN insertion (BitDistill Stage 1): an RMSNorm on the input of every attention output projection
and every MLP down projection, where quantising an unnormalised activation hurts most.

The norms are registered where transformers' BitNet model has them (``self_attn.attn_sub_norm``,
``mlp.ffn_sub_norm``), so their state_dict keys carry over to an exported BitNet checkpoint unchanged.
They are applied by a forward pre-hook on ``o_proj`` / ``down_proj`` instead of by editing the
attention and MLP forward code, which keeps the model's own classes (and its attention kernels).

Lifetime of the hooks: the hook object holds the norm module, so ``copy.deepcopy`` and pickling carry
it (deepcopy's memo maps it to the copy's norm); ``convert_model_to_bitnet`` moves it onto the
BitLinear that replaces the projection. The hooks are not in a state_dict: to reload a checkpoint,
build the base model, call ``insert_subln`` (and ``convert_model_to_bitnet``), then ``load_state_dict``.
Inserting twice is an error (a second norm would silently change the function).
"""

from __future__ import annotations

import torch.nn as nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .architecture import decoder_layers

ATTN_SUB_NORM = "attn_sub_norm"
FFN_SUB_NORM = "ffn_sub_norm"


class SubLNPreHook:
    """Forward pre-hook applying ``norm`` to a projection's (first positional) input."""

    def __init__(self, norm: nn.Module) -> None:
        self.norm = norm

    def __call__(self, module: nn.Module, args: tuple):
        return (self.norm(args[0]), *args[1:])


def _make_norm(proj: nn.Linear, eps: float) -> LlamaRMSNorm:
    # LlamaRMSNorm is the class BitNetRMSNorm subclasses unchanged, so the exported model computes the same.
    norm = LlamaRMSNorm(proj.in_features, eps=eps)
    return norm.to(device=proj.weight.device, dtype=proj.weight.dtype)


def _attach(parent: nn.Module, norm_name: str, proj_name: str, eps: float) -> None:
    proj = getattr(parent, proj_name)
    norm = _make_norm(proj, eps)
    parent.add_module(norm_name, norm)
    proj.register_forward_pre_hook(SubLNPreHook(norm))


def has_subln(model: nn.Module) -> bool:
    """Whether ``insert_subln`` has run on ``model`` (checks the first decoder layer)."""
    layers = decoder_layers(model, "has_subln")
    return hasattr(layers[0].self_attn, ATTN_SUB_NORM)


def insert_subln(model: nn.Module) -> int:
    """Insert the SubLN norms in place; returns how many were inserted (2 per decoder layer).

    Norm weights start at 1, eps is ``model.config.rms_norm_eps``, dtype/device follow the projection.
    """
    layers = decoder_layers(model, "insert_subln")
    eps = getattr(getattr(model, "config", None), "rms_norm_eps", None)
    if not isinstance(eps, float) or eps <= 0:
        raise ValueError(f"insert_subln: model.config.rms_norm_eps must be a float > 0, got {eps!r}")
    for i, layer in enumerate(layers):
        for parent, norm_name in ((layer.self_attn, ATTN_SUB_NORM), (layer.mlp, FFN_SUB_NORM)):
            if hasattr(parent, norm_name):
                raise ValueError(
                    f"insert_subln: layers[{i}] already has {norm_name}; SubLN can be inserted once"
                )
    for layer in layers:
        _attach(layer.self_attn, ATTN_SUB_NORM, "o_proj", eps)
        _attach(layer.mlp, FFN_SUB_NORM, "down_proj", eps)
    return 2 * len(layers)
