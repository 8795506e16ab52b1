"""export_bitnet -> plain AutoModelForCausalLM.from_pretrained -> same logits as our model at lambda = 1.

Tolerance: the exported model computes ``(x_int @ codes.T) / (weight_scale * s_x)`` with packed codes,
ours ``(x_int / s_x) @ (codes * scale).T``; same math, different float32 rounding order, so logits
agree to ~1e-6 relative. A flipped int8 rounding decision anywhere would move logits by ~1e-3, so
``atol=1e-4`` also checks that none happened in these seeded cases.
"""

import importlib.util
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.integrations.bitnet import unpack_weights

from training.bitnet import (
    SaliencyCurriculum,
    convert_model_to_bitnet,
    export_bitnet,
    insert_subln,
    ternarize,
)

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(autouse=True)
def eager_bitnet_loading(monkeypatch):
    """Run transformers' BitNet code the way a CPU user would, minus two environment costs.

    transformers' BitNet quantizer refuses to load without the ``accelerate`` package, which this
    project's environment does not ship (it is not a dependency); the CPU load path never calls it,
    so the availability check is patched only when the package is missing. Its BitLinear helpers are
    wrapped in ``torch.compile``; "force_eager" runs them uncompiled (same math, no compile minutes).
    """
    if importlib.util.find_spec("accelerate") is None:
        import transformers.quantizers.quantizer_bitnet as quantizer_bitnet

        monkeypatch.setattr(quantizer_bitnet, "is_accelerate_available", lambda: True)
    with torch.compiler.set_stance("force_eager"):
        yield


def converted(model_cls, config, seed=0):
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    insert_subln(model)
    convert_model_to_bitnet(model)
    with torch.no_grad():  # move away from init so norms, biases and scales all matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))


def load_and_compare(model, out_dir):
    with torch.no_grad():
        expected = model(ids()).logits
    loaded, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert type(loaded).__name__ == "BitNetForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        got = loaded(ids()).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    return loaded


def test_llama_export_loads_as_bitnet_with_matching_logits(tmp_path):
    model = converted(LlamaForCausalLM, LlamaConfig(**TINY))
    model.bitnet_lambda.set_value(0.3)  # export is the lambda = 1 model whatever the controller holds
    out = export_bitnet(model, tmp_path / "bitnet")
    model.bitnet_lambda.set_value(1.0)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bitnet"
    assert config["quantization_config"] == {
        "quant_method": "bitnet",
        "linear_class": "bitlinear",
        "quantization_mode": "offline",
    }
    assert config["hidden_act"] == "silu" and config["eos_token_id"] == 2
    loaded = load_and_compare(model, out)
    q_ours = model.model.layers[1].self_attn.q_proj
    q_theirs = loaded.model.layers[1].self_attn.q_proj
    codes, scale = ternarize(q_ours.weight)
    assert q_theirs.weight.dtype == torch.uint8 and q_theirs.weight.shape == (64 // 4, 64)
    assert torch.equal(unpack_weights(q_theirs.weight, dtype=torch.float32), codes.float())
    torch.testing.assert_close(q_theirs.weight_scale, (1.0 / scale).reshape(1))


def test_qwen2_attention_biases_export_with_zero_o_proj_bias(tmp_path):
    model = converted(Qwen2ForCausalLM, Qwen2Config(**TINY), seed=1)
    out = export_bitnet(model, tmp_path / "qwen2")
    assert json.loads((out / "config.json").read_text())["attention_bias"] is True
    loaded = load_and_compare(model, out)
    assert torch.equal(loaded.model.layers[0].self_attn.o_proj.bias, torch.zeros(64))


def test_tied_embeddings_and_tokenizer_are_saved(tmp_path):
    model = converted(LlamaForCausalLM, LlamaConfig(**TINY, tie_word_embeddings=True), seed=2)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    out = export_bitnet(model, tmp_path / "tied", tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == [3, 4]
    loaded = load_and_compare(model, out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_qwen3_qk_norm_is_rejected(tmp_path):
    model = converted(Qwen3ForCausalLM, Qwen3Config(**TINY, head_dim=16))
    with pytest.raises(ValueError) as err:
        export_bitnet(model, tmp_path / "qwen3")
    assert str(err.value) == (
        "export_bitnet: layers[0].self_attn.q_norm (Qwen3 QK-norm) is not supported by BitNetForCausalLM"
    )


def test_model_without_subln_is_rejected(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    convert_model_to_bitnet(model)
    with pytest.raises(
        ValueError, match=r"^export_bitnet: layers\[0\] has no SubLN norms; call insert_subln"
    ):
        export_bitnet(model, tmp_path / "x")


def test_unconverted_model_is_rejected(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    insert_subln(model)
    with pytest.raises(
        ValueError, match=r"^export_bitnet: layers\[0\]\.self_attn\.q_proj is Linear, not BitLinear"
    ):
        export_bitnet(model, tmp_path / "x")


def test_still_protected_saliency_columns_are_rejected(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    insert_subln(model)
    curriculum = SaliencyCurriculum(0.1, 0.0, total_steps=10)
    convert_model_to_bitnet(model, saliency=curriculum)
    with pytest.raises(ValueError, match=r"keeps 6 columns full precision \(protect_k=0.1\)"):
        export_bitnet(model, tmp_path / "x")
    curriculum.step(model, 10)  # annealed to k = 0: exportable, and saliency_ema stays out of the file
    load_and_compare(model, export_bitnet(model, tmp_path / "annealed"))


def test_weight_only_model_exports_with_a_warning(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    insert_subln(model)
    convert_model_to_bitnet(model, quantize_activations=False)
    with pytest.warns(UserWarning, match="quantize_activations=False"):
        out = export_bitnet(model, tmp_path / "weights_only")
    assert (out / "model.safetensors").is_file()
