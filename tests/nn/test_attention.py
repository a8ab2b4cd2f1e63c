"""Int8 attention inside the model's own diffusers attention processors (recipe `attention:`)."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

import diffq
from diffq.core.recipe import AttentionSpec, Recipe, load_recipe
from diffq.errors import RecipeError
from diffq.eval.metrics import psnr
from diffq.nn.attention import Int8SDPA, attach_attention
from diffq.ops import reference
from tests.dit_pipelines import LOAD_KWARGS, build
from tests.integrations.test_dit import HELD, drive, sample


def test_unmasked_sdpa_runs_int8_and_masked_stays_float(gen):
    q, k, v = (torch.randn(2, 3, 40, 16, generator=gen) for _ in range(3))
    k[..., 5] += 20.0  # a K channel offset: what SageAttention's mean subtraction removes
    mode = Int8SDPA(AttentionSpec(block_q=16, block_k=8))
    with mode:
        out = F.scaled_dot_product_attention(q, k, v)
        by_keyword = F.scaled_dot_product_attention(query=q, key=k, value=v)
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(40, 40, dtype=torch.bool))
    assert (mode.calls, mode.float_calls) == (2, 1)
    assert torch.equal(out, reference.int8_attention(q, k, v, None, 16, 8)) and torch.equal(out, by_keyword)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(masked, ref)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    assert 20 < sqnr < 60  # close to float, and really quantized


def test_processors_keep_their_signature_and_are_not_wrapped_twice():
    pipe, _ = build("sd3")
    attn = pipe.transformer.transformer_blocks[0].attn
    before = list(inspect.signature(attn.processor.__call__).parameters)
    attach_attention(pipe.transformer, AttentionSpec())
    attach_attention(pipe.transformer, AttentionSpec(block_q=64))
    proc = attn.processor
    assert type(proc).__name__.startswith("Int8") and proc.diffq_attention.block_q == 64
    assert type(proc).__mro__[1].__name__ == "JointAttnProcessor2_0"  # one level of wrapping
    assert list(inspect.signature(proc.__call__).parameters) == before


@pytest.mark.parametrize("kind", ["sd3", "pixart"])
def test_int8_attention_recipe_through_the_lifecycle(kind, tmp_path):
    pipe, kw = build(kind)
    fp = sample(pipe, kind, kw, HELD, 100)
    diffq.quantize(pipe.transformer, "w8a8-int8attn", calibration=drive(pipe, kind, kw))
    procs = [m.processor for m in pipe.transformer.modules() if hasattr(m, "set_processor")]
    assert procs and all(type(p).__name__.startswith("Int8") for p in procs)
    spy = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with spy:
        q = sample(pipe, kind, kw, HELD, 100)
    names = [e.name for e in spy.events()]
    assert "diffq::int8_attention" in names
    assert psnr(q, fp) > 30
    pipe.save_pretrained(tmp_path / "q")
    with diffq.register():
        again = DiffusionPipeline.from_pretrained(tmp_path / "q", **LOAD_KWARGS.get(kind, {}))
    again.set_progress_bar_config(disable=True)
    assert all(type(m.processor).__name__.startswith("Int8")
               for m in again.transformer.modules() if hasattr(m, "set_processor"))
    assert torch.equal(sample(again, kind, kw, HELD, 100), q)


def test_attention_recipe_keys_are_checked():
    assert load_recipe("w8a8-int8attn").attention == AttentionSpec(block_q=128, block_k=64)
    with pytest.raises(RecipeError, match="block_q"):
        Recipe.from_dict({"attention": {"block_q": 0}})
    with pytest.raises(RecipeError, match="attention"):
        Recipe.from_dict({"attention": {"format": "int4"}})
    with pytest.raises(RecipeError, match="attention"):
        Recipe.from_dict({"attention": {"smooth": True}})
