"""A stand-in for a vLLM server (test fixture, not part of the product): the tiny teacher behind
vLLM's request and response shapes, so tests exercise the real client (training/teacher/).

    python -m tests.fake_vllm_server --port 8000 [Hydra overrides of the teacher, e.g. model.tiny.vocab_size=512]
    python scripts/train.py model=tiny stage=stage3 stage3=classification stage3.teacher.url=http://127.0.0.1:8000

Endpoints, shaped like vLLM's OpenAI server (vllm/entrypoints/openai/completion/protocol.py,
vllm/entrypoints/serve/tokenize/protocol.py, vllm/logprobs.py):

- ``GET /v1/models`` -> ``{"object": "list", "data": [{"id", "object": "model", "owned_by": "vllm",
  "root", "max_model_len"}]}``;
- ``POST /tokenize`` ``{"model", "prompt", "add_special_tokens"}`` -> ``{"count", "max_model_len", "tokens"}``;
- ``POST /v1/completions`` with ``prompt`` as token ids (one list or a list of lists) or text,
  ``max_tokens``, ``prompt_logprobs``, ``logprobs``, ``echo``: per prompt a choice with ``text``,
  ``finish_reason: "length"``, ``prompt_logprobs`` (``null`` then ``{"<id>": {"logprob", "rank",
  "decoded_token"}}`` with the top-k plus the prompt's own token, as vLLM does) and, when asked,
  OpenAI-style ``logprobs`` for the generated tokens (greedy); errors as ``{"error": {"message",
  "type", "param", "code"}}``; ``prompt_logprobs``/``logprobs`` above ``--max-logprobs`` are a 400.

Each prompt runs alone through the model (no padding), in float32, like a server batching requests
of different lengths. Faults for tests: ``fail_next(n, status)`` (e.g. 503), ``stall_next(n, s)``
(answers only after ``s`` seconds), ``drop_prompt_logprobs`` (a server that ignores the field),
``tokenize_offset`` (a different tokenizer), ``id_offset`` (ids outside the student's vocabulary),
``tokenize_endpoint`` (False: no /tokenize, as on servers without it).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch


class FakeVLLM:
    """The tiny teacher behind vLLM's endpoints, on a loopback port, in a background thread."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        name: str = "tiny-teacher",
        extra_names: tuple[str, ...] = (),
        max_model_len: int = 2048,
        max_logprobs: int = 20,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name, self.extra_names = name, tuple(extra_names)
        self.max_model_len, self.max_logprobs = max_model_len, max_logprobs
        self._lock = threading.Lock()  # faults and counters
        self._forward = threading.Lock()  # one forward at a time (threads share the model)
        self._fail: list[int] = []
        self._stall: list[float] = []
        self.drop_prompt_logprobs = False
        self.tokenize_offset = 0
        self.id_offset = 0
        self.tokenize_endpoint = True
        self._decoded: dict[int, str] = {}  # token id -> text (vLLM detokenises too; cached here)
        self.completions = 0  # completion requests answered with 200
        self.requests = 0  # every request received
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeVLLM:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-vllm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeVLLM:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------------------------
    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._fail.extend([status] * n)

    def stall_next(self, n: int, seconds: float) -> None:
        with self._lock:
            self._stall.extend([seconds] * n)

    def clear_faults(self) -> None:
        with self._lock:
            self._fail.clear()
            self._stall.clear()

    def _take_fault(self) -> tuple[int | None, float]:
        with self._lock:
            status = self._fail.pop(0) if self._fail else None
            stall = self._stall.pop(0) if self._stall and status is None else 0.0
            return status, stall

    # -- the model -----------------------------------------------------------------------------
    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """log_softmax of the next-token logits at every position of one unpadded prompt, [n, V]."""
        with self._forward:
            logits = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def _prompt_logprobs(self, lp: torch.Tensor, ids: list[int], k: int) -> list[dict | None]:
        """vLLM's ``prompt_logprobs`` of one prompt: ``None``, then per position the top-k plus the
        prompt's own token when it ranks lower, ``{"<id>": {"logprob", "rank", "decoded_token"}}``."""
        prev = lp[: len(ids) - 1]  # position p - 1 predicts prompt token p
        values, top = prev.topk(k, dim=-1)
        own = torch.tensor(ids[1:], dtype=torch.long)
        own_lp = prev.gather(-1, own[:, None])[:, 0]
        own_rank = (prev > own_lp[:, None]).sum(-1) + 1
        out: list[dict | None] = [None]
        for vals, toks, tok, tok_lp, tok_rank in zip(
            values.tolist(), top.tolist(), own.tolist(), own_lp.tolist(), own_rank.tolist()
        ):
            entry = {
                str(i + self.id_offset): {"logprob": v, "rank": r, "decoded_token": self._decode(i)}
                for r, (v, i) in enumerate(zip(vals, toks), start=1)
            }
            if str(tok + self.id_offset) not in entry:
                entry[str(tok + self.id_offset)] = {
                    "logprob": max(tok_lp, -9999.0), "rank": tok_rank, "decoded_token": self._decode(tok),
                }  # fmt: skip
            out.append(entry)
        return out

    def _decode(self, token_id: int) -> str:
        text = self._decoded.get(token_id)
        if text is None:
            text = self._decoded[token_id] = self.tokenizer.decode([token_id])
        return text

    def completion(self, body: dict) -> tuple[int, dict]:
        """``POST /v1/completions``: (status, JSON body)."""
        model = body.get("model")
        if model is not None and model not in (self.name, *self.extra_names):
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        prompt = body.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            return _error(400, "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
        if isinstance(prompt, str):
            prompts = [self.tokenizer(prompt)["input_ids"]]
        elif isinstance(prompt, list) and all(isinstance(x, int) for x in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and all(isinstance(x, str) for x in prompt):
            prompts = [self.tokenizer(p)["input_ids"] for p in prompt]
        elif isinstance(prompt, list) and all(isinstance(x, list) for x in prompt):
            prompts = prompt
        else:
            return _error(400, "prompt must be a string, a list of token ids or a list of those", param="prompt")
        max_tokens = body.get("max_tokens", 16)
        max_tokens = 16 if max_tokens is None else int(max_tokens)
        echo = bool(body.get("echo"))
        logprobs = body.get("logprobs")
        prompt_k = body.get("prompt_logprobs")
        if prompt_k is None and echo:
            prompt_k = logprobs  # vLLM: echo + logprobs implies prompt logprobs
        for field, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_k)):
            if k is not None and (not isinstance(k, int) or k < 0):
                return _error(400, f"`{field}` must be a positive value or -1.", param=field)
            if k is not None and k > self.max_logprobs:
                return _error(
                    400, f"Requested {field.replace('_', ' ')} of {k}, which is greater than max allowed: "
                    f"{self.max_logprobs}", param=field,
                )  # fmt: skip
        vocab = self.model.get_output_embeddings().weight.shape[0]
        generate = max(max_tokens, 1) if not (echo and max_tokens == 0) else 1
        choices, n_prompt, n_gen = [], 0, 0
        for index, ids in enumerate(prompts):
            if not ids or any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
                return _error(400, f"Token id out of vocabulary (size {vocab}) in prompt {index}", param="prompt")
            if len(ids) + generate > self.max_model_len:
                return _error(
                    400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                    f"requested {len(ids) + generate} tokens ({len(ids)} in the messages, {generate} in the "
                    "completion).", param="max_tokens",
                )  # fmt: skip
            seq, gen_lp = list(ids), []
            lp = self._logprobs(seq)
            prompt_lp = None
            if prompt_k is not None and not self.drop_prompt_logprobs:
                prompt_lp = self._prompt_logprobs(lp, ids, prompt_k)
            for step in range(generate):
                if step:
                    lp = self._logprobs(seq)
                nxt = int(lp[-1].argmax())
                if logprobs is not None:
                    gen_lp.append((nxt, {self._decode(i): v for i, v in zip(*_top(lp[-1], logprobs))}, float(lp[-1, nxt])))
                seq.append(nxt)
            generated = seq[len(ids):] if not (echo and max_tokens == 0) else []
            text = self.tokenizer.decode(generated)
            if echo:
                text = self.tokenizer.decode(ids) + text
            choices.append({
                "index": index,
                "text": text,
                "logprobs": _openai_logprobs(gen_lp, self._decode) if logprobs is not None else None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": prompt_lp,
            })  # fmt: skip
            n_prompt += len(ids)
            n_gen += len(generated)
        with self._lock:
            self.completions += 1
        return 200, {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen},
        }

    def tokenize(self, body: dict) -> tuple[int, dict]:
        if not self.tokenize_endpoint:
            return 404, {"detail": "Not Found"}
        model = body.get("model")
        if model is not None and model not in (self.name, *self.extra_names):
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        add = bool(body.get("add_special_tokens", True))
        tokens = [t + self.tokenize_offset for t in self.tokenizer(body.get("prompt", ""), add_special_tokens=add)["input_ids"]]
        return 200, {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens, "token_strs": None}

    def models(self) -> tuple[int, dict]:
        created = int(time.time())
        cards = [
            {"id": n, "object": "model", "created": created, "owned_by": "vllm", "root": n, "parent": None,
             "max_model_len": self.max_model_len, "permission": []}
            for n in (self.name, *self.extra_names)
        ]  # fmt: skip
        return 200, {"object": "list", "data": cards}

    # -- HTTP ----------------------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout) before a stalled answer came

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with server._lock:
                    server.requests += 1
                if self.path.rstrip("/") == "/v1/models":
                    self._send(*server.models())
                elif self.path == "/health":
                    self._send(200, {})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:  # noqa: N802
                with server._lock:
                    server.requests += 1
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                except ValueError:
                    self._send(*_error(400, "request body is not JSON"))
                    return
                if self.path == "/v1/completions":
                    status, stall = server._take_fault()
                    if status is not None:
                        self._send(*_error(status, "Service Unavailable (injected)", "ServiceUnavailableError"))
                        return
                    if stall:
                        time.sleep(stall)
                    self._send(*server.completion(body))
                elif self.path == "/tokenize":
                    self._send(*server.tokenize(body))
                else:
                    self._send(404, {"detail": "Not Found"})

        return Handler


def _error(code: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> tuple[int, dict]:
    return code, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _top(lp: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    values, ids = lp.topk(max(k, 1))
    return ids.tolist(), values.tolist()


def _openai_logprobs(gen: list[tuple[int, dict, float]], decode) -> dict:
    """OpenAI ``logprobs`` of the generated tokens (vLLM's CompletionLogProbs), keyed by decoded text."""
    tokens, offsets, pos = [], [], 0
    for token_id, _, _ in gen:
        tokens.append(decode(token_id))
        offsets.append(pos)
        pos += len(tokens[-1])
    return {"text_offset": offsets, "token_logprobs": [g[2] for g in gen], "tokens": tokens,
            "top_logprobs": [g[1] for g in gen]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fake_vllm_server",
        description="Serve the tiny teacher with vLLM's completions/tokenize/models shapes (a test stand-in).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default="tiny-teacher", help="the served model name")
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (leave the trainer its cores)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides selecting the teacher (model=..., model.tiny.*)")
    args = parser.parse_args(argv)
    from training.config import compose_config
    from training.stages.common import load_teacher

    torch.set_num_threads(args.threads)
    cfg = compose_config(args.overrides)
    model, tokenizer = load_teacher(cfg, torch.device("cpu"), torch.float32)
    server = FakeVLLM(
        model, tokenizer, name=args.name, max_model_len=args.max_model_len, max_logprobs=args.max_logprobs,
        host=args.host, port=args.port,
    )  # fmt: skip
    print(f"fake vLLM: serving {args.name!r} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
