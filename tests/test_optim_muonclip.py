"""MuonClip: the logit it records, the clip itself, and the three upstream muon-clip failure modes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from training.optim import MuonClip, OptimizerSpec, build_optimizer, head_max_logits, qk_clip_

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
LAYERS = {"model.layers.0.self_attn", "model.layers.1.self_attn"}


def tiny_llama(kv_heads: int = 4, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=256, max_position_embeddings=64, attn_implementation=attn,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def step(model, opt, ids=IDS, mask=None):
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def plant(model, layer: int, head: int, q_factor: float, k_factor: float) -> None:
    attn = model.model.layers[layer].self_attn
    rows = slice(head * attn.head_dim, (head + 1) * attn.head_dim)
    with torch.no_grad():
        attn.q_proj.weight[rows] *= q_factor
        attn.k_proj.weight[rows] *= k_factor


# -- the pure functions --------------------------------------------------------------------------


def test_head_max_logits_by_hand_causal_and_padded():
    # 3 tokens, 2 query heads sharing 1 key head (GQA), head_dim 2, scaling 0.5.
    q = torch.tensor([[[1.0, 0, 0, 1], [2, 0, 0, -1], [0, 0, 3, 3]]])
    k = torch.tensor([[[1.0, 1], [-1, 2], [10, 10]]])
    # head 0: allowed logits 0.5, 1.0, -1.0, 0, 0, 0 -> 1.0 (10.0 if the future key t2 leaked in)
    # head 1: 0.5, -0.5, -1.0, 3.0, 1.5, 30.0 -> 30.0; without key t2 (padding) -> 3.0
    causal = head_max_logits(q, k, head_dim=2, scaling=0.5)
    assert causal.tolist() == pytest.approx([1.0, 30.0])
    padded = head_max_logits(q, k, head_dim=2, scaling=0.5, mask=torch.tensor([[1, 1, 0]]))
    assert padded.tolist() == pytest.approx([1.0, 3.0])


def logits_per_head(x, wq, wk, bq, bk, d):
    q = F.linear(x, wq, bq).view(x.shape[0], -1, d)
    k = F.linear(x, wk, bk).view(x.shape[0], -1, d)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.einsum("ihd,jhd->hij", q, k)


def test_qk_clip_mha_scales_only_offending_heads_by_sqrt_eta():
    torch.manual_seed(0)
    d, x = 2, torch.randn(5, 3)
    wq, wk, bq, bk = torch.randn(8, 3), torch.randn(8, 3), torch.randn(8), torch.randn(8)
    before = logits_per_head(x, wq, wk, bq, bk, d)
    wq0, wk0 = wq.clone(), wk.clone()
    eta = qk_clip_(wq, wk, torch.tensor([200.0, 50.0, 400.0, 100.0]), 100.0, d, q_bias=bq, k_bias=bk)
    assert eta.tolist() == pytest.approx([0.5, 1.0, 0.25, 1.0])
    after = logits_per_head(x, wq, wk, bq, bk, d)
    assert torch.allclose(after, before * eta[:, None, None], atol=1e-5)
    for h, e in enumerate(eta.tolist()):
        rows = slice(h * d, (h + 1) * d)
        assert torch.allclose(wq[rows], wq0[rows] * e**0.5) and torch.allclose(wk[rows], wk0[rows] * e**0.5)
    assert torch.equal(wq[2:4], wq0[2:4]) and torch.equal(wk[6:8], wk0[6:8])


def test_qk_clip_gqa_leaves_shared_keys_alone():
    torch.manual_seed(1)
    d, x = 2, torch.randn(5, 3)
    wq, wk = torch.randn(8, 3), torch.randn(4, 3)  # 4 query heads, 2 key heads
    before = logits_per_head(x, wq, wk, None, None, d)
    wk0 = wk.clone()
    eta = qk_clip_(wq, wk, torch.tensor([10.0, 40.0, 1.0, float("-inf")]), 20.0, d)
    assert eta.tolist() == pytest.approx([1.0, 0.5, 1.0, 1.0])
    assert torch.equal(wk, wk0)
    assert torch.allclose(logits_per_head(x, wq, wk, None, None, d), before * eta[:, None, None], atol=1e-5)


# -- the optimizer on a model -------------------------------------------------------------------


def test_recorded_max_equals_the_softmax_input(monkeypatch):
    """Post-RoPE, scaled, masked logits: compared with what eager attention actually feeds softmax."""
    model = tiny_llama(kv_heads=2, attn="eager")
    opt = MuonClip(model, lr=1e-3, adamw_lr=1e-4, tau=100.0)
    captured, real_softmax = [], F.softmax

    def spy(x, *args, **kwargs):
        if x.dim() == 4:
            captured.append(x.detach().float())
        return real_softmax(x, *args, **kwargs)

    mask = torch.ones_like(IDS)
    mask[1, :4] = 0  # left padding in the second row
    monkeypatch.setattr(F, "softmax", spy)
    model.train()
    model(input_ids=IDS, attention_mask=mask, labels=IDS).loss.backward()
    monkeypatch.undo()
    opt.step()
    got = opt.max_logits_per_head()
    assert set(got) == LAYERS and len(captured) == 2
    for i, logits in enumerate(captured):
        assert torch.allclose(
            got[f"model.layers.{i}.self_attn"], logits.amax(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_planted_large_logit_is_clipped_and_other_heads_kept(kv_heads):
    model = tiny_llama(kv_heads=kv_heads)
    # Planted in the last layer, so no clipped head feeds another layer's logits.
    # MHA: q and k rows of head 1 x30 -> logits x900. GQA: q only (its key head is shared) x900.
    mha = kv_heads == 4
    plant(model, layer=1, head=1, q_factor=30.0 if mha else 900.0, k_factor=30.0 if mha else 1.0)
    tau, last = 1.0, "model.layers.1.self_attn"
    # A tiny lr so Muon's own update cannot move the logits noticeably; the clip is what changes them.
    opt = build_optimizer(model, OptimizerSpec(name="muonclip", lr=1e-7, adamw_lr=1e-8, qk_clip_tau=tau))
    k_before = model.model.layers[1].self_attn.k_proj.weight.detach().clone()
    step(model, opt)
    first = opt.max_logits_per_head()
    assert first[last][1] > 10 * tau
    assert bool((torch.cat([first[last][[0, 2, 3]], first["model.layers.0.self_attn"]]) < tau).all())
    step(model, opt)
    second = opt.max_logits_per_head()
    assert tau * 0.99 <= second[last][1] <= tau * 1.01
    assert torch.allclose(second[last][[0, 2, 3]], first[last][[0, 2, 3]], rtol=1e-3)
    assert torch.allclose(second["model.layers.0.self_attn"], first["model.layers.0.self_attn"], rtol=1e-3)
    if not mha:
        assert torch.allclose(model.model.layers[1].self_attn.k_proj.weight, k_before, atol=1e-6)
    assert opt.max_logits()[last] == pytest.approx(float(second[last].max()))


def test_hooks_survive_eval_train_cycles_and_reattach_is_idempotent():
    """Upstream bug 1: an eval() -> train() cycle left muon-clip without hooks (KeyError in step)."""
    model = tiny_llama()
    opt = MuonClip(model, lr=1e-3, adamw_lr=1e-4)
    attn = model.model.layers[0].self_attn
    for _ in range(3):
        model.eval()
        with torch.no_grad():
            model(input_ids=IDS)
        opt.step()
        assert opt.max_logits() == {}  # eval forwards are not recorded
        step(model, opt)
        assert set(opt.max_logits()) == LAYERS
    opt.reattach_hooks(model)
    opt.reattach_hooks(model)
    counts = (len(attn._forward_pre_hooks), len(attn.q_proj._forward_hooks), len(attn.k_proj._forward_hooks))
    assert counts == (1, 1, 1)
    step(model, opt)
    assert set(opt.max_logits()) == LAYERS


class TernaryLinear(nn.Linear):
    """Stand-in for training.bitnet.BitLinear: absmean ternary weights with a straight-through gradient."""

    def forward(self, x):
        s = self.weight.abs().mean().clamp(min=1e-5)
        w_q = (self.weight / s).round().clamp(-1, 1) * s
        return F.linear(x, self.weight + (w_q - self.weight).detach(), self.bias)


def to_ternary(linear: nn.Linear) -> TernaryLinear:
    new = TernaryLinear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    new.load_state_dict(linear.state_dict())
    return new


def test_hooks_follow_modules_swapped_before_build_and_reject_stale_swaps():
    model = tiny_llama()
    for layer in model.model.layers:
        layer.self_attn.q_proj = to_ternary(layer.self_attn.q_proj)
        layer.self_attn.k_proj = to_ternary(layer.self_attn.k_proj)
    opt = build_optimizer(model, OptimizerSpec(name="muonclip", lr=1e-3))
    assert len(model.model.layers[0].self_attn.q_proj._forward_hooks) == 1
    step(model, opt)
    assert set(opt.max_logits()) == LAYERS
    model.model.layers[0].self_attn.q_proj = to_ternary(model.model.layers[0].self_attn.q_proj)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight is not optimised"):
        opt.reattach_hooks(model)


@pytest.mark.parametrize("mode", ["bf16_weights", "autocast"])
def test_bf16_activations_are_recorded_and_clipped(mode):
    """Upstream bug 3: bf16 activations (AMP) met float32 clip math and crashed with a dtype mismatch."""
    model = tiny_llama()
    if mode == "bf16_weights":
        model = model.to(torch.bfloat16)
    plant(model, layer=1, head=2, q_factor=30.0, k_factor=30.0)
    opt = build_optimizer(model, OptimizerSpec(name="muonclip", lr=1e-6, adamw_lr=1e-7, qk_clip_tau=1.0))
    seen_dtypes = set()
    model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, out: seen_dtypes.add(out.dtype))
    for i in range(2):
        # Autocast around the forward only, as AMP is used: its weight-cast cache would otherwise
        # hide any in-place weight change (optimizer update or clip) until the context exits.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            assert float(opt.max_logits_per_head()["model.layers.1.self_attn"][2]) > 10.0
    assert seen_dtypes == {torch.bfloat16}
    maxima = opt.max_logits_per_head()
    assert all(torch.isfinite(m).all() for m in maxima.values())
    assert float(maxima["model.layers.1.self_attn"][2]) <= 1.05
    expected = torch.bfloat16 if mode == "bf16_weights" else torch.float32
    assert all(p.dtype == expected for p in model.parameters())


def test_unsupported_attention_is_rejected():
    qwen3 = Qwen3ForCausalLM(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64))  # fmt: skip
    with pytest.raises(ValueError, match="q_norm"):
        MuonClip(qwen3, lr=1e-3, adamw_lr=1e-4)
    mlp = nn.Sequential(nn.ModuleList([nn.Linear(4, 4)]))
    with pytest.raises(ValueError, match="no attention module"):
        MuonClip(mlp, lr=1e-3, adamw_lr=1e-4)
    with pytest.raises(ValueError, match="qk_clip_tau"):
        MuonClip(tiny_llama(), lr=1e-3, adamw_lr=1e-4, tau=0.0)


def test_distributed_maxima_are_all_reduced_before_clipping(monkeypatch):
    """Under torch.distributed each replica must clip with the global max, or DDP replicas diverge.

    A forked 2-process gloo run deadlocks once torch's thread pool is up, so the collective is faked:
    the "other rank" saw a logit of 50 on layer 0, head 3, which this rank's data never produced.
    """
    import training.optim.muonclip as muonclip_module

    calls = []

    def fake_all_reduce(tensor, op):
        calls.append(op)
        peer = torch.full_like(tensor, float("-inf"))
        peer[3] = 50.0
        tensor.copy_(torch.maximum(tensor, peer))

    monkeypatch.setattr(muonclip_module, "_distributed", lambda: True)
    monkeypatch.setattr(muonclip_module.dist, "all_reduce", fake_all_reduce)
    model = tiny_llama()
    opt = MuonClip(model, lr=1e-7, adamw_lr=1e-8, tau=1.0)
    attn = model.model.layers[0].self_attn
    rows = slice(3 * attn.head_dim, 4 * attn.head_dim)
    w_before = attn.q_proj.weight[rows].detach().clone()
    step(model, opt)
    assert calls == [muonclip_module.dist.ReduceOp.MAX]
    assert opt.max_logits_per_head()["model.layers.0.self_attn"][3] == 50.0
    # Local logits are ~0.1 < tau, yet head 3's rows were scaled by sqrt(1 / 50) because of the peer.
    ratio = attn.q_proj.weight[rows].detach() / w_before
    assert torch.allclose(ratio, torch.full_like(ratio, (1 / 50) ** 0.5), rtol=1e-3)
