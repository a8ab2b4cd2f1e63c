"""Int8 (SageAttention-style) attention kernel: against the reference that quantizes the same
way (close: only fp16 P / output rounding differ) and against float SDPA (the quantization
error: cosine similarity > 0.999 and relative error < 3 % on random inputs)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from diffq.kernels.int8_attention import Int8AttnProcessor, int8_attention  # noqa: E402
from diffq.ops import reference  # noqa: E402
from tests.kernels.conftest import rel_err  # noqa: E402

pytestmark = pytest.mark.triton


def _cos(a, b):
    return float(F.cosine_similarity(a.cpu().double().flatten(), b.cpu().double().flatten(), dim=0))


def _qkv(gen, b, h, lq, lk, d, dtype):
    q = torch.randn(b, h, lq, d, generator=gen)
    # K shares a per-channel offset across tokens: the outlier that smoothing removes.
    k = torch.randn(b, h, lk, d, generator=gen) + 4 * torch.randn(b, h, 1, d, generator=gen)
    v = torch.randn(b, h, lk, d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype,lq,lk,d", [
    (torch.float16, 100, 77, 40),   # cross-attention to 77 text tokens, SD1.5 head dim 40
    (torch.bfloat16, 128, 128, 64),  # self-attention, SDXL head dim 64
])
def test_vs_reference_and_sdpa(gen, device, dtype, lq, lk, d):
    q, k, v = _qkv(gen, 2, 2, lq, lk, d, dtype)
    out = int8_attention(q.to(device), k.to(device), v.to(device))
    assert out.shape == q.shape and out.dtype == dtype
    sim = reference.int8_attention(q, k, v)
    assert rel_err(out, sim.float()) < 1e-2
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert _cos(out, exact) > 0.999
    assert rel_err(out, exact) < 0.03


def test_explicit_scale_and_strided_inputs(gen, device):
    q, k, v = _qkv(gen, 1, 3, 64, 48, 32, torch.float16)
    # [B, L, H, D] storage seen as [B, H, L, D], the layout diffusers hands over
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out = int8_attention(q.to(device), k.to(device), v.to(device), sm_scale=0.3, block_q=32, block_k=32)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    assert _cos(out, exact) > 0.999


def test_processor_matches_attn_processor_2_0(gen, device):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=2, dim_head=32, cross_attention_dim=48).to(device).eval()
    hidden = torch.randn(2, 64, 64, generator=gen).to(device)
    context = torch.randn(2, 77, 48, generator=gen).to(device)
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        ref = attn(hidden, context)
        attn.set_processor(Int8AttnProcessor(use_kernel=True))
        out = attn(hidden, context)
        attn.set_processor(Int8AttnProcessor())  # default: the kernel on CUDA, SDPA elsewhere
        auto = attn(hidden, context)
        mask = torch.ones(2, 77, dtype=torch.bool, device=device)
        attn.set_processor(Int8AttnProcessor(use_kernel=True))
        masked = attn(hidden, context, attention_mask=mask)  # a mask falls back to SDPA
        attn.set_processor(AttnProcessor2_0())
        masked_ref = attn(hidden, context, attention_mask=mask)
    assert _cos(out, ref) > 0.999
    if device == "cpu":
        assert torch.equal(auto, ref)
    assert torch.equal(masked, masked_ref)
