"""The compute a trial spends: a deterministic FLOP estimate from parameter counts and tokens.

``train_flops`` is what a sweep can minimise next to the loss (loss vs compute Pareto fronts). It is
an estimate, not a measurement, so the same config always reports the same number on any machine:

    train_flops = sum over trained stages of  6 * N_student * tokens_stage
                + 2 * N_teacher * tokens_stage   for the stages that run the frozen teacher forward
                                                 (Stage 1.9, Stage 3)

- ``N_student``: the student's trainable parameters (every unique tensor with ``requires_grad``,
  embeddings and the LM head included; a tied embedding counts once), counted before any sharding.
- ``N_teacher``: all parameters of the frozen full-precision teacher used by that stage.
- ``tokens_stage``: the tokens the stage's optimizer steps consumed (micro-batches x accumulation x
  ranks; ``StageResult.tokens``).
- 6 = forward (2) + backward (4) multiply-adds per parameter per token (Kaplan et al. 2020); 2 = a
  forward pass only. Attention's sequence-length term, BitLinear's quantisation arithmetic,
  evaluation, the auto-batch-size probe steps and the Stage 1 conversion are not counted.
"""

from __future__ import annotations

from torch import nn

# Stages whose loss runs the frozen teacher forward on every training batch.
TEACHER_STAGES = ("stage1_9", "stage3")


def trainable_params(model: nn.Module) -> int:
    """Elements of the unique parameters that get gradients."""
    return sum(p.numel() for p in _unique(model) if p.requires_grad)


def all_params(model: nn.Module) -> int:
    return sum(p.numel() for p in _unique(model))


def stage_flops(stage: str, tokens: int, n_student: int, n_teacher: int) -> float:
    """The module formula for one stage (``n_teacher`` is ignored for stages without a teacher)."""
    flops = 6 * n_student * tokens
    if stage in TEACHER_STAGES:
        flops += 2 * n_teacher * tokens
    return float(flops)


def _unique(model: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():  # parameters() already skips tied duplicates; ids make it explicit
        seen.setdefault(id(p), p)
    return list(seen.values())
