"""What a worker adds to a trial for experiment tracking, and how secrets stay out of the store.

With ``tracking: {wandb: true}`` in the space, each trial process gets Hydra overrides that turn
on its Weights & Biases run (``training/tracking.py`` does the logging)::

    run.wandb.enabled=true run.wandb.project=<project> run.wandb.group=<experiment>
    run.wandb.name=trial-<i> run.wandb.tags=[sweep,<phase>]

plus the environment variable ``SWEEP_TRIAL`` (JSON: experiment, trial index, attempt, phase,
worker, parameters), which the run puts into its W&B config. These are added when the trial
starts; they are not part of the claim, so ``claim.json`` and the ledger hold only the space's
overrides. The W&B API key travels only in the worker's environment (``WANDB_API_KEY``, which
also switches W&B from offline to online).

:func:`redact` masks every secret of the worker's environment in anything the worker writes to the
store -- results and their log tails, heartbeats, progress records -- since a trial can echo any
of them (a crash's traceback, a config dump). A secret is the value of a variable whose name looks
like one (:func:`is_secret_name`: ``*_KEY``, ``*_TOKEN``, ``*_SECRET``, ``*PASSWORD*``, any case,
plus a few well-known names), when that value is at least ``MIN_SECRET_LEN`` characters: masking
``SOME_KEY=1`` would garble every ``1`` in a log.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

TRIAL_ENV = "SWEEP_TRIAL"
# Secrets named outside the patterns of _SECRET_NAME (WANDB_API_KEY matches them too: kept for readers).
SECRET_ENVS = ("WANDB_API_KEY", "GITHUB_PAT", "GH_PAT")
_SECRET_NAME = re.compile(r"(_KEY|_TOKEN|_SECRET|APIKEY)$|PASSWORD|PASSWD|PASSPHRASE|SECRET", re.IGNORECASE)
MIN_SECRET_LEN = 8
MASK = "***"


def wandb_overrides(space: Any, experiment: str, claim: Any) -> list[str]:
    """The ``run.wandb.*`` overrides of one trial, or [] when the space does not enable W&B."""
    tracking = getattr(space, "tracking", None)
    if tracking is None or not tracking.wandb:
        return []
    out = [
        "run.wandb.enabled=true",
        f"run.wandb.project={tracking.project}",
        f"run.wandb.group={experiment}",
        f"run.wandb.name=trial-{claim.trial_index}",
        f"run.wandb.tags=[sweep,{claim.phase}]",
    ]
    if tracking.entity:
        out.append(f"run.wandb.entity={tracking.entity}")
    return out


def trial_env(experiment: str, claim: Any, worker: str) -> dict[str, str]:
    """Environment entries describing the trial to its process (W&B config)."""
    info = {
        "experiment": experiment,
        "trial_index": claim.trial_index,
        "attempt": claim.attempt,
        "phase": claim.phase,
        "worker": worker,
        "params": dict(claim.params),
    }
    return {TRIAL_ENV: json.dumps(info, default=str)}


def is_secret_name(name: str) -> bool:
    """Whether an environment variable called ``name`` holds a secret (by its name alone)."""
    return name.upper() in SECRET_ENVS or _SECRET_NAME.search(name) is not None


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values to mask: of secret-looking names, ``MIN_SECRET_LEN`` characters or longer, longest
    first (a secret that contains another is masked whole, not left half visible)."""
    env = os.environ if environ is None else environ
    found = {value for name, value in env.items() if len(value) >= MIN_SECRET_LEN and is_secret_name(name)}
    return sorted(found, key=lambda v: (-len(v), v))


def redact(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """``value`` (str, list, dict, nested) with every secret from the environment replaced by ***."""
    secrets = secret_values(environ)
    if not secrets:
        return value
    return _mask(value, secrets)


def _mask(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
        return value
    if isinstance(value, Mapping):
        return {_mask(k, secrets): _mask(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_mask(v, secrets) for v in value)
    return value
