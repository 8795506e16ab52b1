"""LayerwiseDistillLoss against hand computations on small explicit tensors."""

import math

import pytest
import torch
from torch import nn

from training.distill import LAYER_WEIGHTINGS, LOSS_TYPES, LayerwiseDistillLoss

# Three tokens of hidden size 4; the third is padding and holds arbitrary values that must not count.
MASK = torch.tensor([[1, 1, 0]])
EMBED_S = torch.full((1, 3, 4), 100.0)  # index 0 (embedding output): wildly different, must be skipped
EMBED_T = torch.full((1, 3, 4), -100.0)
STUDENT = [
    torch.tensor([[[3.0, 4, 0, 0], [1, 0, 0, 0], [5, 5, 5, 5]]]),
    torch.tensor([[[1.0, 1, 1, 1], [0, 0, 3, 0], [0, 9, 0, 0]]]),
    torch.tensor([[[0.0, 1, 0, 0], [2, 0, 0, 0], [7, -7, 7, 1]]]),
]
TEACHER = [
    torch.tensor([[[4.0, 3, 0, 0], [0, 2, 0, 0], [-1, 7, 0, 2]]]),
    torch.tensor([[[2.0, 2, 2, 2], [0, 0, 0, 4], [3, 3, 3, 3]]]),
    torch.tensor([[[0.0, 1, 0, 0], [-2, 0, 0, 0], [0, 0, 0, 0]]]),
]
# Per-layer means over the two valid tokens, worked out by hand:
#   mse: L1 ((1+1)/4, (1+4)/4), L2 (4/4, (9+16)/4), L3 (0, 16/4)
#   normalised: L1 [.6,.8] vs [.8,.6] -> .08/4 and orthogonal units -> 2/4; L2 parallel -> 0, orthogonal -> .5;
#               L3 identical -> 0, opposite -> 4/4
#   cosine: L1 (1-24/25, 1), L2 (0, 1), L3 (0, 2); inner_product: L1 (-.96, 0), L2 (-1, 0), L3 (-1, 1)
PER_LAYER = {
    "mse": [0.875, 3.625, 2.0],
    "mse_normalized": [0.26, 0.25, 0.5],
    "cosine": [0.52, 0.5, 1.0],
    "inner_product": [-0.48, -0.5, 0.0],
}


def hf_tuple(layers, embed):
    return (embed, *layers)


@pytest.mark.parametrize("loss_type", sorted(PER_LAYER))
def test_each_loss_type_uniform_matches_hand_value(loss_type):
    loss = LayerwiseDistillLoss(loss_type=loss_type, layer_weights="uniform")
    got = loss(hf_tuple(STUDENT, EMBED_S), hf_tuple(TEACHER, EMBED_T), MASK)
    assert got.item() == pytest.approx(sum(PER_LAYER[loss_type]) / 3, abs=1e-6)


@pytest.mark.parametrize(
    ("weighting", "expected"),
    [
        ("uniform", (0.875 + 3.625 + 2.0) / 3),
        ("progressive", (1 * 0.875 + 2 * 3.625 + 3 * 2.0) / 6),
        ("exponential", (1 * 0.875 + 2 * 3.625 + 4 * 2.0) / 7),
        ([1.0, 0.0, 1.0], (0.875 + 2.0) / 2),
        ([2, 1, 1], (2 * 0.875 + 3.625 + 2.0) / 4),
    ],
)
def test_each_layer_weighting_matches_hand_value(weighting, expected):
    loss = LayerwiseDistillLoss(loss_type="mse", layer_weights=weighting)
    got = loss(hf_tuple(STUDENT, EMBED_S), hf_tuple(TEACHER, EMBED_T), MASK)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_without_embedding_entry_compares_every_given_state():
    loss = LayerwiseDistillLoss(loss_type="cosine", layer_weights="uniform", includes_embeddings=False)
    assert loss(STUDENT, TEACHER, MASK).item() == pytest.approx(sum(PER_LAYER["cosine"]) / 3, abs=1e-6)


def test_no_mask_counts_every_token():
    s, t = [STUDENT[0][:, :2]], [TEACHER[0][:, :2]]
    loss = LayerwiseDistillLoss(loss_type="mse", layer_weights="uniform", includes_embeddings=False)
    assert loss(s, t, None).item() == pytest.approx(0.875, abs=1e-6)
    # With the padded token counted, layer 1's mse becomes (0.5 + 1.25 + (36+4+25+9)/4) / 3.
    full = loss([STUDENT[0]], [TEACHER[0]], None).item()
    assert full == pytest.approx((0.5 + 1.25 + 74 / 4) / 3, abs=1e-6)


def test_kl_through_teacher_head_matches_hand_value():
    # W = 2I and T = 2, so the tempered logits are the hidden states themselves.
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(2 * torch.eye(2))
    s = torch.tensor([[[0.0, 0.0], [9.0, -9.0]]])  # second token is padding
    t = torch.tensor([[[0.0, math.log(3.0)], [-9.0, 9.0]]])
    embed = torch.zeros(1, 2, 2)
    mask = torch.tensor([[1, 0]])
    # p_t = (1/4, 3/4), p_s = (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    loss = LayerwiseDistillLoss(loss_type="kl", layer_weights="uniform", temperature=2.0)
    assert loss((embed, s), (embed, t), mask, lm_head=head).item() == pytest.approx(expected, abs=1e-6)
    assert loss((embed, s), (embed, t), mask, lm_head=head.weight).item() == pytest.approx(expected, abs=1e-6)


def test_gradient_reaches_student_only_and_padding_gets_none():
    s = [x.clone().requires_grad_(True) for x in STUDENT]
    t = [x.clone().requires_grad_(True) for x in TEACHER]
    LayerwiseDistillLoss("mse_normalized", "progressive", includes_embeddings=False)(s, t, MASK).backward()
    assert all(x.grad is None for x in t)
    assert all(float(x.grad[0, 2].abs().sum()) == 0.0 for x in s)
    assert float(s[0].grad[0, :2].abs().sum()) > 0


def test_bf16_inputs_give_float32_loss_close_to_fp32():
    torch.manual_seed(0)
    s = [torch.randn(2, 5, 16) for _ in range(3)]
    t = [x + 0.1 * torch.randn_like(x) for x in s]
    loss = LayerwiseDistillLoss("mse_normalized", "exponential")
    ref = loss(s, t, None)
    got = loss([x.bfloat16() for x in s], [x.bfloat16() for x in t], None)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=0.05)


def test_allowed_name_tuples():
    assert set(LOSS_TYPES) == {"mse_normalized", "cosine", "mse", "kl", "inner_product"}
    assert set(LAYER_WEIGHTINGS) == {"uniform", "progressive", "exponential"}


def test_bad_loss_type_names_value_and_allowed():
    with pytest.raises(ValueError, match=r"'mae'.*mse_normalized.*inner_product"):
        LayerwiseDistillLoss(loss_type="mae")


@pytest.mark.parametrize("bad", ["linear", [], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]])
def test_bad_layer_weights_rejected(bad):
    with pytest.raises(ValueError, match="layer_weights"):
        LayerwiseDistillLoss(layer_weights=bad)


def test_bad_weighting_name_lists_allowed():
    with pytest.raises(ValueError, match=r"'linear'.*uniform.*progressive.*exponential"):
        LayerwiseDistillLoss(layer_weights="linear")


def test_wrong_list_length_names_both_counts():
    loss = LayerwiseDistillLoss(layer_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"2 entries but 3 layers"):
        loss(hf_tuple(STUDENT, EMBED_S), hf_tuple(TEACHER, EMBED_T), MASK)


def test_kl_without_head_and_bad_inputs_raise():
    with pytest.raises(ValueError, match="lm_head"):
        LayerwiseDistillLoss("kl")(hf_tuple(STUDENT, EMBED_S), hf_tuple(TEACHER, EMBED_T), MASK)
    loss = LayerwiseDistillLoss("mse")
    with pytest.raises(ValueError, match="no valid token"):
        loss(hf_tuple(STUDENT, EMBED_S), hf_tuple(TEACHER, EMBED_T), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="hidden states"):
        loss(hf_tuple(STUDENT, EMBED_S), hf_tuple(TEACHER[:2], EMBED_T), MASK)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        loss(hf_tuple(STUDENT, EMBED_S), hf_tuple(TEACHER, EMBED_T), torch.ones(1, 4))
