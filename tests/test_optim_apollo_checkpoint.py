"""APOLLO checkpoints hold plain values only (loadable with weights_only=True) and resume exactly.

Upstream keeps a GradientProjector object per low-rank parameter; training/optim/apollo.py turns it
into a plain dict in state_dict() and back in load_state_dict().
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from training.checkpoint import CheckpointManager, check_plain
from training.optim import OptimizerSpec, build_optimizer

SPEC = OptimizerSpec(name="apollo", lr=1e-3, weight_decay=0.01, apollo_rank=8)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


BATCHES = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(6)]


def step(model, opt, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


class StandInProjector:
    """Shaped like apollo_torch.random_projector.GradientProjector: plain attributes and a matrix."""

    def __init__(self, rank: int, seed: int) -> None:
        self.rank, self.seed, self.svd_count, self.proj_type = rank, seed, 0, "std"
        self.ortho_matrix = torch.randn(rank, 4)


class StandInAPOLLO(torch.optim.AdamW):
    """Keeps a projector object in the state of every low-rank parameter, as APOLLOAdamW does."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if "rank" in group and "projector" not in self.state[p]:
                    self.state[p]["projector"] = StandInProjector(group["rank"], seed=i + 1)
        return out


@pytest.fixture
def stand_in_apollo(monkeypatch):
    projector_module = types.SimpleNamespace(GradientProjector=StandInProjector)
    package = types.SimpleNamespace(APOLLOAdamW=StandInAPOLLO, random_projector=projector_module)
    monkeypatch.setitem(sys.modules, "apollo_torch", package)
    monkeypatch.setitem(sys.modules, "apollo_torch.random_projector", projector_module)


@pytest.mark.usefixtures("stand_in_apollo")
def test_projectors_are_saved_as_plain_dicts_and_rebuilt_on_load(tmp_path):
    model = tiny_llama()
    opt = build_optimizer(model, SPEC)
    step(model, opt, BATCHES[0])
    live = [s["projector"] for s in opt.state.values() if "projector" in s]
    assert live and all(isinstance(p, StandInProjector) for p in live)

    state = opt.state_dict()
    check_plain(state, "apollo state")  # what CheckpointManager.save checks before writing
    saved = [s["projector"] for s in state["state"].values() if "projector" in s]
    assert all(isinstance(p, dict) and p["apollo_projector"] == b"random" for p in saved)
    # The running optimizer keeps its objects: state_dict() copied, it did not convert in place.
    assert [s["projector"] for s in opt.state.values() if "projector" in s] == live

    ckpts = CheckpointManager(str(tmp_path / "ckpt"))
    ckpts.save("stage2-step1", {"optimizer": state})
    fresh = build_optimizer(model, SPEC)
    fresh.load_state_dict(ckpts.load_latest()["optimizer"])  # a weights_only=True load
    rebuilt = [s["projector"] for s in fresh.state.values() if "projector" in s]
    assert len(rebuilt) == len(live) and all(isinstance(p, StandInProjector) for p in rebuilt)
    for old, new in zip(live, rebuilt):
        assert (new.rank, new.seed, new.svd_count, new.proj_type) == (old.rank, old.seed, old.svd_count, old.proj_type)
        assert torch.equal(new.ortho_matrix, old.ortho_matrix)


@pytest.mark.usefixtures("stand_in_apollo")
def test_projector_of_unknown_kind_is_refused_on_load():
    model = tiny_llama()
    opt = build_optimizer(model, SPEC)
    step(model, opt, BATCHES[0])
    state = opt.state_dict()
    index = next(i for i, s in state["state"].items() if "projector" in s)
    state["state"][index]["projector"]["apollo_projector"] = b"os.system"
    with pytest.raises(ValueError, match="unknown kind 'os.system'"):
        build_optimizer(model, SPEC).load_state_dict(state)


def test_real_apollo_resumes_exactly_from_a_safe_checkpoint(tmp_path, monkeypatch):
    """With apollo-torch itself (the `apollo` extra): the projection matrices are regenerated every
    2 steps here, so a resume that lost the projector's seed would diverge from the straight run."""
    pytest.importorskip("apollo_torch", reason="needs apollo-torch (pip install -e '.[apollo]')")
    import training.optim.apollo as apollo

    monkeypatch.setattr(apollo, "_UPDATE_PROJ_GAP", 2)
    straight = tiny_llama()
    opt = build_optimizer(straight, SPEC)
    for ids in BATCHES:
        step(straight, opt, ids)

    model = tiny_llama()
    opt = build_optimizer(model, SPEC)
    for ids in BATCHES[:3]:
        step(model, opt, ids)
    ckpts = CheckpointManager(str(tmp_path / "ckpt"))
    ckpts.save("stage2-step3", {"model": model.state_dict(), "optimizer": opt.state_dict()})
    state = ckpts.load_latest()
    resumed = tiny_llama()
    resumed.load_state_dict(state["model"])
    opt = build_optimizer(resumed, SPEC)
    opt.load_state_dict(state["optimizer"])
    for ids in BATCHES[3:]:
        step(resumed, opt, ids)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
