"""split_muon_params on a tiny Llama: which parameters go to Muon, which to AdamW."""

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from training.optim import split_muon_params

MATRICES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def names(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def test_untied_split_by_name():
    model = tiny_llama(tie=False)
    muon, adamw = split_muon_params(model)
    expected_muon = {f"model.layers.{i}.{blk}.{m}.weight" for i in range(2) for blk, ms in
                     (("self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("mlp", ["gate_proj", "up_proj", "down_proj"]))
                     for m in ms}  # fmt: skip
    expected_adamw = {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        *(
            f"model.layers.{i}.{n}.weight"
            for i in range(2)
            for n in ("input_layernorm", "post_attention_layernorm")
        ),
    }
    assert names(model, muon) == expected_muon
    assert names(model, adamw) == expected_adamw
    assert all(p.ndim == 2 for p in muon)


def test_tied_embedding_appears_once_on_adamw():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    muon, adamw = split_muon_params(model)
    ids = [id(p) for p in muon + adamw]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert any(p is model.lm_head.weight for p in adamw)
    assert not any(p is model.lm_head.weight for p in muon)


class LinearSubclass(nn.Linear):
    """Stand-in for training.bitnet.BitLinear: an nn.Linear subclass with an extra 1-D parameter."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.gain = nn.Parameter(torch.ones(linear.out_features))


def test_swapped_projection_stays_on_muon_and_frozen_params_drop_out():
    model = tiny_llama(tie=False)
    model.model.layers[0].self_attn.q_proj = LinearSubclass(model.model.layers[0].self_attn.q_proj)
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    muon, adamw = split_muon_params(model)
    assert "model.layers.0.self_attn.q_proj.weight" in names(model, muon)
    assert "model.layers.0.self_attn.q_proj.gain" in names(model, adamw)
    assert "model.layers.1.mlp.up_proj.weight" not in names(model, muon) | names(model, adamw)


def test_embedding_inside_a_block_goes_to_adamw():
    model = nn.Sequential(nn.ModuleList([nn.Embedding(10, 4), nn.Linear(4, 4)]))
    muon, adamw = split_muon_params(model)
    assert [tuple(p.shape) for p in muon] == [(4, 4)]
    assert {tuple(p.shape) for p in adamw} == {(10, 4), (4,)}
