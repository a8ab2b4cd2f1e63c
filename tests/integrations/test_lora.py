"""LoRA adapters on diffq-quantized denoisers through diffusers' own loader and PEFT (real
classes): each adapted layer keeps its quantized kernel and adds a float low-rank branch on its
input; set_adapters / disable / enable / unload work, fuse_lora is refused in one line, and a
pipeline saved with an adapter loaded reloads without it (the adapter is its own file)."""
import copy

import pytest
import torch
from diffusers import DiffusionPipeline, PipelineQuantizationConfig, StableDiffusionPipeline
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from peft.utils import get_peft_model_state_dict

import diffq
from diffq.assets import shipped
from diffq.errors import QuantizedWeightError
from diffq.nn import QConv2d, QLinear, QuantizedLayer

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]  # proj_in: a 1x1 conv


def save_adapter(model, folder, targets, seed: int, save, b_std: float = 0.05, rank: int = 4) -> None:
    """A random adapter on a copy of `model` (B non-zero, so it changes the output), saved by
    `save(folder, state)` as diffusers saves LoRAs."""
    fp = copy.deepcopy(model)
    fp.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fp.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
    save(folder, get_peft_model_state_dict(fp))


def _adapter(unet, folder, seed: int) -> None:
    save_adapter(unet, folder, TARGETS, seed,
                 lambda f, sd: StableDiffusionPipeline.save_lora_weights(f, unet_lora_layers=sd))


def _unet_out(unet, seed: int = 0):
    g, c = torch.Generator().manual_seed(seed), unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    ctx = torch.randn(2, 16, c.cross_attention_dim, generator=g)
    with torch.inference_mode():
        return unet(x, torch.tensor([500, 500]), ctx).sample


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    unet = StableDiffusionPipeline.from_pretrained(shipped("tiny-sd")).unet
    folders = tmp_path_factory.mktemp("lora")
    _adapter(unet, folders / "a", seed=1)
    _adapter(unet, folders / "b", seed=2)
    return folders / "a", folders / "b"


def _quantized_pipe():
    with diffq.register():
        cfg = PipelineQuantizationConfig(quant_backend="diffq", quant_kwargs={"recipe": "w8"},
                                         components_to_quantize=["unet"])
        return DiffusionPipeline.from_pretrained(shipped("tiny-sd"), quantization_config=cfg)


def _wrapped(unet) -> dict[str, LoraLayer]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}


def test_adapted_layers_keep_their_kernel_and_add_the_float_branch(adapters):
    pipe = _quantized_pipe()
    pipe.load_lora_weights(adapters[0], adapter_name="a")
    wrapped = _wrapped(pipe.unet)
    assert wrapped and all(isinstance(m.base_layer, QuantizedLayer) for m in wrapped.values())
    assert any(isinstance(m.base_layer, QConv2d) for m in wrapped.values())
    for name in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                 "down_blocks.0.attentions.0.proj_in"):
        layer = wrapped[name]
        base = layer.base_layer
        shape = (2, 16, base.in_features) if isinstance(base, QLinear) else (2, base.in_channels, 8, 8)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            delta = layer.lora_B["a"](layer.lora_A["a"](x)) * layer.scaling["a"]
            torch.testing.assert_close(layer(x), layer.base_layer(x) + delta, rtol=1e-5, atol=1e-6)


def test_the_adapter_changes_the_quantized_model_as_it_changes_the_float_one(adapters):
    fp = StableDiffusionPipeline.from_pretrained(shipped("tiny-sd"))
    q = _quantized_pipe()
    base_fp, base_q = _unet_out(fp.unet), _unet_out(q.unet)
    fp.load_lora_weights(adapters[0], adapter_name="a")
    q.load_lora_weights(adapters[0], adapter_name="a")
    effect_fp, effect_q = _unet_out(fp.unet) - base_fp, _unet_out(q.unet) - base_q
    assert effect_fp.norm() > 0.05 * base_fp.norm()  # the adapter does something
    cos = torch.nn.functional.cosine_similarity(effect_fp.flatten(), effect_q.flatten(), dim=0)
    assert cos > 0.99 and abs(effect_q.norm() / effect_fp.norm() - 1) < 0.05


def adapter_lifecycle(pipe, denoiser, out, a, b, check_both=lambda: None):
    """Two adapters through diffusers' set_adapters / disable / enable / unload on a quantized
    pipeline whose denoiser is `denoiser()` and output `out()`; `check_both()` runs while both
    are active (a at 1.0, b at 0.5)."""
    base = out()
    pipe.load_lora_weights(a, adapter_name="a")
    only_a = out()
    pipe.load_lora_weights(b, adapter_name="b")
    pipe.set_adapters(["a"], [1.0])
    torch.testing.assert_close(out(), only_a)
    pipe.set_adapters(["a", "b"], [0.0, 1.0])
    assert not torch.allclose(out(), only_a)
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    both = out()
    check_both()
    pipe.disable_lora()
    torch.testing.assert_close(out(), base)
    pipe.enable_lora()
    torch.testing.assert_close(out(), both)
    pipe.unload_lora_weights()
    assert not _wrapped(denoiser()) and any(isinstance(m, QLinear) for m in denoiser().modules())
    torch.testing.assert_close(out(), base)


def test_set_adapters_disable_enable_unload(adapters):
    pipe = _quantized_pipe()

    def layer_by_layer():
        # each adapter's weighted branch adds to the same quantized base
        layer = _wrapped(pipe.unet)["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
        x = torch.randn(2, 16, layer.base_layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            branch = {n: layer.lora_B[n](layer.lora_A[n](x)) * layer.scaling[n] for n in ("a", "b")}
            torch.testing.assert_close(layer(x), layer.base_layer(x) + branch["a"] + branch["b"],
                                       rtol=1e-5, atol=1e-6)  # scaling["b"] already holds the 0.5

    adapter_lifecycle(pipe, lambda: pipe.unet, lambda: _unet_out(pipe.unet), *adapters, layer_by_layer)
    assert isinstance(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, QLinear)


def test_fuse_lora_is_refused_in_one_line(adapters):
    pipe = _quantized_pipe()
    pipe.load_lora_weights(adapters[0], adapter_name="a")
    before = _unet_out(pipe.unet)
    with pytest.raises(QuantizedWeightError, match="fuse_lora.*not supported") as e:
        pipe.fuse_lora()
    assert "\n" not in str(e.value)
    torch.testing.assert_close(_unet_out(pipe.unet), before)  # nothing half-merged


def test_saved_with_an_adapter_loaded_reloads_without_it(adapters, tmp_path):
    pipe = _quantized_pipe()
    base = _unet_out(pipe.unet)
    pipe.load_lora_weights(adapters[0], adapter_name="a")
    adapted = _unet_out(pipe.unet)
    pipe.save_pretrained(tmp_path / "q")
    with diffq.register():
        back = DiffusionPipeline.from_pretrained(tmp_path / "q")
    assert not _wrapped(back.unet)
    assert torch.equal(_unet_out(back.unet), base)
    back.load_lora_weights(adapters[0], adapter_name="a")
    assert torch.equal(_unet_out(back.unet), adapted)


@pytest.mark.parametrize("mode", [None, "static", "dynamic"])
def test_compile_traces_an_adapted_quantized_layer_without_graph_breaks(mode):
    from peft import inject_adapter_in_model
    from torch import nn

    from diffq.core.recipe import ActivationSpec, WeightSpec

    torch.manual_seed(0)
    act = None if mode is None else ActivationSpec(mode=mode, granularity="per_token" if mode == "dynamic"
                                                   else "per_tensor")
    model = nn.Sequential()
    model.add_module("proj", QLinear(nn.Linear(64, 48), WeightSpec("int8", "per_channel"), act))
    if mode == "static":
        model.proj.input_quant.set_table(torch.full((1, 1), 0.03), torch.zeros(0))
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["proj"], init_lora_weights="gaussian"), model)
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        torch._dynamo.reset()
        compiled, eager = torch.compile(model, backend="aot_eager")(x), model(x)
    if mode is None:  # eager runs torch's int8 decode kernel on bf16 rows, compiled the fp32 matmul
        assert float((compiled - eager).norm() / eager.norm()) < 5e-3
    else:
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_the_shipped_adapter_loads_on_a_quantized_pipeline():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "samples" / "tiny-sd-lora-squares"
    pipe = _quantized_pipe()
    base = _unet_out(pipe.unet)
    pipe.load_lora_weights(folder, adapter_name="squares")
    wrapped = _wrapped(pipe.unet)
    assert wrapped and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in wrapped)
    assert all(isinstance(m.base_layer, QLinear) for m in wrapped.values())
    assert float((_unet_out(pipe.unet) - base).norm() / base.norm()) > 0.01
