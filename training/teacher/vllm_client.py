"""Teacher outputs from a vLLM server: the client, its checks, retries and the response parsing.

What is sent (vLLM's OpenAI-compatible completions API, ``POST <base>/v1/completions``)::

    {"model": "<served model>", "prompt": [[ids of row 0] + [x], [ids of row 1] + [x], ...],
     "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}

``prompt`` as lists of token ids is not re-tokenised by the server. ``prompt_logprobs: k`` is vLLM's
extension: each choice carries ``prompt_logprobs``, a list with one entry per prompt token, ``null``
for the first and otherwise ``{"<token id>": {"logprob": float, "rank": int, "decoded_token": str}}``
holding the k most likely tokens at that position plus the prompt's own token. Entry ``t + 1`` is the
distribution the student's logits at position ``t`` are distilled towards. The appended token ``x``
(the row's first id; any id works, attention is causal) makes entry ``n`` exist for the row's last
real position ``n - 1``, so every position the in-process loss covers is covered, all from
``prompt_logprobs`` keyed by token id (the OpenAI-style ``logprobs.top_logprobs`` is keyed by decoded
strings, which are ambiguous). ``max_tokens: 1`` instead of ``echo: true, max_tokens: 0``: older vLLM
versions reject ``max_tokens: 0``; the one generated token is ignored. vLLM caps k at the server's
``--max-logprobs`` (default 20) and returns raw (untempered) log-probabilities by default
(``--logprobs-mode raw_logprobs``); the temperature is applied on our side (training/distill/topk.py).

Shapes read from vLLM's source (vllm-project/vllm, ``vllm/entrypoints/openai/completion/protocol.py``:
``CompletionRequest.prompt_logprobs``, ``CompletionResponseChoice.prompt_logprobs:
list[dict[int, Logprob] | None]``; ``vllm/logprobs.py``: ``Logprob(logprob, rank, decoded_token)``;
``vllm/entrypoints/serve/tokenize/``: ``POST /tokenize`` -> ``{"count", "max_model_len", "tokens"}``;
``GET /v1/models`` -> ``{"data": [{"id", "max_model_len", ...}]}``; errors as
``{"error": {"message", "type", "code"}}`` or, in older versions, ``{"message", "type", "code"}``).

Checks before training (``connect``): the server answers ``/v1/models`` (retried, then one line:
unreachable); the served model is the configured one (or the only one); ``data.seq_len`` fits its
``max_model_len``; ``/tokenize`` of a probe text gives the student tokenizer's ids (vocabulary
mismatch otherwise); a probe completion carries ``prompt_logprobs`` with k entries and token ids
inside the student's vocabulary.

Retries: connection errors, timeouts (a stalled server), HTTP 408/429/5xx and unreadable bodies are
retried ``retries`` times with exponential backoff (``backoff_s``, doubled each time, at most 30 s);
other HTTP errors (400: e.g. k above ``--max-logprobs``, 404) fail at once with the server's message.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import torch

from training.distill.topk import TeacherTopK

from .errors import ServedTeacherError

log = logging.getLogger("training")

RETRY_HTTP = frozenset({408, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0
DEFAULT_TOP_K = 20  # vLLM's default --max-logprobs
# Words, digits, punctuation and a newline: enough to tell two tokenizers apart.
PROBE_TEXT = "The teacher's tokenizer, checked: 1234 + 56 = 1290.\nclass Example(object): pass"


@dataclass(frozen=True)
class ServedTeacherSettings:
    """``stageX.teacher`` as the client needs it; ``where`` names the config block in errors."""

    url: str
    where: str = "stage3.teacher"
    served_model: str | None = None
    top_k: int = DEFAULT_TOP_K
    timeout_s: float = 60.0
    retries: int = 5
    backoff_s: float = 1.0
    api_key_env: str | None = "VLLM_API_KEY"

    @classmethod
    def from_config(cls, c: Any, where: str) -> ServedTeacherSettings:
        return cls(
            url=str(c.url),
            where=where,
            served_model=c.served_model,
            top_k=int(c.top_k) if c.top_k is not None else DEFAULT_TOP_K,
            timeout_s=float(c.timeout_s),
            retries=int(c.retries),
            backoff_s=float(c.backoff_s),
            api_key_env=c.api_key_env,
        )


class _Retryable(Exception):
    """A failure worth another attempt (the message says what happened)."""


def base_url(url: str) -> str:
    """``http://host:8000``, ``.../`` and ``.../v1`` all name the same server."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class VLLMTeacher:
    """The client: ``connect()`` once, then ``fetch(batch)`` per batch (thread-safe: no shared state
    besides counters, and one request at a time per caller)."""

    def __init__(self, settings: ServedTeacherSettings, vocab_size: int) -> None:
        self.s = settings
        self.base = base_url(settings.url)
        self.vocab_size = int(vocab_size)
        self.model: str | None = settings.served_model
        self.requests = 0
        self.retried = 0

    # -- HTTP ------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.s.api_key_env) if self.s.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"  # never logged or stored
        return headers

    def _once(self, method: str, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=self.s.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            message = _error_message(exc)
            if exc.code in RETRY_HTTP:
                raise _Retryable(f"HTTP {exc.code}: {message}") from None
            raise _HTTPFailure(exc.code, message) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(f"{type(reason).__name__}: {reason}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise _Retryable(f"unreadable JSON body ({len(raw)} bytes)") from None

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One request with retries and backoff; ServedTeacherError when it cannot succeed."""
        delay, started, attempts = self.s.backoff_s, time.monotonic(), self.s.retries + 1
        for attempt in range(1, attempts + 1):
            self.requests += 1
            try:
                return self._once(method, path, body)
            except _HTTPFailure as exc:
                raise self._http_error(path, exc) from None
            except _Retryable as exc:
                last = str(exc)
            if attempt < attempts:
                self.retried += 1
                log.warning(
                    "%s: %s%s attempt %d/%d failed (%s); retrying in %.1fs",
                    self.s.where, self.base, path, attempt, attempts, last, delay,
                )  # fmt: skip
                time.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        raise ServedTeacherError(
            f"{self.s.where}.url: {self.base}{path} did not answer after {attempts} attempt{'s' * (attempts > 1)} in "
            f"{time.monotonic() - started:.0f}s (last: {last}); start or fix the server, or raise "
            f"{self.s.where}.retries / timeout_s (the trial resumes from its last checkpoint when rerun)",
            infrastructure=True,
        )

    def _http_error(self, path: str, exc: _HTTPFailure) -> ServedTeacherError:
        if exc.code == 404 and path.endswith("/completions"):
            hint = "no completions endpoint there: is it a vLLM (OpenAI-compatible) server?"
        elif exc.code == 404 and "model" in exc.message.lower():
            hint = f"set {self.s.where}.served_model to the name the server serves"
        elif exc.code == 400 and "logprob" in exc.message.lower():
            hint = (f"{self.s.where}.top_k={self.s.top_k} is above what the server allows: start vLLM "
                    f"with --max-logprobs >= {self.s.top_k} or lower top_k")  # fmt: skip
        elif exc.code in (401, 403):
            hint = f"the server wants an API key: export it in ${self.s.api_key_env}"
        else:
            hint = "see the server's log"
        return ServedTeacherError(
            f"{self.s.where}.url: {self.base}{path} answered HTTP {exc.code}: {exc.message[:300]}; {hint}",
            infrastructure=exc.code >= 500,
        )

    # -- checks ----------------------------------------------------------------------------------
    def connect(self, tokenizer: Any, seq_len: int) -> None:
        """The checks of the module doc; one-line ServedTeacherError on the first that fails."""
        where = self.s.where
        models = self.call("GET", "/v1/models")
        cards = [m for m in models.get("data", []) if isinstance(m, dict) and "id" in m]
        names = [m["id"] for m in cards]
        if self.model is None:
            if len(names) != 1:
                raise ServedTeacherError(
                    f"{where}.served_model: {self.base} serves {len(names)} models ({', '.join(names) or 'none'}); "
                    "set it to the teacher's name",
                    infrastructure=False,
                )
            self.model = names[0]
        elif self.model not in names:
            raise ServedTeacherError(
                f"{where}.served_model: {self.model!r} is not served at {self.base} (it serves "
                f"{', '.join(names) or 'nothing'}); set it to one of those or point url at the right server",
                infrastructure=False,
            )
        card = cards[names.index(self.model)]
        max_len = card.get("max_model_len")
        if isinstance(max_len, int) and seq_len + 2 > max_len:
            raise ServedTeacherError(
                f"data.seq_len: {seq_len} + 2 tokens per request exceed the served model's max_model_len "
                f"{max_len}; lower data.seq_len or start vLLM with --max-model-len >= {seq_len + 2}",
                infrastructure=False,
            )
        local = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
        self._check_tokenizer(local)
        probe = torch.tensor([local[: max(2, min(len(local), 16))]])
        self.fetch(probe, None)  # logprobs present, k of them, ids inside the student's vocabulary
        log.info(
            "%s: served teacher %r at %s (top-%d prompt logprobs; tokenizer and vocabulary checked)",
            where, self.model, self.base, self.s.top_k,
        )  # fmt: skip

    def _check_tokenizer(self, local: list[int]) -> None:
        try:
            served = self.call(
                "POST", "/tokenize", {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False}
            )
        except ServedTeacherError as exc:
            if "HTTP 404" not in str(exc):
                raise
            log.warning(
                "%s: %s has no /tokenize endpoint; the tokenizer is checked only through token ids "
                "(inside the student's vocabulary)", self.s.where, self.base,
            )  # fmt: skip
            return
        tokens = served.get("tokens")
        if tokens != local:
            raise ServedTeacherError(
                f"{self.s.where}.url: tokenizer mismatch: {self.model!r} tokenizes the probe text as "
                f"{_head(tokens)}, the student's tokenizer as {_head(local)}; serve a teacher that shares "
                "the student's tokenizer and vocabulary",
                infrastructure=False,
            )

    # -- the per-batch request -------------------------------------------------------------------
    def fetch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> TeacherTopK:
        """The teacher's top-k for every valid position of a [B, T] batch (right padding only)."""
        ids = input_ids.detach().cpu().long()
        b, t = ids.shape
        lengths = _prefix_lengths(attention_mask, b, t)
        rows = [i for i in range(b) if lengths[i] > 0]
        prompts = [ids[i, : lengths[i]].tolist() + [int(ids[i, 0])] for i in rows]
        k = self.s.top_k
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
        resp = self.call("POST", "/v1/completions", body)
        choices = resp.get("choices")
        if not isinstance(choices, list) or len(choices) != len(rows):
            raise ServedTeacherError(
                f"{self.s.where}.url: the server answered {len(choices) if isinstance(choices, list) else 'no'} "
                f"choices for {len(rows)} prompts; is it a vLLM completions endpoint?",
                infrastructure=False,
            )
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        out_ids = torch.zeros(b, t, k, dtype=torch.long)
        out_lp = torch.zeros(b, t, k, dtype=torch.float32)
        valid = torch.zeros(b, t, dtype=torch.bool)
        for row, choice in zip(rows, choices):
            n = lengths[row]
            entries = choice.get("prompt_logprobs")
            if not isinstance(entries, list):
                raise ServedTeacherError(
                    f"{self.s.where}.url: the response has no prompt_logprobs (the server ignored the "
                    "request's prompt_logprobs); a served teacher needs vLLM's completions API",
                    infrastructure=False,
                )
            if len(entries) != n + 1:
                raise ServedTeacherError(
                    f"{self.s.where}.url: {len(entries)} prompt_logprobs for a {n + 1}-token prompt; the server "
                    "changed the prompt (truncation?)",
                    infrastructure=False,
                )
            ids_rows, lp_rows = zip(*(self._top(entries[pos + 1], k) for pos in range(n)))
            out_ids[row, :n] = torch.tensor(ids_rows, dtype=torch.long)
            out_lp[row, :n] = torch.tensor(lp_rows, dtype=torch.float32)
            valid[row, :n] = True
        if valid.any() and int(out_ids[valid].max()) >= self.vocab_size:
            raise ServedTeacherError(
                f"{self.s.where}.url: {self.model!r} returned token id {int(out_ids[valid].max())}, outside the "
                f"student's {self.vocab_size}-token vocabulary; serve a teacher with the student's tokenizer",
                infrastructure=False,
            )
        return TeacherTopK(out_ids, out_lp, valid)

    def _top(self, entry: Any, k: int) -> tuple[list[int], list[float]]:
        """(ids, logprobs) of one position's k most likely tokens, best first (plain lists: this runs
        B * T times per batch, so no tensor is built per position)."""
        if not isinstance(entry, dict) or not entry:
            raise ServedTeacherError(
                f"{self.s.where}.url: a prompt position has no logprobs (got {str(entry)[:80]}); "
                "the server must return prompt_logprobs for every position after the first",
                infrastructure=False,
            )
        if len(entry) < k:
            raise ServedTeacherError(
                f"{self.s.where}.top_k: the server returned {len(entry)} logprobs per position, fewer than "
                f"top_k={k}; start vLLM with --max-logprobs >= {k} or lower top_k",
                infrastructure=False,
            )
        # The position's top-k plus the prompt's own token (when it ranks lower): keep the k best.
        best = sorted(entry.items(), key=_logprob_of, reverse=True)[:k]
        return [int(key) for key, _ in best], [float(v["logprob"]) for _, v in best]


def _logprob_of(item: tuple[str, dict]) -> float:
    return item[1]["logprob"]


class _HTTPFailure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"HTTP {code}: {message}")
        self.code, self.message = code, message


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The server's error text: vLLM's ``{"error": {"message"}}``, its older flat form, or the body."""
    try:
        raw = exc.read().decode(errors="replace")
    except OSError:
        return str(exc.reason)
    try:
        body = json.loads(raw)
    except ValueError:
        return " ".join(raw.split())[:300] or str(exc.reason)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if key in body:
                return " ".join(str(body[key]).split())
    return " ".join(raw.split())[:300]


def _prefix_lengths(mask: torch.Tensor | None, b: int, t: int) -> list[int]:
    """Valid tokens per row; the mask must be 1...1 0...0 (the server sees only the real tokens)."""
    if mask is None:
        return [t] * b
    m = mask.detach().cpu().bool()
    lengths = m.sum(dim=1).tolist()
    for i, n in enumerate(lengths):
        if not bool(m[i, :n].all()):
            raise ValueError(
                f"served teacher: attention_mask row {i} is not right-padded (1...1 0...0); "
                "a served teacher needs right padding"
            )
    return [int(n) for n in lengths]


def _head(ids: Any, n: int = 8) -> str:
    if not isinstance(ids, list):
        return repr(ids)[:60]
    return "[" + ", ".join(map(str, ids[:n])) + (", ...]" if len(ids) > n else "]")
