"""build_optimizer for adamw/muon/muonclip: groups, lr semantics, checkpoint round trip, scheduler reach."""

import copy
import io

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from training.optim import (
    ADAMW_LR_RATIO,
    MUON_ADJUST_LR_FN,
    OPTIMIZER_NAMES,
    SCHEDULE_NAMES,
    OptimizerSpec,
    build_optimizer,
    build_scheduler,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


BATCHES = [torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def train_step(model, opt, sched, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def spec_for(name: str) -> OptimizerSpec:
    # muonclip with a tau below the tiny model's natural logits (~0.1), so clipping runs every step.
    return OptimizerSpec(name=name, lr=3e-3, weight_decay=0.01, warmup_steps=1, qk_clip_tau=0.05)


def test_muon_groups_and_defaults():
    spec = OptimizerSpec(name="muon", lr=3e-3, weight_decay=0.1)
    opt = build_optimizer(tiny_llama(), spec)
    parts = [(g["part"], g["lr"], g["weight_decay"]) for g in opt.param_groups]
    assert parts == [
        ("muon", 3e-3, 0.1),
        ("adamw", 3e-3 * ADAMW_LR_RATIO, 0.1),
        ("adamw", 3e-3 * ADAMW_LR_RATIO, 0.0),
    ]
    assert opt.param_groups[0]["adjust_lr_fn"] == MUON_ADJUST_LR_FN == "match_rms_adamw"
    assert all(p.ndim < 2 for p in opt.param_groups[2]["params"])
    explicit = build_optimizer(tiny_llama(), OptimizerSpec(name="muon", lr=3e-3, adamw_lr=1e-3))
    assert [g["lr"] for g in explicit.param_groups[1:]] == [1e-3, 1e-3]


def test_first_step_sizes_follow_match_rms_adamw_and_adamw_lr():
    model = tiny_llama()
    spec = OptimizerSpec(name="muon", lr=1e-2, adamw_lr=1e-3)
    opt = build_optimizer(model, spec)
    q = model.model.layers[0].self_attn.q_proj.weight
    emb = model.model.embed_tokens.weight
    q0, emb0 = q.detach().clone(), emb.detach().clone()
    ids = BATCHES[0]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    # Muon under match_rms_adamw: update RMS ~= 0.2 * lr (Newton-Schulz gives singular values in ~[0.7, 1.2]).
    rms = (q.detach() - q0).pow(2).mean().sqrt().item()
    assert 0.1 * spec.lr < rms < 0.3 * spec.lr
    # AdamW's first step moves every entry with a nonzero gradient by adamw_lr (m / sqrt(v) = sign(g)).
    moved = (emb.detach() - emb0).abs()
    assert moved.max().item() == pytest.approx(1e-3, rel=1e-3)
    # Only tokens before the last position get a gradient (the last position predicts no label).
    used = ids[:, :-1].unique()
    assert bool((moved[used] > 0).all())


@pytest.mark.parametrize("name", ["adamw", "muon", "muonclip"])
def test_state_dict_round_trip_matches_uninterrupted(name):
    spec = spec_for(name)
    model = tiny_llama()
    opt = build_optimizer(model, spec)
    sched = build_scheduler(opt, spec, total_steps=len(BATCHES))
    for ids in BATCHES[:2]:
        train_step(model, opt, sched, ids)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    for ids in BATCHES[2:]:
        train_step(model, opt, sched, ids)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # the Muon optimizers' state is plain tensors
    resumed = tiny_llama(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(resumed, spec)
    sched2 = build_scheduler(opt2, spec, total_steps=len(BATCHES))
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    for ids in BATCHES[2:]:
        train_step(resumed, opt2, sched2, ids)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


def test_loaded_optimizer_still_obeys_group_lrs():
    model = tiny_llama()
    spec = OptimizerSpec(name="muon", lr=3e-3, weight_decay=0.1)
    opt = build_optimizer(model, spec)
    sched = build_scheduler(opt, spec, total_steps=10)
    train_step(model, opt, sched, BATCHES[0])
    opt2 = build_optimizer(model, spec)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for g in opt2.param_groups:
        g["lr"] = 0.0  # what a scheduler at factor 0 would write: both parts must then stand still
    before = [p.detach().clone() for p in model.parameters()]
    model(input_ids=BATCHES[1], labels=BATCHES[1]).loss.backward()
    opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_scheduler_scales_both_parts():
    model = tiny_llama()
    spec = OptimizerSpec(
        name="muonclip", lr=4e-3, adamw_lr=2e-3, warmup_steps=2, schedule="linear", min_lr_ratio=0.1
    )
    opt = build_optimizer(model, spec)
    sched = build_scheduler(opt, spec, total_steps=5)
    seen = []
    for ids in BATCHES:
        seen.append([g["lr"] for g in opt.param_groups])
        train_step(model, opt, sched, ids)
    seen.append([g["lr"] for g in opt.param_groups])
    factors = [0.5, 1.0, 1.0, 0.55, 0.1]
    for lrs, f in zip(seen, factors):
        assert lrs == pytest.approx([4e-3 * f, 2e-3 * f, 2e-3 * f])


def test_spec_names_and_validation():
    assert OPTIMIZER_NAMES == ("adamw", "muon", "muonclip", "apollo")
    assert SCHEDULE_NAMES == ("cosine", "linear", "constant")
    with pytest.raises(ValueError, match=r"'sgd'.*adamw.*muonclip.*apollo"):
        OptimizerSpec(name="sgd", lr=1e-3)
    with pytest.raises(ValueError, match=r"'step'.*cosine.*linear.*constant"):
        OptimizerSpec(name="muon", lr=1e-3, schedule="step")
    for bad in (dict(lr=0.0), dict(lr=1e-3, betas=(0.9, 1.0)), dict(lr=1e-3, apollo_rank=0),
                dict(lr=1e-3, min_lr_ratio=1.5), dict(lr=1e-3, adamw_lr=-1.0), dict(lr=1e-3, warmup_steps=-1)):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(k for k in bad if k != "lr"), "lr")):
            OptimizerSpec(name="muon", **bad)
