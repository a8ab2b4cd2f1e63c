"""LoRA on calibrated W8A8 denoisers, whole models: a tiny SD3 transformer (diffusers' SD3 loader
and PEFT) through load / set_adapters / disable / enable / unload / fuse refusal / save-load,
and torch.compile of the adapted W8A8 UNet and DiT with no graph break and eager outputs."""
import copy

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from peft.tuners.lora.layer import LoraLayer

import diffq
from diffq.assets import shipped
from diffq.errors import QuantizedWeightError
from diffq.nn import QLinear, QuantizedLayer
from diffq.ops import onednn
from tests.dit_pipelines import LOAD_KWARGS, build
from tests.integrations.test_dit import drive
from tests.integrations.test_lora import adapter_lifecycle, save_adapter

SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "ff.net.2"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]


def _sd3_inputs(model, seed: int = 0, t: float = 500.0):
    g, c = torch.Generator().manual_seed(seed), model.config
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 6, c.joint_attention_dim, generator=g)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
    return x, ctx, pooled, torch.tensor([t, t])


def _sd3_out(model, seed: int = 0, t: float = 500.0):
    x, ctx, pooled, ts = _sd3_inputs(model, seed, t)
    with torch.inference_mode():
        return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                     timestep=ts).sample


def _wrapped(model) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(the float tiny SD3 pipeline's transformer state, adapter folders a and b, a W8A8 copy
    calibrated on its own pipeline and saved)."""
    pipe, kw = build("sd3")
    fp_state = copy.deepcopy(pipe.transformer.state_dict())
    root = tmp_path_factory.mktemp("sd3-lora")
    for name, seed in (("a", 1), ("b", 2)):
        save_adapter(pipe.transformer, root / name, SD3_TARGETS, seed,
                      lambda f, sd: StableDiffusion3Pipeline.save_lora_weights(f, transformer_lora_layers=sd),
                      b_std=0.5)  # the tiny SD3 is 16 wide: a larger B for a visible effect
    diffq.quantize(pipe.transformer, "w8a8", calibration=drive(pipe, "sd3", kw))
    pipe.save_pretrained(root / "q")
    return fp_state, root / "a", root / "b", root / "q"


def _quantized_sd3(sd3):
    with diffq.register():
        return DiffusionPipeline.from_pretrained(sd3[3], **LOAD_KWARGS["sd3"])


def test_dit_adapter_on_w8a8_layers_follows_the_float_adapter(sd3):
    fp = build("sd3")[0]
    fp.transformer.load_state_dict(sd3[0])
    q = _quantized_sd3(sd3)
    base_fp, base_q = _sd3_out(fp.transformer), _sd3_out(q.transformer)
    fp.load_lora_weights(sd3[1], adapter_name="a")
    q.load_lora_weights(sd3[1], adapter_name="a")
    wrapped = _wrapped(q.transformer)
    assert len(wrapped) >= 12 and all(isinstance(m.base_layer, QuantizedLayer) for m in wrapped.values())
    assert any(m.base_layer.input_quant is not None for m in wrapped.values())  # int8 activations
    effect_fp, effect_q = _sd3_out(fp.transformer) - base_fp, _sd3_out(q.transformer) - base_q
    assert effect_fp.norm() > 0.05 * base_fp.norm()  # the adapter does something
    cos = torch.nn.functional.cosine_similarity(effect_fp.flatten(), effect_q.flatten(), dim=0)
    ratio = effect_q.norm() / effect_fp.norm()
    assert cos > 0.98 and abs(ratio - 1) < 0.1, (cos, ratio)


def test_dit_set_adapters_disable_enable_unload_fuse(sd3):
    pipe = _quantized_sd3(sd3)

    def fuse_refused():
        before = _sd3_out(pipe.transformer)
        with pytest.raises(QuantizedWeightError, match="fuse_lora.*not supported"):
            pipe.fuse_lora()
        torch.testing.assert_close(_sd3_out(pipe.transformer), before)  # nothing half-merged

    adapter_lifecycle(pipe, lambda: pipe.transformer, lambda: _sd3_out(pipe.transformer), sd3[1], sd3[2],
                      fuse_refused)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, QLinear)


def test_dit_saved_with_an_adapter_loaded_reloads_without_it(sd3, tmp_path):
    pipe = _quantized_sd3(sd3)
    base = _sd3_out(pipe.transformer)
    pipe.load_lora_weights(sd3[1], adapter_name="a")
    adapted = _sd3_out(pipe.transformer)
    pipe.save_pretrained(tmp_path / "q")
    with diffq.register():
        back = DiffusionPipeline.from_pretrained(tmp_path / "q", **LOAD_KWARGS["sd3"])
    assert not _wrapped(back.transformer)
    assert torch.equal(_sd3_out(back.transformer), base)
    back.load_lora_weights(sd3[1], adapter_name="a")
    assert torch.equal(_sd3_out(back.transformer), adapted)


def _compiles_whole(model, args: tuple, kwargs: dict, other_t: dict, fp=None) -> None:
    """No graph break in the adapted quantized model, compiled output = eager (also at another
    timestep group, without recompiling into a break), oneDNN int8 inside the compiled call.
    With `fp` (the float model with the same adapter) "=" means as accurate: the compiled graph
    rounds some float ops differently (GroupNorm by up to 5e-7), which can move an activation
    code by one step, and in a trained UNet one such flip cascades through the static layers
    (tiny-sd: one code of 16384 at the first proj_in, 3e-4 there, 2.5e-2 at the output, while
    that layer compiled alone equals eager to 6e-8)."""
    from torch.profiler import profile

    def check(y, ref, *call):
        if fp is None:
            assert float((y.sample - ref.sample).norm() / ref.sample.norm()) < 1e-4
            return
        want = fp(*call[0], **call[1]).sample
        err = lambda out: float((out.sample - want).norm() / want.norm())  # noqa: E731
        assert err(y) < 1.3 * err(ref) + 1e-4, (err(y), err(ref))

    with torch.no_grad():
        explained = torch._dynamo.explain(model)(*args, **kwargs)
        # (explain counts the timestep pre-hook as a graph of its own; no break reasons anywhere)
        assert not explained.break_reasons, explained.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # raises on any break
        with profile() as prof:
            y = compiled(*args, **kwargs)
        check(y, model(*args, **kwargs), args, kwargs)
        check(compiled(*args, **(kwargs | other_t)), model(*args, **(kwargs | other_t)), args,
              kwargs | other_t)
    if onednn.available():
        assert {"onednn::qlinear_pointwise"} <= {e.key for e in prof.key_averages()}


def test_compile_an_adapted_w8a8_dit_in_one_graph(sd3):
    pipe = _quantized_sd3(sd3)
    pipe.load_lora_weights(sd3[1], adapter_name="a")
    x, ctx, pooled, ts = _sd3_inputs(pipe.transformer)
    _compiles_whole(pipe.transformer, (), dict(hidden_states=x, encoder_hidden_states=ctx,
                                               pooled_projections=pooled, timestep=ts),
                    {"timestep": torch.tensor([50.0, 50.0])})


@pytest.mark.slow  # 36 s here
def test_compile_an_adapted_w8a8_unet_in_one_graph(tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(shipped("tiny-sd"))
    pipe.set_progress_bar_config(disable=True)
    save_adapter(pipe.unet, tmp_path / "a", UNET_TARGETS, 1,
                  lambda f, sd: StableDiffusionPipeline.save_lora_weights(f, unet_lora_layers=sd))
    fp = copy.deepcopy(pipe.unet)
    fp.load_lora_adapter(str(tmp_path / "a"), prefix="unet", adapter_name="a",
                         weight_name="pytorch_lora_weights.safetensors")
    diffq.quantize(pipe.unet, "w8a8", calibration=lambda: pipe(
        ["a red circle", "a blue square"], num_inference_steps=4, output_type="latent",
        generator=torch.Generator().manual_seed(0)))
    pipe.load_lora_weights(tmp_path / "a", adapter_name="a")
    assert _wrapped(pipe.unet)
    g, c = torch.Generator().manual_seed(0), pipe.unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    ctx = torch.randn(2, 16, c.cross_attention_dim, generator=g)
    _compiles_whole(pipe.unet, (x, torch.tensor([500, 500]), ctx), {},
                    {}, fp)  # the timestep is positional here: a second group is tested on the DiT
