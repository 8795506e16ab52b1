"""Loading real teachers: local directories, hub ids without network, and models from configs."""

import time

import pytest
import torch
from transformers import LlamaConfig

from training import models
from training.data import builtin_corpus, train_bpe_tokenizer
from training.models import ModelError, build_model_from_config, load_pretrained_teacher

CONFIG = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=True,
)


def test_build_model_from_config_is_seeded():
    a = build_model_from_config(LlamaConfig(**CONFIG), seed=5)
    b = build_model_from_config(LlamaConfig(**CONFIG), seed=5)
    c = build_model_from_config(LlamaConfig(**CONFIG), seed=6)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
        assert not torch.equal(a(input_ids=ids).logits, c(input_ids=ids).logits)
    assert a.config.tie_word_embeddings


def test_local_directory_loads_in_the_requested_dtype(tmp_path):
    model = build_model_from_config(LlamaConfig(**CONFIG), seed=0)
    tokenizer = train_bpe_tokenizer(builtin_corpus()[:10], 300)
    tokenizer.pad_token = None  # like many hub tokenizers: the loader must supply one
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded, loaded_tok = load_pretrained_teacher(str(tmp_path), dtype=torch.float32)
    ids = torch.tensor([loaded_tok("x = 1")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded_tok.pad_token == loaded_tok.eos_token
    assert not loaded.training

    bf16, _ = load_pretrained_teacher(str(tmp_path), device="cpu")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_missing_local_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelError, match=r"^model: no directory '.*nowhere'.*model=tiny"):
        load_pretrained_teacher(str(tmp_path / "nowhere"))


def test_hub_model_without_network_fails_fast_and_suggests_tiny(monkeypatch):
    # Simulate no network even where the tests run with one; the local HF cache is tried first.
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    started = time.monotonic()
    with pytest.raises(ModelError) as info:
        load_pretrained_teacher("no-such-org/no-such-model-for-tests")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "'no-such-org/no-such-model-for-tests'" in message and "use model=tiny" in message
    assert "\n" not in message
