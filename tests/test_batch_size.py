"""Auto batch size: the search, the OOM handling, undoing probe steps, MuonClip afterwards, the pipeline."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from training.api import compose_config, run_pipeline
from training.batch_size import (
    BatchSizeError,
    auto_micro_batch,
    is_oom,
    search_micro_batch,
    tile_batch,
)
from training.optim import OptimizerSpec, build_optimizer
from training.stages import pipeline


@pytest.mark.parametrize(
    ("effective", "limit", "start", "micro", "trials"),
    [
        # doubling 1 -> 2 -> 4 -> 8 (fails), then bisect among the divisors 4 < d < 8: 6 fails
        (24, 5, 1, 4, [(1, True), (2, True), (4, True), (8, False), (6, False)]),
        (24, 7, 1, 6, [(1, True), (2, True), (4, True), (8, False), (6, True)]),
        # start above the limit: bisect the divisors below it (1 2 3 4 6 8 | 12)
        (24, 7, 12, 6, [(12, False), (3, True), (6, True), (8, False)]),
        # everything fits: the effective batch itself, no accumulation
        (16, 100, 2, 16, [(2, True), (4, True), (8, True), (16, True)]),
        (7, 3, 1, 1, [(1, True), (7, False)]),  # a prime: 1 or 7
    ],
)
def test_search_finds_the_largest_fitting_divisor(effective, limit, start, micro, trials):
    plan = search_micro_batch(effective, lambda n: n <= limit, start=start)
    assert (plan.micro_batch, plan.grad_accum, plan.effective_batch) == (micro, effective // micro, effective)
    assert plan.micro_batch * plan.grad_accum == effective
    assert plan.trials == trials


def test_search_raises_when_nothing_fits():
    with pytest.raises(BatchSizeError, match="a micro-batch of 1 does not fit"):
        search_micro_batch(8, lambda n: False, start=4)


def test_is_oom_recognises_allocator_errors_only():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert is_oom(
        RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config).train()


def _spec(name="muonclip"):
    return OptimizerSpec(name=name, lr=1e-2, qk_clip_tau=1e-3)  # tiny tau: every step clips


def test_probe_steps_are_undone_and_muonclip_still_records_afterwards():
    model = _model()
    opt = build_optimizer(model, _spec())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 53, (2, 12), generator=torch.Generator().manual_seed(3))
    sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    sizes = []

    def loss_fn(batch):
        sizes.append(batch["input_ids"].shape[0])
        torch.rand(5)  # probes consume the RNG, as dropout would; the search must restore it
        return model(**batch).loss, {}

    torch.manual_seed(123)
    plan = auto_micro_batch(
        model, opt, loss_fn, lambda n: tile_batch(sample, n), 8,
        device=torch.device("cpu"), start=1, simulate_oom_above=3,
    )  # fmt: skip
    assert (plan.micro_batch, plan.grad_accum) == (2, 4)
    assert plan.trials == [(1, True), (2, True), (4, False)]
    assert sizes == [1, 2, 4]
    # Nothing of the probes survives: weights, optimizer state, gradients, RNG stream.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert opt.state_dict()["state"] == {} and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(123)))
    # The notebook's BatchSizeFinder bug: after the search, a MuonClip step must still see its logits,
    # and a failed probe's maxima (the size-4 forward ran, then "OOM") must not leak into it.
    assert opt._recorder.take() == {}
    loss = model(**tile_batch(sample, plan.micro_batch)).loss
    loss.backward()
    opt.step()
    maxima = opt.max_logits()
    assert set(maxima) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert all(v > 0 for v in maxima.values())


def test_other_errors_propagate_and_leave_the_model_restored():
    model = _model()
    opt = build_optimizer(model, _spec("adamw"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 53, (2, 8))
    sample = {"input_ids": ids, "labels": ids}

    def loss_fn(batch):
        if batch["input_ids"].shape[0] > 2:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return model(**batch).loss

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        auto_micro_batch(model, opt, loss_fn, lambda n: tile_batch(sample, n), 8, device=torch.device("cpu"))
    # The probes that ran (1, 2) were undone before the error surfaced.
    opt.zero_grad(set_to_none=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="memory_cap_bytes needs a CUDA device"):
        auto_micro_batch(model, opt, loss_fn, lambda n: tile_batch(sample, n), 8,
                         device=torch.device("cpu"), memory_cap_bytes=1)  # fmt: skip


@pytest.mark.slow
def test_pipeline_auto_batch_size_keeps_the_configured_trajectory(tiny_overrides, tmp_path, monkeypatch):
    """A search that ends at micro-batch 2 x 4 trains exactly like a run configured 2 x 4."""
    common = [*tiny_overrides, "stage=stage2", "stage2.max_steps=3", "stage2.lambda_warmup.warmup_steps=2"]
    monkeypatch.setattr(
        pipeline,
        "fit_trainer_micro_batch",
        functools.partial(pipeline.fit_trainer_micro_batch, simulate_oom_above=3),
    )
    auto = run_pipeline(
        compose_config(
            [
                *common,
                f"run.out_dir={tmp_path / 'auto'}",
                "stage2.batch_size=8",
                "stage2.grad_accum=1",
                "stage2.auto_batch_size=true",
            ]
        )
    )
    fixed = run_pipeline(
        compose_config(
            [*common, f"run.out_dir={tmp_path / 'fixed'}", "stage2.batch_size=2", "stage2.grad_accum=4"]
        )
    )
    assert auto.status == fixed.status == "completed"
    a, f = auto.stages["stage2"], fixed.stages["stage2"]
    assert a.tokens == f.tokens == 3 * 8 * 64
    assert [v for _, v in a.curve] == pytest.approx([v for _, v in f.curve], rel=1e-5)
    assert auto.final_eval_loss == pytest.approx(fixed.final_eval_loss, rel=1e-5)
