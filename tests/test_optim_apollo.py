"""APOLLO: the missing-package error, and the param groups handed to apollo_torch.APOLLOAdamW."""

import sys
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from training.optim import OptimizerSpec, build_optimizer, split_muon_params


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def test_missing_package_gives_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "apollo_torch", None)  # import fails as if not installed
    with pytest.raises(ImportError) as err:
        build_optimizer(tiny_llama(), OptimizerSpec(name="apollo", lr=7.5e-5))
    msg = str(err.value)
    assert "\n" not in msg and "pip install apollo-torch" in msg and "'apollo'" in msg


class RecordingAPOLLO(torch.optim.AdamW):
    """Takes APOLLOAdamW's constructor arguments (apollo_torch/apollo.py) and keeps them for inspection."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        self.kwargs = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


@pytest.fixture
def fake_apollo(monkeypatch):
    monkeypatch.setitem(sys.modules, "apollo_torch", types.SimpleNamespace(APOLLOAdamW=RecordingAPOLLO))


@pytest.mark.usefixtures("fake_apollo")
def test_low_rank_groups_hold_the_block_matrices_with_clamped_rank():
    model = tiny_llama()
    opt = build_optimizer(model, OptimizerSpec(name="apollo", lr=7.5e-5, weight_decay=0.01, apollo_rank=100))
    assert opt.kwargs == dict(lr=7.5e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    low_rank = [g for g in opt.param_groups if "rank" in g]
    matrices, rest = split_muon_params(model)
    assert {id(p) for g in low_rank for p in g["params"]} == {id(p) for p in matrices}
    # k/v projections are 32 x 64 (GQA) and the rest 64-wide: ranks clamp to 32 and 64, never above 100.
    assert sorted(g["rank"] for g in low_rank) == [32, 64]
    for g in low_rank:
        assert all(min(p.shape) >= g["rank"] for p in g["params"])
        assert (g["proj"], g["scale_type"], g["scale"], g["proj_type"]) == ("random", "channel", 1.0, "std")
    plain = [g for g in opt.param_groups if "rank" not in g]
    assert {id(p) for g in plain for p in g["params"]} == {id(p) for p in rest}
    assert {g["weight_decay"] for g in plain} == {0.01, 0.0}


@pytest.mark.usefixtures("fake_apollo")
def test_rank_one_is_apollo_mini():
    opt = build_optimizer(tiny_llama(), OptimizerSpec(name="apollo", lr=1e-4, apollo_rank=1))
    low_rank = [g for g in opt.param_groups if "rank" in g]
    assert [(g["rank"], g["scale_type"], g["scale"]) for g in low_rank] == [(1, "tensor", 128.0)]
