"""Out-of-core layer-by-layer calibration (`--low-memory`): blocks load from the checkpoint one at
a time, and the result equals the in-memory run."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import diffq
from diffq.cli import main
from diffq.commands import llm
from diffq.core.recipe import load_recipe
from diffq.errors import InputError
from diffq.integrations import llm as llm_glue
from diffq.integrations.lowmem import load_skeleton, on_meta
from diffq.nn import QLinear
from diffq.sequential import find_blocks
from tests import llm_models as lm


def _settings(src, data, out, low_memory):
    return llm.LLMCalibrateSettings(src, data, "llm-w4a16-gptq", num_samples=4, seq_len=32,
                                    out=out, low_memory=low_memory)


@pytest.fixture
def llama_dir(tmp_path):
    src = lm.save_model_dir(lm.llama(layers=3), tmp_path / "tiny")
    data = tmp_path / "text.txt"
    data.write_text(lm.TEXT, encoding="utf-8")
    return src, data


def test_low_memory_equals_in_memory(llama_dir, tmp_path):
    src, data = llama_dir
    for low, name in ((False, "full"), (True, "low")):
        llm.run_llm_calibrate(_settings(src, data, tmp_path / name, low))
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "low" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_blocks_are_loaded_one_at_a_time(llama_dir):
    src, data = llama_dir
    model, lazy = load_skeleton(src, lambda m: find_blocks(m)[0])
    prefix, blocks = find_blocks(model)
    assert all(on_meta(b) for b in blocks)
    assert not on_meta(model.model.embed_tokens) and not on_meta(model.lm_head)
    seen = []

    def load_block(name: str) -> None:
        i = int(name.rsplit(".", 1)[1])
        float_linears = [n for n, m in model.named_modules()
                         if type(m) is nn.Linear and not m.weight.is_meta and n.startswith(prefix)]
        seen.append((i, float_linears, [on_meta(b) for b in blocks]))
        lazy.load_block(name)

    tok = llm_glue.load_tokenizer(src)
    ids = llm_glue.windows(llm_glue.token_stream(tok, data.read_text()), 4, 32)
    diffq.quantize(model, load_recipe("llm-w4a16-gptq"), calibration=llm_glue.calibration_items(ids, 2),
                   load_block=load_block)
    assert [i for i, _, _ in seen] == [0, 1, 2]
    for i, float_linears, meta in seen:
        assert float_linears == []  # earlier blocks are quantized, later ones not loaded yet
        assert meta == [j >= i for j in range(len(blocks))]
    assert not on_meta(model)
    assert isinstance(model.model.layers[2].mlp.down_proj, QLinear)


def test_low_memory_bad_inputs(llama_dir, tmp_path, capsys):
    src, data = llama_dir
    capsys.readouterr()
    assert main(["calibrate", "--low-memory", "--out", str(tmp_path / "x")]) == 2
    assert "--low-memory is for transformers models" in capsys.readouterr().err
    gpt = lm.save_model_dir(lm.gpt2(), tmp_path / "gpt")
    with pytest.raises(InputError, match="Conv1D"):
        llm.run_llm_calibrate(_settings(gpt, data, tmp_path / "g", True))
    (src / "model.safetensors").unlink()
    with pytest.raises(InputError, match="needs safetensors weights"):
        llm.run_llm_calibrate(_settings(src, data, tmp_path / "n", True))
    assert not (tmp_path / "g").exists() and not (tmp_path / "n").exists()


def test_device_map_offloaded_llm_quantizes_like_in_memory(llama_dir, tmp_path):
    """transformers' device_map with every weight on disk: the layer-by-layer GPTQ pass gives
    the in-memory result, and the quantized layers end up in memory."""
    from transformers import LlamaForCausalLM

    from tests.conftest import assert_same_quantized_layers

    src, data = llama_dir
    tok = llm_glue.load_tokenizer(src)
    ids = llm_glue.windows(llm_glue.token_stream(tok, data.read_text()), 4, 32)
    items = llm_glue.calibration_items(ids, 2)
    plain = diffq.quantize(LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval(),
                           "llm-w4a16-gptq", calibration=items)
    offloaded = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32, device_map="auto",
                                                 max_memory={"cpu": "1MB"},
                                                 offload_folder=str(tmp_path / "off")).eval()
    assert offloaded.model.layers[0].mlp.down_proj.weight.is_meta
    diffq.quantize(offloaded, "llm-w4a16-gptq", calibration=items)
    assert_same_quantized_layers(plain, offloaded)
    with torch.no_grad():
        assert torch.equal(plain(**items[0]).logits, offloaded(**items[0]).logits)
