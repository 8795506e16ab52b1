"""No secret from the worker's environment reaches the store (issue 11, item 9): every value of a
secret-looking variable (``*_KEY``, ``*_TOKEN``, ``*_SECRET``, ``*PASSWORD*``; 8 characters or more)
is masked in results, log tails, heartbeats and progress records, whatever the trial echoes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_worker_support import REPO, branin_space

from sweep.experiment import Experiment
from sweep.space import load_space
from sweep.store import open_store
from sweep.trial_tracking import MASK, redact, secret_values
from sweep.worker import Worker, WorkerOptions

TESTS = Path(__file__).resolve().parent
SECRETS = {
    "MY_API_TOKEN": "supersecretvalue123",
    "HF_TOKEN": "hf_AbCdEfGh0123456789",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "DB_PASSWORD": "correct-horse-battery",
    "OAUTH_CLIENT_SECRET": "client-secret-0042",
    "WANDB_API_KEY": "wandb-secret-key-0123456789abcdef",
    "my_lowercase_key": "lowercase-secret-77",
}
NOT_SECRET = {"SHORT_TOKEN": "abc", "PUBLIC_SETTING": "visible-setting-value"}


def test_secret_values_are_the_long_values_of_secret_looking_names() -> None:
    env = {**SECRETS, **NOT_SECRET, "HOME": "/root/some/where", "PASSWORD_FILE_HINT": "hint-hint-hint"}
    assert set(secret_values(env)) == {*SECRETS.values(), "hint-hint-hint"}
    # A secret that contains another is masked whole, not left half-visible.
    env = {"A_TOKEN": "abcdefgh", "B_TOKEN": "xx-abcdefgh-yy"}
    assert redact({"log": "xx-abcdefgh-yy and abcdefgh"}, env) == {"log": f"{MASK} and {MASK}"}
    assert redact({"n": 1, "ok": [True, None, 2.5]}, env) == {"n": 1, "ok": [True, None, 2.5]}


@pytest.mark.parametrize("plan", ["good/crash"], ids=["completed-then-crash"])
def test_no_secret_reaches_any_object_in_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plan: str) -> None:
    for name, value in {**SECRETS, **NOT_SECRET}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    echo = "/".join([*SECRETS, *NOT_SECRET])
    text = branin_space("secrets", trials=2, sobol=2, heartbeat_s=0.1, max_attempts=1,
                        extra_overrides=(f"plan={plan}", f"echo_env={echo}", "hold_s=0.5"))  # fmt: skip
    text = text.replace("entrypoint: sweep.testing.synthetic_trial", "entrypoint: scripted_trial")
    root = open_store(str(tmp_path / "sweeps"))
    exp = Experiment.init(root, load_space(text))
    summary = Worker(exp, "w", WorkerOptions(poll_s=0.1, idle_timeout_s=30, workdir=tmp_path / "work")).run()
    assert (summary.trials_run, summary.completed) == (2, 1), summary

    # The trials did echo every secret: the local scratch files have them, so a leak would show.
    local = "".join(p.read_text(errors="replace") for p in (tmp_path / "work").rglob("*") if p.is_file())
    assert all(value in local for value in SECRETS.values())

    stored: dict[str, str] = {}
    for key in root.list():
        got = root.read(key)
        stored[key] = "" if got is None else got[0].decode("utf-8", errors="replace")
    for kind in ("/progress", "/heartbeat-", "/result-"):  # every kind of object a worker writes
        assert any(kind in key for key in stored), (kind, sorted(stored))
    for key, text in stored.items():
        for name, value in SECRETS.items():
            assert value not in text, f"{name}'s value is stored in {key}"
    crashed = exp.store.read_json("trials/1/result-1.json")[0]
    assert any(MASK in line for line in crashed["log_tail"]) and MASK in crashed["reason"], crashed
    completed = exp.store.read_json("trials/0/result-1.json")[0]
    assert completed["echoed"]["MY_API_TOKEN"] == MASK
    # Short values and names that do not look secret are left alone (masking "abc" would garble logs).
    assert completed["echoed"]["SHORT_TOKEN"] == "abc"
    assert completed["echoed"]["PUBLIC_SETTING"] == "visible-setting-value"
    progress = exp.progress(0)
    assert [r["note"] for r in progress][:2] == [MASK, MASK] and all(MASK in r for r in progress[:2])
