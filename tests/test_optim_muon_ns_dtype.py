"""optimizer.ns_dtype: Muon's Newton-Schulz in float32 (opt-in; bfloat16 stays torch.optim.Muon's)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_optim_muon import BATCHES, tiny_llama
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz

from training.config import ConfigError, compose_config
from training.optim import OptimizerSpec, build_optimizer
from training.optim.muon_gathered import newton_schulz_fp32

COEFFS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_fp32_iteration_is_torch_muons_up_to_bf16_rounding(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz_fp32(g, COEFFS, 5, 1e-7)
    ref = _zeropower_via_newtonschulz(g, COEFFS, 5, 1e-7).float()
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert 1e-6 < rel < 0.05  # differs (not bf16), but only by bf16's rounding
    # Run in float64 the same iteration agrees with ours to float32 precision.
    exact = newton_schulz_fp32(g.double(), COEFFS, 5, 1e-7)  # .float() inside: float32 again
    assert torch.equal(exact, ours)


def _step(ns_dtype):
    model = tiny_llama()
    opt = build_optimizer(model, OptimizerSpec(name="muon", lr=3e-3, ns_dtype=ns_dtype))
    before = copy.deepcopy(model.state_dict())
    model(input_ids=BATCHES[0], labels=BATCHES[0]).loss.backward()
    opt.step()
    return type(opt._muon).__name__, before, model.state_dict()


def test_float32_step_is_close_to_the_bfloat16_step():
    name16, before, after16 = _step("bfloat16")
    name32, _, after32 = _step("float32")
    assert (name16, name32) == ("Muon", "GatheredMuon")
    key = "model.layers.0.mlp.up_proj.weight"
    d16, d32 = after16[key] - before[key], after32[key] - before[key]
    assert not torch.equal(d16, d32)
    # Same direction and scale; the bf16 rounding of a real gradient's small singular directions, which
    # the iteration amplifies, is what differs (~23% of the update's norm here).
    assert torch.nn.functional.cosine_similarity(d16.flatten(), d32.flatten(), dim=0) > 0.95
    assert d32.norm() / d16.norm() == pytest.approx(1.0, abs=0.05)


def test_ns_dtype_is_a_checked_config_choice():
    assert compose_config([]).stage2.optimizer.ns_dtype == "bfloat16"
    assert compose_config(["stage2.optimizer.ns_dtype=float32"]).stage2.optimizer.ns_dtype == "float32"
    with pytest.raises(ConfigError, match=r"^stage1_9\.optimizer\.ns_dtype: got 'fp16', allowed: bfloat16, float32"):
        compose_config(["stage1_9.optimizer.ns_dtype=fp16"])
    with pytest.raises(ValueError, match="ns_dtype='fp16' is not allowed"):
        OptimizerSpec(name="muon", lr=1e-3, ns_dtype="fp16")
