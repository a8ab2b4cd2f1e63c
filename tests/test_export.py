"""compressed-tensors export of weight-only int8 / int4 LLM layers."""
import json

import pytest
import torch
from safetensors.torch import load_file

import diffq
from diffq.errors import CheckpointError
from diffq.export import compressed_tensors, pack_int32, unpack_int32


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def test_pack_matches_the_spec_example():
    # compressed-tensors' pack_to_int32 docstring: 8-bit [1, 2] -> 129 | 130 << 8 = 33409
    assert pack_int32(torch.tensor([[1, 2]], dtype=torch.int8), 8).item() == 33409
    codes = torch.randint(-8, 8, (5, 19), dtype=torch.int8)
    assert torch.equal(unpack_int32(pack_int32(codes, 4), 4, 19), codes)


@pytest.mark.parametrize("recipe,fmt", [("w8", "int-quantized"), ("w4g64", "pack-quantized")])
def test_export_names_shapes_and_values(recipe, fmt, tmp_path):
    model = diffq.quantize(tiny_llama(), recipe)
    compressed_tensors(model, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == fmt
    assert cfg["model_type"] == "llama"
    (group,) = q["config_groups"].values()
    w = group["weights"]
    assert w["num_bits"] == (8 if recipe == "w8" else 4) and w["type"] == "int" and w["symmetric"]
    assert w["strategy"] == ("channel" if recipe == "w8" else "group")
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, diffq.nn.QLinear)}
    assert set(group["targets"]) == set(layers)
    for name, layer in layers.items():
        out_f, in_f = layer.weight_shape
        scale = tensors[f"{name}.weight_scale"]
        if recipe == "w8":
            codes = tensors[f"{name}.weight"]
            assert codes.dtype == torch.int8 and codes.shape == (out_f, in_f) and scale.shape == (out_f, 1)
            deq = codes.float() * scale
        else:
            packed = tensors[f"{name}.weight_packed"]
            assert packed.dtype == torch.int32 and packed.shape == (out_f, in_f // 8)
            assert tensors[f"{name}.weight_shape"].tolist() == [out_f, in_f]
            assert scale.shape == (out_f, in_f // 64)
            codes = unpack_int32(packed, 4, in_f).float()
            deq = (codes.reshape(out_f, -1, 64) * scale[..., None]).reshape(out_f, in_f)
        assert torch.equal(deq, layer.quantized_weight.dequantize())
    assert "model.embed_tokens.weight" in tensors and tensors["model.embed_tokens.weight"].is_floating_point()


def test_export_refuses_activation_quantized_layers(tmp_path):
    model = diffq.quantize(tiny_llama(), "w8a8-dynamic")
    with pytest.raises(CheckpointError, match="weight-only"):
        compressed_tensors(model, tmp_path / "ct")
