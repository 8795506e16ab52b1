"""SubLN insertion and BitLinear conversion on tiny Llama / Qwen2 / Qwen3 models built from config."""

import copy
import io

import pytest
import torch
import torch.nn as nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from training.bitnet import (
    BitLinear,
    LambdaController,
    SaliencyBitLinear,
    SaliencyCurriculum,
    bitlinear_modules,
    convert_model_to_bitnet,
    insert_subln,
)

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
ARCHS = {
    "llama": (LlamaForCausalLM, LlamaConfig),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny(arch="llama", seed=0):
    model_cls, config_cls = ARCHS[arch]
    torch.manual_seed(seed)
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    return model_cls(config_cls(**TINY, **extra)).eval()


def ids(seed=1):
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def projections(layer):
    return [
        getattr(layer.self_attn if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp, n)
        for n in PROJECTIONS
    ]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_insert_subln_places_norms_before_o_proj_and_down_proj(arch):
    model = tiny(arch)
    raw, seen = [], []
    for layer in model.model.layers:
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            # Registered before insert_subln, so this pre-hook sees the projection input before the norm.
            proj.register_forward_pre_hook(lambda m, args: raw.append(args[0]))
            proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    assert insert_subln(model) == 4
    for layer in model.model.layers:
        for norm, proj in (
            (layer.self_attn.attn_sub_norm, layer.self_attn.o_proj),
            (layer.mlp.ffn_sub_norm, layer.mlp.down_proj),
        ):
            assert torch.equal(norm.weight, torch.ones(proj.in_features))
            assert norm.variance_epsilon == 1e-5 and norm.weight.dtype == proj.weight.dtype
    keys = model.state_dict().keys()
    assert "model.layers.1.self_attn.attn_sub_norm.weight" in keys
    assert "model.layers.1.mlp.ffn_sub_norm.weight" in keys
    with torch.no_grad():
        model(ids())
    assert len(seen) == len(raw) == 4
    for x, y in zip(raw, seen):
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


def test_subln_changes_the_function():
    model = tiny()
    with torch.no_grad():
        before = model(ids()).logits
        insert_subln(model)
        after = model(ids()).logits
    assert not torch.allclose(before, after, atol=1e-3)


def test_insert_subln_twice_is_an_error():
    model = tiny()
    insert_subln(model)
    with pytest.raises(ValueError) as err:
        insert_subln(model)
    assert str(err.value) == "insert_subln: layers[0] already has attn_sub_norm; SubLN can be inserted once"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_convert_swaps_decoder_projections_only(arch):
    model = tiny(arch)
    insert_subln(model)
    ctrl = LambdaController(value=0.0)
    with torch.no_grad():
        before = model(ids()).logits
    summary = convert_model_to_bitnet(model, lambda_ctrl=ctrl)
    for layer in model.model.layers:
        assert all(type(p) is BitLinear and p.lambda_ctrl is ctrl for p in projections(layer))
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert model.bitnet_lambda is ctrl
    assert len(list(bitlinear_modules(model))) == summary.layers_converted == 14
    ternary = sum(p.weight.numel() for p in bitlinear_modules(model))
    assert summary.ternary_params == ternary
    assert summary.fp_params == sum(p.numel() for p in model.parameters()) - ternary
    assert str(summary).startswith("converted 14 linear layers: ") and "\n" not in str(summary)
    # lambda = 0: exactly the SubLN model before conversion (so the SubLN hooks moved to the BitLinears).
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, before)
        ctrl.set_value(1.0)
        assert not torch.allclose(model(ids()).logits, before, atol=1e-3)


def test_convert_keeps_dtype_and_requires_grad_and_default_controller():
    model = tiny().double()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    convert_model_to_bitnet(model, quantize_activations=False)
    up = model.model.layers[0].mlp.up_proj
    assert up.weight.dtype == torch.float64 and not up.weight.requires_grad and not up.quantize_activations
    assert isinstance(model.bitnet_lambda, LambdaController) and model.bitnet_lambda.value == 1.0


def test_convert_twice_is_an_error():
    model = tiny()
    convert_model_to_bitnet(model)
    with pytest.raises(ValueError) as err:
        convert_model_to_bitnet(model)
    assert str(err.value) == (
        "convert_model_to_bitnet: layers[0].self_attn.q_proj is already a BitLinear; convert once"
    )


def test_convert_with_saliency_uses_saliency_layers_at_initial_k():
    model = tiny()
    cur = SaliencyCurriculum(0.1, 0.0, total_steps=20)
    convert_model_to_bitnet(model, saliency=cur)
    layers = list(bitlinear_modules(model))
    assert all(isinstance(m, SaliencyBitLinear) and m.protect_k == pytest.approx(0.1) for m in layers)
    cur.step(model, 20)
    assert all(m.protect_k == 0.0 for m in layers)


def test_deepcopy_and_pickle_keep_their_own_subln_and_controller():
    model = tiny()
    insert_subln(model)
    convert_model_to_bitnet(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        reference = model(ids()).logits
        assert torch.equal(clone(ids()).logits, reference)
        clone.model.layers[0].self_attn.attn_sub_norm.weight.mul_(3.0)
        assert not torch.allclose(clone(ids()).logits, reference)
        assert torch.equal(model(ids()).logits, reference)
    assert clone.bitnet_lambda is not model.bitnet_lambda
    assert all(m.lambda_ctrl is clone.bitnet_lambda for m in bitlinear_modules(clone))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, reference)


def test_state_dict_round_trip_into_fresh_converted_model():
    trained = tiny(seed=0)
    insert_subln(trained)
    convert_model_to_bitnet(trained)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fresh = tiny(seed=5)
    insert_subln(fresh)
    convert_model_to_bitnet(fresh)
    fresh.load_state_dict(trained.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(ids()).logits, trained(ids()).logits)


def test_unsupported_architecture_names_the_class():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    expected = (
        "{}: unsupported architecture GPT2LMHeadModel (expected model.model.layers[*].self_attn.o_proj "
        "and .mlp.down_proj as in Llama/Qwen2/Qwen3)"
    )
    for fn in (insert_subln, convert_model_to_bitnet):
        with pytest.raises(ValueError) as err:
            fn(gpt2)
        assert str(err.value) == expected.format(fn.__name__)
