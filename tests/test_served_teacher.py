"""The served-teacher client against the stand-in vLLM server (tests/fake_vllm_server.py): top-k
equal to the in-process teacher's, retries through 503s and stalls, one-line errors for every bad
input, and the prefetching loader's resume contract."""

from __future__ import annotations

import logging
import socket
import time

import pytest
import torch
from fake_vllm_server import FakeVLLM

from training.config import ConfigError, compose_config
from training.data import BlockLoader
from training.data.packing import TokenBlocks
from training.distill.topk import topk_from_logits, topk_kl
from training.stages.common import load_teacher
from training.teacher import (
    PrefetchingTeacherLoader,
    ServedTeacherError,
    ServedTeacherSettings,
    VLLMTeacher,
)

K = 8
# Served vs in-process top-k KD: the teacher runs on unpadded rows (server) vs a padded batch (in
# process), in float32; the logprobs then agree to ~1e-6 and the KD to this relative tolerance.
KD_RTOL = 1e-5


@pytest.fixture(scope="module")
def teacher(tiny_overrides):
    model, tok = load_teacher(compose_config(tiny_overrides), torch.device("cpu"), torch.float32)
    return model, tok


@pytest.fixture
def server(teacher):
    model, tok = teacher
    with FakeVLLM(model, tok, max_model_len=256) as srv:
        yield srv


def _client(server, **kw) -> VLLMTeacher:
    settings = {"url": server.url, "top_k": K, "timeout_s": 5.0, "retries": 3, "backoff_s": 0.01, **kw}
    return VLLMTeacher(ServedTeacherSettings(**settings), vocab_size=512)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, 10:] = 0
    return ids, mask


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def test_served_topk_kd_equals_in_process_topk_kd(server, teacher):
    model, tok = teacher
    client = _client(server)
    client.connect(tok, seq_len=64)
    ids, mask = _batch()
    served = client.fetch(ids, mask)
    with torch.no_grad():
        local = topk_from_logits(model(input_ids=ids, attention_mask=mask).logits, K, mask)
    assert torch.equal(served.valid, mask.bool())
    v = served.valid
    assert torch.equal(served.ids[v], local.ids[v])
    assert (served.logprobs[v] - local.logprobs[v]).abs().max() < 1e-5
    student = torch.randn(3, 12, 512, generator=torch.Generator().manual_seed(3), requires_grad=True)
    for temp in (1.0, 5.0):
        a, b = topk_kl(student, served, temp, mask), topk_kl(student, local, temp, mask)
        assert a.item() == pytest.approx(b.item(), rel=KD_RTOL)
        ga, = torch.autograd.grad(a, student)
        gb, = torch.autograd.grad(b, student)
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-8)


def test_503s_and_a_stall_are_retried_and_the_answer_is_the_same(server, teacher, caplog):
    _, tok = teacher
    ids, mask = _batch(1)
    healthy = _client(server).fetch(ids, mask)
    client = _client(server, timeout_s=0.5)
    server.fail_next(2, status=503)
    server.stall_next(1, seconds=2.0)  # longer than the client's timeout: that attempt is abandoned
    with caplog.at_level(logging.WARNING, logger="training"):
        got = client.fetch(ids, mask)
    assert client.retried == 3
    assert torch.equal(got.ids, healthy.ids) and torch.equal(got.logprobs, healthy.logprobs)
    assert sum("HTTP 503" in r.message for r in caplog.records) == 2
    assert any("timed out" in r.message.lower() for r in caplog.records)


def test_retries_exhausted_is_one_line_and_an_infrastructure_failure(server):
    server.fail_next(10, status=503)
    client = _client(server, retries=2)
    with pytest.raises(ServedTeacherError) as err:
        client.fetch(*_batch())
    text = _one_line(err.value)
    assert text.startswith(f"stage3.teacher.url: {server.url}/v1/completions did not answer after 3 attempts")
    assert "HTTP 503" in text and "resumes from its last checkpoint" in text
    assert err.value.infrastructure is True


def test_unreachable_server(teacher):
    _, tok = teacher
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    client = VLLMTeacher(ServedTeacherSettings(url=f"http://127.0.0.1:{port}/v1", retries=1, backoff_s=0.01), 512)
    with pytest.raises(ServedTeacherError) as err:
        client.connect(tok, 64)
    text = _one_line(err.value)
    assert text.startswith(f"stage3.teacher.url: http://127.0.0.1:{port}/v1/models did not answer after 2 attempts")
    assert "refused" in text.lower() and err.value.infrastructure


def test_model_mismatch(server, teacher):
    _, tok = teacher
    with pytest.raises(ServedTeacherError) as err:
        _client(server, served_model="Qwen/Qwen3-4B").connect(tok, 64)
    assert _one_line(err.value) == (
        "stage3.teacher.served_model: 'Qwen/Qwen3-4B' is not served at "
        f"{server.url} (it serves tiny-teacher); set it to one of those or point url at the right server"
    )
    assert err.value.infrastructure is False
    server.extra_names = ("other",)
    with pytest.raises(ServedTeacherError, match=r"serves 2 models \(tiny-teacher, other\); set it"):
        _client(server).connect(tok, 64)


def test_tokenizer_mismatch(server, teacher):
    _, tok = teacher
    server.tokenize_offset = 1  # the server's tokenizer is another one
    with pytest.raises(ServedTeacherError) as err:
        _client(server).connect(tok, 64)
    text = _one_line(err.value)
    assert text.startswith("stage3.teacher.url: tokenizer mismatch: 'tiny-teacher' tokenizes the probe text as [")
    assert text.endswith("serve a teacher that shares the student's tokenizer and vocabulary")
    assert not err.value.infrastructure


def test_vocabulary_mismatch_without_a_tokenize_endpoint(server, teacher, caplog):
    _, tok = teacher
    server.tokenize_endpoint = False
    server.id_offset = 512  # ids beyond the student's 512-token vocabulary
    with caplog.at_level(logging.WARNING, logger="training"), pytest.raises(ServedTeacherError) as err:
        _client(server).connect(tok, 64)
    assert any("has no /tokenize endpoint" in r.message for r in caplog.records)
    text = _one_line(err.value)
    assert "returned token id" in text and "outside the student's 512-token vocabulary" in text


def test_response_without_logprobs(server, teacher):
    _, tok = teacher
    server.drop_prompt_logprobs = True
    with pytest.raises(ServedTeacherError) as err:
        _client(server).connect(tok, 64)
    assert _one_line(err.value).startswith("stage3.teacher.url: the response has no prompt_logprobs")
    assert not err.value.infrastructure


def test_top_k_above_the_servers_cap_and_context_length(server, teacher):
    _, tok = teacher
    with pytest.raises(ServedTeacherError) as err:
        _client(server, top_k=21).connect(tok, 64)
    text = _one_line(err.value)
    assert "answered HTTP 400: Requested prompt logprobs of 21, which is greater than max allowed: 20" in text
    assert "start vLLM with --max-logprobs >= 21 or lower top_k" in text
    with pytest.raises(ServedTeacherError, match=r"^data.seq_len: 255 \+ 2 tokens per request exceed"):
        _client(server).connect(tok, 255)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage1_9.teacher.url=http://h:8000"],
         "stage1_9.teacher.url: a served teacher returns logits only, and Stage 1.9's layer-wise loss needs"),
        (["stage3.teacher.url=h:8000"], "stage3.teacher.url: 'h:8000' is not an http(s) URL"),
        (["stage3.teacher.url=http://h:8000", "stage3.teacher.pretrained=Qwen/Qwen3-4B"],
         "stage3.teacher: url and pretrained both set"),
        (["stage3.teacher.top_k=0"], "stage3.teacher.top_k: must be >= 1"),
        (["stage3.teacher.timeout_s=0"], "stage3.teacher.timeout_s: must be > 0"),
    ],
)  # fmt: skip
def test_bad_teacher_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    assert _one_line(err.value).startswith(message)
    compose_config(["stage1_9.teacher.url=http://h:8000", "stage1_9.loss.lm_loss_weight=1.0"])  # allowed


def _loader():
    blocks = TokenBlocks((torch.arange(40 * 6).view(40, 6) % 512).int())
    return BlockLoader(blocks, batch_size=4, seed=0)


def test_prefetching_loader_hands_out_the_same_batches_and_resumes_exactly():
    calls = []

    def fetch(batch):
        calls.append(batch["input_ids"][0, 0].item())
        return topk_from_logits(torch.randn(*batch["input_ids"].shape, 512), 2)

    plain, wrapped = _loader(), PrefetchingTeacherLoader(_loader(), fetch)
    first = [wrapped.next_batch() for _ in range(3)]
    assert all(torch.equal(b["input_ids"], plain.next_batch()["input_ids"]) for b in first)
    assert first[0]["teacher_topk_ids"].shape == (4, 6, 2)
    deadline = time.monotonic() + 10
    while len(calls) < 4 and time.monotonic() < deadline:  # the fetch ahead runs in the thread
        time.sleep(0.01)
    assert len(calls) == 4  # one batch fetched ahead
    state = wrapped.state_dict()
    assert state == plain.state_dict()  # the prefetched batch is not counted as consumed
    nxt = wrapped.next_batch()["input_ids"]
    resumed = PrefetchingTeacherLoader(_loader(), fetch)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch()["input_ids"], nxt)
    wrapped.batch_size = 2  # auto batch size: the prefetched batch is dropped and refetched at the new size
    assert wrapped.next_batch()["input_ids"].shape[0] == 2
    wrapped.close()
    resumed.close()


def test_prefetching_loader_rewinds_after_a_failed_fetch():
    fail = {"on": False}

    def fetch(batch):
        if fail["on"]:
            raise ServedTeacherError("stage3.teacher.url: down", infrastructure=True)
        return topk_from_logits(torch.randn(*batch["input_ids"].shape, 512), 2)

    wrapped, plain = PrefetchingTeacherLoader(_loader(), fetch, prefetch=False), _loader()
    wrapped.next_batch(), plain.next_batch()
    fail["on"] = True
    with pytest.raises(ServedTeacherError):
        wrapped.next_batch()
    assert wrapped.state_dict() == plain.state_dict()  # nothing skipped
    fail["on"] = False
    assert torch.equal(wrapped.next_batch()["input_ids"], plain.next_batch()["input_ids"])
    wrapped.close()
