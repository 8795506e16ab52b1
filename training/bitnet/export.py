"""Export a converted (SubLN + BitLinear) Llama-family model as a transformers BitNet checkpoint.

The result loads with plain ``AutoModelForCausalLM.from_pretrained(out_dir)`` as ``BitNetForCausalLM``
with transformers' packed ``BitLinear`` layers (``quantization_config``: ``quant_method: bitnet``,
``linear_class: bitlinear``, ``quantization_mode: offline``, the layout of microsoft/bitnet-b1.58-2B-4T).

Packed layout (transformers.integrations.bitnet): ternary codes + 1 in {0, 1, 2}, 2 bits each, four
output rows per uint8; packed row r holds original rows r, r + R, r + 2R, r + 3R (R = out_features / 4)
in bits 0-1, 2-3, 4-5, 6-7. We reuse transformers' own ``pack_weights`` so the layout cannot drift.

Scale convention: transformers' packed BitLinear computes ``(x_int @ codes.T) / (weight_scale * s_x)``,
so its ``weight_scale`` is the reciprocal of our absmean scale: we store ``1 / mean|W|``. (Its
``AutoBitLinear`` in offline mode multiplies by ``weight_scale`` instead; we do not use that class.)

What is exported is the fully quantised model (lambda = 1), whatever the controller holds now. The
BitNet format always quantises activations to int8; a model converted with
``quantize_activations=False`` still exports, with a warning, and then computes differently.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import BitNetConfig
from transformers.activations import ACT2FN
from transformers.integrations.bitnet import VALUES_PER_ITEM, pack_weights

from .architecture import decoder_layers, layer_projections
from .bitlinear import BitLinear
from .quant import ternarize
from .saliency import SaliencyBitLinear
from .subln import ATTN_SUB_NORM, FFN_SUB_NORM

QUANTIZATION_CONFIG = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}


def _fail(message: str) -> None:
    raise ValueError(f"export_bitnet: {message}")


def _check_model(model: nn.Module, layers: nn.ModuleList) -> bool:
    """Validate that BitNetForCausalLM can represent ``model``; returns whether attention has biases."""
    config = model.config
    attention_bias = False
    for i, layer in enumerate(layers):
        if not hasattr(layer.self_attn, ATTN_SUB_NORM) or not hasattr(layer.mlp, FFN_SUB_NORM):
            _fail(f"layers[{i}] has no SubLN norms; call insert_subln before convert_model_to_bitnet")
        for name in ("q_norm", "k_norm"):
            if hasattr(layer.self_attn, name):
                _fail(f"layers[{i}].self_attn.{name} (Qwen3 QK-norm) is not supported by BitNetForCausalLM")
        for parent, name in layer_projections(layer):
            proj = getattr(parent, name)
            where = f"layers[{i}].{'self_attn' if parent is layer.self_attn else 'mlp'}.{name}"
            if not isinstance(proj, BitLinear):
                _fail(f"{where} is {type(proj).__name__}, not BitLinear; call convert_model_to_bitnet first")
            if isinstance(proj, SaliencyBitLinear) and proj.num_protected > 0:
                _fail(
                    f"{where} keeps {proj.num_protected} columns full precision (protect_k={proj.protect_k}); "
                    "the BitNet format is fully ternary, anneal protect_k to 0 first"
                )
            if proj.out_features % VALUES_PER_ITEM:
                _fail(
                    f"{where} has out_features={proj.out_features}, which the packed format needs divisible by 4"
                )
            if parent is layer.mlp and proj.bias is not None:
                _fail(f"{where} has a bias (mlp_bias=True); BitNetForCausalLM's MLP has none")
            attention_bias |= parent is layer.self_attn and proj.bias is not None
        if layer.self_attn.o_proj.in_features != config.hidden_size:
            _fail(
                f"attention width {layer.self_attn.o_proj.in_features} (heads * head_dim) != hidden_size "
                f"{config.hidden_size}; BitNet's attn_sub_norm has hidden_size features"
            )
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        _fail(
            f"sliding_window={config.sliding_window} is not supported by BitNetForCausalLM (set it to None)"
        )
    if config.hidden_act not in ACT2FN:
        _fail(f"hidden_act={config.hidden_act!r} is not a transformers activation")
    if any(not m.quantize_activations for m in layers.modules() if isinstance(m, BitLinear)):
        warnings.warn(
            "export_bitnet: the model was converted with quantize_activations=False but the BitNet format "
            "quantises activations to int8; the exported model will not match it exactly",
            stacklevel=3,
        )
    return attention_bias


def _bitnet_config(model: nn.Module, attention_bias: bool) -> BitNetConfig:
    src = model.config
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    config = BitNetConfig(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=getattr(src, "num_key_value_heads", None) or src.num_attention_heads,
        head_dim=head_dim,
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        initializer_range=getattr(src, "initializer_range", 0.02),
        rms_norm_eps=src.rms_norm_eps,
        tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)),
        attention_bias=attention_bias,
        attention_dropout=getattr(src, "attention_dropout", 0.0),
        rope_parameters=dict(src.rope_parameters),
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        pad_token_id=src.pad_token_id,
    )
    config.architectures = ["BitNetForCausalLM"]
    config.quantization_config = dict(QUANTIZATION_CONFIG)
    config.dtype = _model_dtype(model)  # from_pretrained's dtype="auto" then loads in the trained dtype
    return config


def _model_dtype(model: nn.Module) -> torch.dtype:
    return model.model.embed_tokens.weight.dtype


def _bitnet_state_dict(
    model: nn.Module, layers: nn.ModuleList, attention_bias: bool
) -> dict[str, torch.Tensor]:
    dtype = _model_dtype(model)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("saliency_ema")}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight; safetensors stores it once
    for i, layer in enumerate(layers):
        for parent, name in layer_projections(layer):
            proj = getattr(parent, name)
            prefix = f"model.layers.{i}.{'self_attn' if parent is layer.self_attn else 'mlp'}.{name}."
            codes, scale = ternarize(proj.weight, proj.eps)
            # pack_weights adds 1 to its input in place; ``codes`` is a fresh tensor of ours, so that is fine.
            state[prefix + "weight"] = pack_weights(codes.cpu())
            state[prefix + "weight_scale"] = (1.0 / scale.double()).reshape(1).to(dtype)
            if attention_bias and parent is layer.self_attn and proj.bias is None:
                state[prefix + "bias"] = torch.zeros(proj.out_features, dtype=dtype)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def export_bitnet(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write ``model`` (after insert_subln + convert_model_to_bitnet) as a BitNet checkpoint in ``out_dir``.

    Writes config.json, model.safetensors, generation_config.json (when the model has one) and, given a
    tokenizer, its files. Architectures BitNetForCausalLM cannot express raise ValueError: Qwen3 QK-norm,
    MLP biases, sliding-window attention, heads * head_dim != hidden_size, unconverted projections or
    still-protected saliency columns. Attention biases (Qwen2's q/k/v) are kept via ``attention_bias=True``
    with a zero o_proj bias. Returns the output directory.
    """
    layers = decoder_layers(model, "export_bitnet")
    attention_bias = _check_model(model, layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        state = _bitnet_state_dict(model, layers, attention_bias)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _bitnet_config(model, attention_bias).save_pretrained(out)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
