"""A quantized Linear runs the GELU of diffusers' `GELU` feed-forward input in its kernel's
epilogue (oneDNN post-op, or the compiled rescale of dynamic layers): same outputs as the
unfused model, no eager gelu left, state dict unchanged, fused again after save -> load."""
import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch.profiler import profile

import diffq
from diffq.nn.fuse import LinearAct, fuse_activations, unfuse_activations
from diffq.ops import onednn


def _tiny_sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=8).eval()


def _calls(n=4):
    g = torch.Generator().manual_seed(0)
    return [((torch.randn(2, 4, 8, 8, generator=g),),
             {"encoder_hidden_states": torch.randn(2, 6, 16, generator=g),
              "pooled_projections": torch.randn(2, 8, generator=g),
              "timestep": torch.full((2,), float(t))}) for t in torch.linspace(1000, 100, n)]


def _out(model, call):
    with torch.inference_mode():
        return model(*call[0], **call[1]).sample


def _ops(model, call) -> set[str]:
    with profile() as prof:
        _out(model, call)
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic", "w7a8"])
def test_gelu_runs_in_the_int8_kernel_with_the_same_outputs(recipe):
    calls, model = _calls(), _tiny_sd3()
    gelus = [n for n, m in model.named_modules() if type(m).__name__ == "GELU"]
    assert len(gelus) == 3  # ff and ff_context of block 0, ff of the last (context_pre_only) block
    q = diffq.quantize(model, recipe, calibration=calls)
    fused = [n for n, m in q.named_modules() if isinstance(m, LinearAct)]
    assert fused == gelus
    assert all(q.get_submodule(n).proj.post == "gelu_tanh" for n in fused)
    keys = set(q.state_dict())
    y_fused = _out(q, calls[1])
    if recipe != "w8a8-dynamic":  # static: oneDNN's post-op (dynamic layers this small rescale
        # eagerly), unless the CPU saturates (no VNNI) and the weight runs split: GELU after the join
        split = any(onednn.needs_split(q.get_submodule(n).proj.compute_weight.data) for n in fused)
        assert split == (onednn.saturates() and recipe == "w8a8")
        assert ("aten::gelu" in _ops(q, calls[1])) == split
    unfuse_activations(q)
    assert not any(isinstance(m, LinearAct) for m in q.modules()) and set(q.state_dict()) == keys
    y_plain = _out(q, calls[1])
    assert "aten::gelu" in _ops(q, calls[1])
    # the same maths; the kernel's GELU and F.gelu differ by float rounding only
    assert float((y_fused - y_plain).norm() / y_plain.norm()) < 1e-4
    assert fuse_activations(q) == fused


def test_fused_model_saves_and_loads_fused(tmp_path):
    calls = _calls()
    q = diffq.quantize(_tiny_sd3(), "w8a8", calibration=calls)
    diffq.save(q, tmp_path / "q")
    back = diffq.load(tmp_path / "q", _tiny_sd3())
    assert sum(isinstance(m, LinearAct) for m in back.modules()) == 3
    assert torch.equal(_out(back, calls[2]), _out(q, calls[2]))


def test_an_adapter_on_the_fused_projection_adds_before_the_activation():
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    calls, fp = _calls(), _tiny_sd3()
    adapted = copy.deepcopy(fp)
    adapted.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["ff.net.0.proj", "to_q"],
                                   init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora = get_peft_model_state_dict(adapted)
    q = diffq.quantize(fp, "w8a8", calibration=calls)
    before = _out(q, calls[1])
    q.load_lora_adapter(lora, adapter_name="a", prefix=None)
    fused = q.transformer_blocks[0].ff.net[0]
    assert isinstance(fused, LinearAct) and type(fused.proj).__name__ == "Linear"  # PEFT's wrapper
    y_fused = _out(q, calls[1])
    assert float((y_fused - before).norm() / before.norm()) > 1e-3  # the adapter acts
    unfuse_activations(q)  # diffusers' GELU again: gelu(proj(x) + lora(x)) the textbook way
    assert q.transformer_blocks[0].ff.net[0].proj.get_base_layer().post == ""
    y_plain = _out(q, calls[1])
    assert float((y_fused - y_plain).norm() / y_plain.norm()) < 1e-4
