"""logits_kl and stage19_loss against hand computations."""

import math

import pytest
import torch

from training.distill import logits_kl, stage19_loss

# Token 0: teacher (0, ln 3) -> p_t = (1/4, 3/4); student (0, 0) -> uniform. Token 1 differs wildly.
STUDENT = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
TEACHER = torch.tensor([[[0.0, math.log(3.0)], [-5.0, 5.0]]])


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_kl_t1_masked_matches_hand_value():
    got = logits_kl(STUDENT, TEACHER, 1.0, torch.tensor([[1, 0]]))
    assert got.item() == pytest.approx(kl([0.25, 0.75], [0.5, 0.5]), abs=1e-6)


def test_kl_t2_with_and_without_t_squared():
    mask = torch.tensor([[1, 0]])
    raw = kl(softmax([0.0, math.log(3.0) / 2]), [0.5, 0.5])
    assert logits_kl(STUDENT, TEACHER, 2.0, mask).item() == pytest.approx(raw, abs=1e-6)
    assert logits_kl(STUDENT, TEACHER, 2.0, mask, scale_by_t2=True).item() == pytest.approx(4 * raw, abs=1e-6)


def test_kl_unmasked_is_mean_over_all_tokens():
    second = kl(softmax([-5.0, 5.0]), softmax([5.0, -5.0]))
    expected = (kl([0.25, 0.75], [0.5, 0.5]) + second) / 2
    assert logits_kl(STUDENT, TEACHER, 1.0).item() == pytest.approx(expected, rel=1e-5)


def test_kl_direction_is_teacher_to_student():
    # KL(teacher || student) != KL(student || teacher) for these two distributions.
    mask = torch.tensor([[1, 0]])
    assert logits_kl(STUDENT, TEACHER, 1.0, mask).item() != pytest.approx(
        kl([0.5, 0.5], [0.25, 0.75]), abs=1e-3
    )


def test_kl_errors():
    with pytest.raises(ValueError, match="temperature"):
        logits_kl(STUDENT, TEACHER, 0.0)
    with pytest.raises(ValueError, match="differ"):
        logits_kl(STUDENT, TEACHER[..., :1], 1.0)


def test_stage19_formula():
    assert stage19_loss(2.0, 4.0, 1.0, 0.25) == pytest.approx(0.75 * 2.0 + 0.25 * (0.5 * 4.0 + 0.5 * 1.0))
    assert stage19_loss(2.0, 4.0, 1.0, 0.0) == pytest.approx(2.0)
    assert stage19_loss(2.0, 4.0, 1.0, 1.0) == pytest.approx(2.5)
    t = stage19_loss(torch.tensor(2.0), torch.tensor(4.0), torch.tensor(1.0), 0.5)
    assert isinstance(t, torch.Tensor) and t.item() == pytest.approx(0.5 * 2.0 + 0.5 * 2.5)


@pytest.mark.parametrize("a", [-0.1, 1.5, float("nan")])
def test_stage19_weight_outside_unit_interval(a):
    with pytest.raises(ValueError, match="lm_loss_weight"):
        stage19_loss(1.0, 1.0, 1.0, a)
