"""The sweep's own book of trials: who runs what, which attempt, what was ingested.

Ax knows a trial as RUNNING, COMPLETED, FAILED...; the sweep also needs the
attempt number, the worker, the store time of the claim and which result files
were already fed to Ax. That book lives *inside* the Ax snapshot, as
``experiment.properties["sweep"]``, so one CAS write of ``experiment.json``
commits the Ax data and the bookkeeping together: a result recorded as ingested
is in Ax's data and vice versa, which is what makes ingestion exactly-once. It
also keeps ``experiment.json`` a plain Ax snapshot (``ax.Client`` loads it) and
lets ``sweep status`` read the book with ``json.loads`` alone, without Ax.

Trial states::

    running --result completed/diverged/failed(final)--> completed | failed | early_stopped
    running --stale heartbeat, infrastructure failure--> queued   (failed attempts < max_attempts)
                                                     \\-> failed  (failed attempts == max_attempts)
    running --preempted--> queued   (preemptions <= max_preemptions; they do not use up max_attempts)
                       \\-> failed  (one preemption too many)
    queued  --claimed again (same index, same params, same overrides, attempt + 1)--> running

A trial's Hydra overrides and entrypoint are frozen in its record when it is
first claimed, so every attempt runs exactly the configuration the first one
did, whatever happens to the space later.

This module is pure bookkeeping (no store, no Ax), so every transition is a
small unit-testable function.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT = 1
PROPERTY = "sweep"  # key in Ax experiment.properties

QUEUED, RUNNING, COMPLETED, FAILED, EARLY_STOPPED = (
    "queued",
    "running",
    "completed",
    "failed",
    "early_stopped",
)
ACTIVE_STATES = (QUEUED, RUNNING)
FINAL_STATES = (COMPLETED, FAILED, EARLY_STOPPED)

# Ax generation node name -> the phase shown to users.
PHASES = {"Sobol": "Sobol", "MBM": "BoTorch", "CenterOfSearchSpace": "Sobol"}


@dataclass
class TrialRecord:
    index: int
    params: dict[str, Any]
    phase: str
    state: str
    attempt: int  # attempts handed out so far; the live one when running
    worker: str | None
    claimed_at: float | None  # store time of the current attempt's claim
    ingested: list[int] = field(default_factory=list)  # attempts whose result file was consumed
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str = ""  # why it failed, or why it was last requeued
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per ended attempt
    preemptions: int = 0  # attempts that ended preempted (not counted against max_attempts)
    # Frozen at the first claim (None only in ledgers written before they were recorded).
    overrides: list[str] | None = None
    entrypoint: str | None = None
    # SEARCH: proposed by Ax (Sobol/BoTorch); WARM_START: a best configuration of an earlier
    # experiment; REPLICATE: a re-run of trial ``replicate_of`` with another data order, for the
    # noise estimate (not counted in budget.trials).
    kind: str = "search"
    replicate_of: int | None = None
    origin: str = ""  # where a warm-start configuration came from: "<uri> trial <i>"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def end_attempt(self, attempt: int, outcome: str) -> None:
        # An earlier attempt ending late (presumed dead, then finished) is not the current worker's.
        current = attempt == self.attempt
        self.history.append(
            {
                "attempt": attempt,
                "worker": self.worker if current else None,
                "claimed_at": self.claimed_at if current else None,
                "outcome": outcome,
            }
        )


SEARCH, WARM_START, REPLICATE = "search", "warm_start", "replicate"


@dataclass
class Ledger:
    space_yaml: str
    trials: dict[int, TrialRecord] = field(default_factory=dict)
    # objective.noise == replicates: the measured run-to-run SD (None until measured) and how.
    noise_sd: float | None = None
    noise_note: str = ""
    # budget.warm_start: configurations still to hand out, best first:
    # [{"params": {...}, "source": "<uri> trial <i>", "value": <its objective there>}]
    warm_pending: list[dict[str, Any]] = field(default_factory=list)

    # -------------------- Serialisation (inside the Ax snapshot) -----------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "space_yaml": self.space_yaml,
            # JSON object keys are strings; Ax's encoder would keep ints, its decoder not.
            "trials": {str(i): asdict(t) for i, t in sorted(self.trials.items())},
            "noise_sd": self.noise_sd,
            "noise_note": self.noise_note,
            "warm_pending": self.warm_pending,
        }

    @classmethod
    def from_snapshot(cls, snapshot: Any) -> Ledger:
        """The ledger inside a parsed ``experiment.json``, read without Ax (for status)."""
        try:
            raw = snapshot["experiment"]["properties"][PROPERTY]
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"no sweep ledger in experiment.properties ({type(err).__name__}: {err})"
            ) from err
        return cls.from_json(raw)

    @classmethod
    def from_json(cls, raw: Any) -> Ledger:
        """Raise ValueError saying what is wrong if ``raw`` is not a ledger this code wrote."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"sweep ledger format must be {FORMAT}, got {got!r}")
        try:
            trials = {int(k): TrialRecord(**v) for k, v in raw["trials"].items()}
            sd = raw.get("noise_sd")
            return cls(
                space_yaml=str(raw["space_yaml"]),
                trials=trials,
                noise_sd=None if sd is None else float(sd),
                noise_note=str(raw.get("noise_note", "")),
                warm_pending=list(raw.get("warm_pending", [])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"sweep ledger is malformed: {err}") from err

    # -------------------- Queries ------------------------------------------------------

    def active(self) -> list[TrialRecord]:
        return [t for _, t in sorted(self.trials.items()) if t.active]

    def next_queued(self) -> TrialRecord | None:
        return next((t for _, t in sorted(self.trials.items()) if t.state == QUEUED), None)

    def count(self, state: str) -> int:
        return sum(1 for t in self.trials.values() if t.state == state)

    def budgeted(self) -> int:
        """Trials that count against budget.trials: everything but noise replicates."""
        return sum(1 for t in self.trials.values() if t.kind != REPLICATE)

    def of_kind(self, kind: str) -> list[TrialRecord]:
        return [t for _, t in sorted(self.trials.items()) if t.kind == kind]

    # -------------------- Transitions --------------------------------------------------

    def add(
        self,
        index: int,
        params: dict[str, Any],
        node: str,
        worker: str,
        now: float,
        *,
        overrides: list[str] | None = None,
        entrypoint: str | None = None,
        kind: str = SEARCH,
        replicate_of: int | None = None,
    ) -> TrialRecord:
        if index in self.trials:
            raise ValueError(f"trial {index} is already in the ledger")
        record = TrialRecord(
            index=index,
            params=dict(params),
            phase=PHASES.get(node, node),
            state=RUNNING,
            attempt=1,
            worker=worker,
            claimed_at=now,
            overrides=None if overrides is None else list(overrides),
            entrypoint=entrypoint,
            kind=kind,
            replicate_of=replicate_of,
        )
        self.trials[index] = record
        return record

    @staticmethod
    def hand_out(record: TrialRecord, worker: str, now: float) -> None:
        """A queued trial starts its next attempt with ``worker``."""
        if record.state != QUEUED:
            raise ValueError(f"trial {record.index} is {record.state}, not queued")
        record.state, record.attempt, record.worker, record.claimed_at = (
            RUNNING,
            record.attempt + 1,
            worker,
            now,
        )

    @staticmethod
    def retry_or_fail(
        record: TrialRecord,
        reason: str,
        max_attempts: int,
        *,
        preempted: bool = False,
        max_preemptions: int = 20,
    ) -> bool:
        """End the current attempt for an infrastructure ``reason``; True if the trial is queued again.

        Two budgets: ``max_attempts`` failed attempts (crashes, silence) and,
        apart from them, ``max_preemptions`` preemptions -- a spot VM taken away
        is not the trial's fault, so it must not use up the failure budget.
        """
        record.end_attempt(record.attempt, reason)
        if preempted:
            record.preemptions += 1
            if record.preemptions <= max_preemptions:
                record.state, record.reason = QUEUED, reason
                return True
            record.state = FAILED
            record.reason = (
                f"{reason} (gave up after {record.preemptions} preemptions; "
                f"raise trial.max_preemptions ({max_preemptions}) to allow more)"
            )
            return False
        failed = record.attempt - record.preemptions  # every hand-out so far has ended
        if failed < max_attempts:
            record.state, record.reason = QUEUED, reason
            return True
        record.state = FAILED
        also = f", after {record.preemptions} preemptions" if record.preemptions else ""
        record.reason = f"{reason} (gave up after {failed} attempts{also})"
        return False

    @staticmethod
    def finish(
        record: TrialRecord, state: str, attempt: int, metrics: dict[str, Any], reason: str = ""
    ) -> None:
        if state not in FINAL_STATES:
            raise ValueError(f"{state!r} is not a final state; allowed: {', '.join(FINAL_STATES)}")
        record.end_attempt(attempt, state if not reason else f"{state}: {reason}")
        record.state, record.metrics, record.reason = state, dict(metrics), reason
