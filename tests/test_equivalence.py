"""training.testing: the equivalence tools detect what they claim to, and pass what is equal."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from training.testing import (
    TrainingSetup,
    compare_gradient_cosine,
    compare_logits_cosine,
    compare_losses,
    run_n_steps_and_compare,
)
from training.testing.equivalence import canonical_name


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _batch(seed: int = 1, rows: int = 3, length: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 67, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _lm_loss(model, batch):
    return model(**batch).loss


def test_logits_cosine_is_one_for_copies_and_reports_a_perturbation():
    a = _model()
    b = copy.deepcopy(a)
    same = compare_logits_cosine(a, b, _batch())
    assert same.min_cosine == pytest.approx(1.0, abs=1e-12) and same.max_abs_diff == 0.0
    assert same.tokens == 3 * 9 - 3  # padded positions are left out
    with torch.no_grad():
        b.lm_head.weight.add_(0.5 * torch.randn_like(b.lm_head.weight))
    diff = compare_logits_cosine(a, b, _batch())
    assert not diff.ok() and diff.min_cosine < 0.99 and diff.max_abs_diff > 0
    assert a.training and b.training  # modes restored


def test_gradient_cosine_sees_direction_and_scale_errors():
    a = _model()
    b = copy.deepcopy(a)
    batch = _batch()
    same = compare_gradient_cosine(a, b, batch, _lm_loss)
    assert same.ok() and same.global_cosine == pytest.approx(1.0, abs=1e-12) and same.rel_norm_diff == 0.0
    assert len(same.per_param) == len(list(a.named_parameters()))
    assert all(p.grad is None for p in a.parameters())  # models left without gradients
    # Side b's loss doubled (e.g. a missing 1/grad_accum): every cosine stays 1; the norm check catches it.
    doubled = compare_gradient_cosine(a, b, batch, lambda m, x: ((2 if m is b else 1) * m(**x).loss, {}))
    assert doubled.min_cosine == pytest.approx(1.0, abs=1e-9)
    assert doubled.rel_norm_diff == pytest.approx(1.0, rel=1e-6) and not doubled.ok()
    # A different model: the per-parameter minimum points at the changed block. Negating the last MLP's
    # output weight reverses the gradient reaching its up/gate projections (cosine ~ -1).
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight.mul_(-1)
    flipped = compare_gradient_cosine(a, b, batch, _lm_loss)
    assert flipped.min_param in ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.gate_proj.weight")
    assert flipped.min_cosine < -0.9 and not flipped.ok()


def test_parameter_names_match_across_compile_and_ddp_wrappers():
    a = _model()
    compiled = torch.compile(a)  # wrapping only; nothing is compiled until called
    names = [canonical_name(n) for n, _ in compiled.named_parameters()]
    assert names == [n for n, _ in a.named_parameters()]
    assert canonical_name("module.model.embed_tokens.weight") == "model.embed_tokens.weight"


def _setup(lr: float, seed: int = 0):
    def make():
        model = _model(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        batches = [_batch(s) for s in range(3)]
        return TrainingSetup(model, opt, lambda b: model(**b).loss, batches, grad_clip=1.0)

    return make


def test_n_step_comparison_is_exact_for_identical_setups_and_flags_a_change():
    same = run_n_steps_and_compare(_setup(1e-2), _setup(1e-2), 4)
    assert same.ok(rtol=0.0) and same.losses_a == same.losses_b
    assert same.losses_a[-1] < same.losses_a[0]  # it trained
    diff = run_n_steps_and_compare(_setup(1e-2), _setup(3e-2), 4)
    # Step 1 sees the same initial weights, so the losses diverge from step 2 on.
    assert diff.rel_diffs[0] == 0.0 and diff.first_step_over(1e-6) == 2 and not diff.ok(1e-4)


def test_compare_losses_validates_and_handles_non_finite():
    assert compare_losses([1.0, 2.0], [1.0, 2.2]).max_rel_diff == pytest.approx(0.1)
    assert compare_losses([float("nan")], [1.0]).max_rel_diff == float("inf")
    with pytest.raises(ValueError, match="equal length"):
        compare_losses([1.0], [1.0, 2.0])


def test_setup_from_trainer_steps_the_project_loop():
    """``TrainingSetup.from_trainer`` runs Trainer.fit one step at a time: grad accumulation 2 over
    micro-batches of 2 equals a plain setup over the same 4 rows at once."""
    from training.data import BlockLoader, TokenBlocks
    from training.stages.trainer import LoopSpec, Trainer

    ids = torch.randint(0, 67, (4, 9), generator=torch.Generator().manual_seed(7))

    def trainer_setup():
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        # 4 blocks, micro-batches of 2: each optimizer step sees every row once (one epoch, any order).
        loader = BlockLoader(TokenBlocks(ids.to(torch.int32)), batch_size=2, seed=0)
        spec = LoopSpec(stage="t", max_steps=0, grad_accum=2, grad_clip=0.0, log_every=10**9)
        trainer = Trainer(spec, model, opt, sched, loader, lambda b: (model(**b).loss, {}),
                          device=torch.device("cpu"))  # fmt: skip
        return TrainingSetup.from_trainer(trainer)

    def plain_setup():
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        return TrainingSetup(model, opt, lambda b: model(**b).loss, [batch])

    rep = run_n_steps_and_compare(trainer_setup, plain_setup, 3)
    assert rep.ok(rtol=1e-5), rep
    assert rep.losses_a[-1] < rep.losses_a[0]
