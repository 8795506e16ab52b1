"""A teacher served over HTTP (vLLM's OpenAI-compatible completions API) instead of held in memory.

``stage3.teacher.url`` / ``stage1_9.teacher.url`` switch it on: the stage's logits KD then runs on
the teacher's top-k prompt log-probabilities (training/distill/topk.py), fetched one batch ahead
(prefetch.py) from the server (vllm_client.py). See docs/served-teacher.md.
"""

from __future__ import annotations

from typing import Any

import torch

from training.distill.topk import TeacherTopK

from .errors import ServedTeacherError
from .prefetch import PrefetchingTeacherLoader
from .vllm_client import DEFAULT_TOP_K, ServedTeacherSettings, VLLMTeacher

__all__ = [
    "DEFAULT_TOP_K",
    "PrefetchingTeacherLoader",
    "ServedTeacher",
    "ServedTeacherError",
    "ServedTeacherSettings",
    "VLLMTeacher",
    "connect_served_teacher",
]


class ServedTeacher:
    """One stage's served teacher: the checked client and the loaders that prefetch from it."""

    def __init__(self, client: VLLMTeacher, prefetch: bool = True) -> None:
        self.client = client
        self.prefetch = prefetch
        self._loaders: list[PrefetchingTeacherLoader] = []

    def wrap(self, loader: Any, name: str) -> PrefetchingTeacherLoader:
        wrapped = PrefetchingTeacherLoader(loader, self._fetch_batch, name=name, prefetch=self.prefetch)
        self._loaders.append(wrapped)
        return wrapped

    def topk(self, batch: dict[str, torch.Tensor]) -> TeacherTopK:
        """The answer a prefetching loader attached to ``batch``, else fetched now (e.g. a probe batch)."""
        got = TeacherTopK.from_batch(batch)
        if got is not None:
            return got
        return self._fetch_batch(batch)

    def _fetch_batch(self, batch: dict[str, torch.Tensor]) -> TeacherTopK:
        return self.client.fetch(batch["input_ids"], batch.get("attention_mask"))

    def close(self) -> None:
        for loader in self._loaders:
            loader.close()
        self._loaders.clear()


def connect_served_teacher(
    teacher_cfg: Any, where: str, tokenizer: Any, vocab_size: int, seq_len: int
) -> ServedTeacher | None:
    """The stage's served teacher, connected and checked, or None when ``<where>.url`` is unset."""
    if not teacher_cfg.url:
        return None
    client = VLLMTeacher(ServedTeacherSettings.from_config(teacher_cfg, where), vocab_size)
    client.connect(tokenizer, seq_len)
    return ServedTeacher(client, prefetch=bool(teacher_cfg.prefetch))
