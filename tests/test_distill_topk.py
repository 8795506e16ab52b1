"""topk_kl (KD over the teacher's top-k, both sides renormalised) against hand values and logits_kl."""

import math

import pytest
import torch

from training.distill import logits_kl
from training.distill.topk import TeacherTopK, topk_from_logits, topk_kl


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_full_vocabulary_topk_equals_logits_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    for temp in (1.0, 2.5):
        full = logits_kl(s, t, temp, mask, scale_by_t2=True)
        top = topk_kl(s, topk_from_logits(t, 11, mask), temp, mask, scale_by_t2=True)
        assert top.item() == pytest.approx(full.item(), rel=1e-5)


def test_topk_renormalises_both_sides_over_the_teacher_ids():
    # One position, vocabulary 4; teacher logits (3, 1, 0, -2), top-2 = ids 0 and 1.
    t = torch.tensor([[[3.0, 1.0, 0.0, -2.0]]])
    s = torch.tensor([[[0.5, 2.0, 4.0, 1.0]]])  # the student's mass sits on id 2, outside the top-2
    temp = 2.0
    p = _softmax([3.0 / temp, 1.0 / temp])  # the constant of log_softmax cancels
    q = _softmax([0.5 / temp, 2.0 / temp])
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = topk_kl(s, topk_from_logits(t, 2), temp)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # Served log-probabilities (any additive constant) give the same loss as raw logits.
    served = TeacherTopK(torch.tensor([[[0, 1]]]), torch.tensor([[[3.0 - 7.0, 1.0 - 7.0]]]), torch.ones(1, 1, dtype=torch.bool))
    assert topk_kl(s, served, temp).item() == pytest.approx(expected, abs=1e-6)


def test_positions_without_a_teacher_answer_do_not_count():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 4, 7, generator=g), torch.randn(1, 4, 7, generator=g)
    ref = topk_from_logits(t, 3)
    only_first_two = TeacherTopK(ref.ids, ref.logprobs, torch.tensor([[True, True, False, False]]))
    masked = topk_kl(s, ref, 1.0, torch.tensor([[1, 1, 0, 0]]))
    assert topk_kl(s, only_first_two, 1.0).item() == pytest.approx(masked.item(), rel=1e-6)


def test_gradient_reaches_only_the_topk_logits():
    t = torch.tensor([[[3.0, 1.0, 0.0, -2.0]]])
    s = torch.zeros(1, 1, 4, requires_grad=True)
    topk_kl(s, topk_from_logits(t, 2), 1.0).backward()
    assert s.grad[0, 0, 2:].abs().sum() == 0 and s.grad[0, 0, :2].abs().sum() > 0


def test_topk_errors():
    t = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match=r"top_k: must be in 1\.\.5"):
        topk_from_logits(t, 6)
    with pytest.raises(ValueError, match="temperature"):
        topk_kl(t, topk_from_logits(t, 2), 0.0)
    with pytest.raises(ValueError, match="does not cover"):
        topk_kl(torch.randn(1, 3, 5), topk_from_logits(t, 2), 1.0)
