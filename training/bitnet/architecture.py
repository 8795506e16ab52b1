"""Which Hugging Face causal LMs the BitNet conversion understands, and where their projections live.

Supported: the Llama family layout (Llama, SmolLM, Mistral, Qwen2, Qwen3): ``model.model.layers[i]``
with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``, all ``nn.Linear``. Anything else
(GPT-2, MoE blocks, fused qkv) is rejected with a ValueError naming the model class.
"""

from __future__ import annotations

import torch.nn as nn

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _has_projections(layer: nn.Module) -> bool:
    attn = getattr(layer, "self_attn", None)
    mlp = getattr(layer, "mlp", None)
    if not isinstance(attn, nn.Module) or not isinstance(mlp, nn.Module):
        return False
    return all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTENTION_PROJECTIONS) and all(
        isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP_PROJECTIONS
    )


def decoder_layers(model: nn.Module, caller: str) -> nn.ModuleList:
    """``model.model.layers`` after checking every layer has the Llama-style projections."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if (
        not isinstance(layers, nn.ModuleList)
        or len(layers) == 0
        or not all(_has_projections(layer) for layer in layers)
    ):
        raise ValueError(
            f"{caller}: unsupported architecture {type(model).__name__} (expected "
            "model.model.layers[*].self_attn.o_proj and .mlp.down_proj as in Llama/Qwen2/Qwen3)"
        )
    return layers


def layer_projections(layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(parent, attribute)`` for the seven projections of one decoder layer, attention first."""
    return [(layer.self_attn, n) for n in ATTENTION_PROJECTIONS] + [(layer.mlp, n) for n in MLP_PROJECTIONS]
