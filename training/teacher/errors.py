"""The one error type of the served teacher, carrying whether a rerun could fix it."""

from __future__ import annotations


class ServedTeacherError(RuntimeError):
    """A served-teacher problem, as one line naming the config field and the fix.

    ``infrastructure``: True when the cause is outside the trial's config (server down, stalled,
    overloaded) so a retried attempt, resuming from its checkpoint, may succeed; False for a
    mismatch (wrong model, other tokenizer, no logprobs) that a retry would only repeat.
    ``training.run_trial`` copies it into the result, which is how the sweep decides to retry.
    """

    def __init__(self, message: str, *, infrastructure: bool) -> None:
        super().__init__(message)
        self.infrastructure = infrastructure
