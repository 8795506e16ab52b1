"""Equivalence tools: does an optimisation (torch.compile, FSDP, a fused kernel) change training?

Three checks, from cheapest to most end-to-end, each returning a small report with a ``.ok(...)``
helper and the numbers behind it (so a failing test says by how much):

- ``compare_logits_cosine(model_a, model_b, batch)``: per-token cosine of the two models' logits;
- ``compare_gradient_cosine(model_a, model_b, batch, loss_fn)``: per-parameter and global cosine
  of the gradients of one loss;
- ``run_n_steps_and_compare(make_setup_a, make_setup_b, n)``: N optimizer steps of two training
  setups, per-step losses and their largest relative difference (``compare_losses`` does the same
  for loss curves produced elsewhere, e.g. by a multi-process run).
"""

from .equivalence import (
    GradientReport,
    LogitsReport,
    StepsReport,
    TrainingSetup,
    compare_gradient_cosine,
    compare_logits_cosine,
    compare_losses,
    run_n_steps_and_compare,
)

__all__ = [
    "GradientReport",
    "LogitsReport",
    "StepsReport",
    "TrainingSetup",
    "compare_gradient_cosine",
    "compare_logits_cosine",
    "compare_losses",
    "run_n_steps_and_compare",
]
