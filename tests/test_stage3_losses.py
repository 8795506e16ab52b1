"""Every Stage 3 loss term against a hand computation (float64 loops), on small random Llamas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from training.conf.schema import Stage3Config
from training.distill.attention import AttentionDistillLoss, attention_map_kl, relation_kl
from training.stages import stage3 as s3

B, T, HQ, HKV, HD = 2, 7, 4, 2, 8


def _models(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=61,
        hidden_size=HQ * HD,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=HQ,
        num_key_value_heads=HKV,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    teacher = LlamaForCausalLM(config).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher).train()
    with torch.no_grad():
        for p in student.parameters():
            p.requires_grad_(True)
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 61, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # right padding in the second row
    labels = ids.clone()
    labels[:, :3] = -100  # "prompt"
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def _relation_row(x, i, r, dr, keys):
    """softmax over keys j of <x_i, x_j> / sqrt(d_r) within relation head r (python floats)."""
    qi = x[i][r * dr : (r + 1) * dr]
    return _softmax(
        [sum(u * v for u, v in zip(qi, x[j][r * dr : (r + 1) * dr])) / math.sqrt(dr) for j in keys]
    )


def hand_relation_kl(s, t, heads, mask):
    """MiniLMv2 relation KL: loops over batch, relation head, valid query row; valid keys only."""
    s, t = s.double().tolist(), t.double().tolist()
    d = len(s[0][0])
    dr = d // heads
    total, rows = 0.0, 0
    for b in range(len(s)):
        valid = [j for j in range(len(s[b])) if mask[b][j]]
        for r in range(heads):
            for i in valid:
                p_t, p_s = (_relation_row(x[b], i, r, dr, valid) for x in (t, s))
                total += _kl(p_t, p_s)
                rows += 1
    return total / rows


def _qkv_by_hand(model, batch, layer=-1):
    """q/k/v projection outputs of attention ``layer``, from the layer's input hidden state."""
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    )
    idx = layer % len(model.model.layers)
    block = model.model.layers[idx]
    x = block.input_layernorm(out.hidden_states[idx])
    a = block.self_attn
    return {w: getattr(a, f"{w}_proj")(x) for w in ("q", "k", "v")}, out


def test_relation_kl_matches_hand_computation_with_padding():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(B, T, 16, generator=g), torch.randn(B, T, 16, generator=g)
    mask = _batch()["attention_mask"]
    got = relation_kl(s, t, heads=4, attention_mask=mask)
    assert float(got) == pytest.approx(hand_relation_kl(s, t, 4, mask.tolist()), rel=1e-5)
    # Padded positions carry no signal: changing them does not change the loss.
    s2, t2 = s.clone(), t.clone()
    s2[1, 4:] += 100.0
    t2[1, 4:] -= 50.0
    assert float(relation_kl(s2, t2, 4, mask)) == pytest.approx(float(got), rel=1e-6)
    assert float(relation_kl(t, t, 4, mask)) == pytest.approx(0.0, abs=1e-6)


def test_attention_map_kl_matches_hand_computation():
    """MiniLM variant: per-head causal attention distributions after RoPE, GQA keys shared."""
    teacher, student = _models()
    batch = _batch()
    mask = batch["attention_mask"]
    rotary = teacher.model.rotary_emb
    pos = torch.arange(T)[None].expand(B, T)
    states = []
    for m in (student, teacher):
        qkv, _ = _qkv_by_hand(m, batch)
        cos, sin = rotary(qkv["q"], pos)
        states.append({**qkv, "rope": (cos, sin)})
    got = attention_map_kl(states[0], states[1], HD, HD**-0.5, apply_rotary_pos_emb, mask)

    def heads(x, n):
        return x.detach().double().view(B, T, n, HD).transpose(1, 2)

    total, rows = 0.0, 0
    dists = []
    for st in states:
        cos, sin = st["rope"]
        q, k = apply_rotary_pos_emb(heads(st["q"], HQ), heads(st["k"], HKV), cos.double(), sin.double())
        dists.append((q, k))
    for b in range(B):
        valid = [j for j in range(T) if mask[b, j]]
        for h in range(HQ):
            kv = h // (HQ // HKV)
            for i in valid:
                keys = [j for j in valid if j <= i]
                p = [_softmax([float(q[b, h, i] @ k[b, kv, j]) * HD**-0.5 for j in keys]) for q, k in dists]
                total += _kl(p[1], p[0])
                rows += 1
    assert float(got.detach()) == pytest.approx(total / rows, rel=1e-5)


def _cfg(**loss):
    base = OmegaConf.structured(Stage3Config)
    base.loss = OmegaConf.merge(base.loss, loss)
    return OmegaConf.create({"stage3": base})


@pytest.mark.parametrize("scale_by_t2", [False, True])
def test_stage3_loss_is_ce_plus_weighted_kd_plus_weighted_relations(scale_by_t2):
    teacher, student = _models()
    batch = _batch()
    lam, gamma, temp = 3.0, 7.0, 2.0
    cfg = _cfg(logits_weight=lam, attention_weight=gamma, temperature=temp, kd_scale_by_t2=scale_by_t2)
    loss3 = s3.make_loss_fn(cfg, student, teacher)
    try:
        loss, parts = loss3.fn(batch)
    finally:
        loss3.close()

    mask = batch["attention_mask"]
    s_qkv, s_out = _qkv_by_hand(student, batch)
    with torch.no_grad():
        t_qkv, t_out = _qkv_by_hand(teacher, batch)
    # CE: next-token cross-entropy on the labelled (answer) positions only.
    logits, labels = s_out.logits.detach().double(), batch["labels"]
    terms = [
        -torch.log_softmax(logits[b, i], -1)[labels[b, i + 1]]
        for b in range(B)
        for i in range(T - 1)
        if labels[b, i + 1] != -100
    ]
    ce = float(sum(terms) / len(terms))
    # KD: KL(softmax(t/T) || softmax(s/T)) per valid position, averaged; optionally x T^2.
    kls = []
    for b in range(B):
        for i in range(T):
            if mask[b, i]:
                p = _softmax((t_out.logits[b, i].double() / temp).tolist())
                q = _softmax((s_out.logits[b, i].double() / temp).tolist())
                kls.append(_kl(p, q))
    kd = sum(kls) / len(kls) * (temp**2 if scale_by_t2 else 1.0)
    # AD: Q, K and V relation KLs at the last layer, summed; relation heads = attention heads.
    ad = sum(hand_relation_kl(s_qkv[w], t_qkv[w], HQ, mask.tolist()) for w in ("q", "k", "v"))

    assert parts["ce"] == pytest.approx(ce, rel=1e-5)
    assert parts["kd"] == pytest.approx(kd, rel=1e-4)
    assert parts["attn"] == pytest.approx(ad, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(ce + lam * kd + gamma * ad, rel=1e-5)
    assert kd > 0 and ad > 0
    # The loss trains the student only.
    loss.backward()
    assert student.model.layers[-1].self_attn.q_proj.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_attention_distillation_layer_and_errors():
    teacher, student = _models()
    batch = _batch()
    # distill_layer=0 hooks the first attention layer: the loss is the hand value of that layer.
    ad = AttentionDistillLoss(student, teacher, layer=0)
    try:
        student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        got = float(ad(batch["attention_mask"]).detach())
    finally:
        ad.remove()
    s_qkv, _ = _qkv_by_hand(student, batch, layer=0)
    t_qkv, _ = _qkv_by_hand(teacher, batch, layer=0)
    mask = batch["attention_mask"].tolist()
    want = sum(hand_relation_kl(s_qkv[w], t_qkv[w], HQ, mask) for w in ("q", "k", "v"))
    assert got == pytest.approx(want, rel=1e-4)

    with pytest.raises(ValueError, match=r"^stage3.loss.distill_layer: 2 is out of range .* use -2..1$"):
        AttentionDistillLoss(student, teacher, layer=2)
    # K/V are 16 wide (2 KV heads x 8): 3 relation heads cannot split them.
    bad = AttentionDistillLoss(student, teacher, relation_heads=3)
    try:
        student(input_ids=batch["input_ids"])
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"])
        with pytest.raises(
            ValueError, match=r"stage3.loss.relation_heads: 3 does not divide the q_proj width 32"
        ):
            bad()
    finally:
        bad.remove()
    # Hooks are gone after remove(): a forward leaves nothing captured.
    student(input_ids=batch["input_ids"])
    assert bad.student.states == {}


def test_minilm_variant_runs_through_the_stage3_loss():
    teacher, student = _models()
    batch = _batch()
    loss3 = s3.make_loss_fn(_cfg(use_relation_distill=False, logits_weight=0.0), student, teacher)
    try:
        loss, parts = loss3.fn(batch)
    finally:
        loss3.close()
    assert set(parts) == {"ce", "attn"} and parts["attn"] > 0
    assert float(loss.detach()) == pytest.approx(parts["ce"] + parts["attn"], rel=1e-6)
