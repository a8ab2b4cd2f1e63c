"""SageAttention-style int8 attention, and a diffusers processor that uses it.

- K is smoothed: its mean over the sequence is subtracted. softmax(q k^T) does not change (each
  row of scores moves by the constant q . mean), but the channel outliers that K shares across
  tokens leave the int8 range.
- Q is quantized per block of `block_q` rows, K per block of `block_k` rows, to symmetric int8;
  the softmax scale (and log2 e, for exp2) is folded into Q's scale.
- QK^T runs in int8 -> int32 (exact), scaled to fp32; the online softmax is fp32; P and V go
  through fp16 tensor cores into an fp32 accumulator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from diffq.kernels.act_quant import round_to_int8

LOG2E = 1.4426950408889634


@triton.jit
def _quant_row_blocks_kernel(
    x_ptr, mean_ptr, q_ptr, s_ptr, H, L, D, sb, sh, sl, sd, scale_mult,
    HAS_MEAN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    blk, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rl = blk * BLOCK_L + tl.arange(0, BLOCK_L)
    rd = tl.arange(0, BLOCK_D)
    mask = (rl[:, None] < L) & (rd[None, :] < D)
    x_ptrs = x_ptr + b.to(tl.int64) * sb + h.to(tl.int64) * sh + rl[:, None] * sl + rd[None, :] * sd
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MEAN:
        x = tl.where(mask, x - tl.load(mean_ptr + bh * D + rd, mask=rd < D, other=0.0)[None, :], 0.0)
    scale = tl.math.div_rn(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 127.0)
    scale = tl.where(scale > 0, scale, 1.0)
    q = round_to_int8(tl.math.div_rn(x, scale))
    # Codes are [B*H, L, BLOCK_D] with zeros in the padded head dimension.
    tl.store(q_ptr + (bh.to(tl.int64) * L + rl[:, None]) * BLOCK_D + rd[None, :], q,
             mask=rl[:, None] < L)
    tl.store(s_ptr + bh * tl.num_programs(0) + blk, scale * scale_mult)


@triton.jit
def _int8_attention_kernel(
    q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, o_ptr, H, LQ, LK, D,
    svb, svh, svl, svd, sob, soh, sol, sod,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + (bh.to(tl.int64) * LQ + rm[:, None]) * BLOCK_D + rd[None, :],
                mask=rm[:, None] < LQ, other=0)
    q_scale = tl.load(qs_ptr + bh * tl.num_programs(0) + pid_m)
    k_base = k_ptr + bh.to(tl.int64) * LK * BLOCK_D
    v_base = v_ptr + b * svb + h * svh
    n_kblocks = tl.cdiv(LK, BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j in range(0, n_kblocks):
        kn = j * BLOCK_N + rn
        k = tl.load(k_base + kn[None, :] * BLOCK_D + rd[:, None], mask=kn[None, :] < LK, other=0)
        k_scale = tl.load(ks_ptr + bh * n_kblocks + j)
        # Scores in log2 units: the softmax scale * log2(e) is inside q_scale.
        s = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)
        s = tl.where(kn[None, :] < LK, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + kn[:, None] * svl + rd[None, :] * svd,
                    mask=(kn[:, None] < LK) & (rd[None, :] < D), other=0.0)
        acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptrs = o_ptr + b * sob + h * soh + rm[:, None] * sol + rd[None, :] * sod
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < LQ) & (rd[None, :] < D))


def _quant_row_blocks(x: torch.Tensor, mean: torch.Tensor | None, block: int, block_d: int,
                      scale_mult: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, L, D] -> (int8 codes [B*H, L, block_d], fp32 scales [B*H, ceil(L / block)])."""
    b, h, length, d = x.shape
    n_blocks = triton.cdiv(length, block)
    q = torch.empty((b * h, length, block_d), dtype=torch.int8, device=x.device)
    s = torch.empty((b * h, n_blocks), dtype=torch.float32, device=x.device)
    _quant_row_blocks_kernel[(n_blocks, b * h)](
        x, x if mean is None else mean, q, s, h, length, d, *x.stride(), scale_mult,
        HAS_MEAN=mean is not None, BLOCK_L=block, BLOCK_D=block_d)
    return q, s


def int8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None,
    block_q: int = 128, block_k: int = 64,
) -> torch.Tensor:
    """softmax(q k^T * sm_scale) v with int8 QK^T. q [B, H, Lq, D], k and v [B, H, Lk, D], any
    float dtype and strides -> [B, H, Lq, D] in q's dtype. sm_scale defaults to D ** -0.5."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if k.shape != (b, h, lk, d) or v.shape != (b, h, lk, d):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need "
                         "[B, H, L, D] with the same D and k, v of the same length")
    scale = d ** -0.5 if sm_scale is None else sm_scale
    block_d = max(32, triton.next_power_of_2(d))  # int8 tl.dot wants K >= 32
    k_mean = k.mean(dim=2, dtype=torch.float32).contiguous()
    qq, qs = _quant_row_blocks(q, None, block_q, block_d, scale * LOG2E)
    kq, ks = _quant_row_blocks(k, k_mean, block_k, block_d, 1.0)
    out = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(lq, block_q), b * h)
    _int8_attention_kernel[grid](
        qq, qs, kq, ks, v, out, h, lq, lk, d, *v.stride(), *out.stride(),
        BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d, num_warps=8 if block_q >= 128 else 4)
    return out


class Int8AttnProcessor:
    """diffusers attention processor with AttnProcessor2_0's call signature and steps. It runs
    `int8_attention` when there is no attention mask and the inputs are on CUDA (or always, with
    `use_kernel=True`, e.g. under the Triton interpreter), else F.scaled_dot_product_attention."""

    def __init__(self, use_kernel: bool | None = None, block_q: int = 128, block_k: int = 64):
        self.use_kernel = use_kernel
        self.block_q, self.block_k = block_q, block_k

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, H, L, D] attention: the int8 kernel where it applies, SDPA otherwise."""
        use = query.is_cuda if self.use_kernel is None else self.use_kernel
        if use and attention_mask is None:
            return int8_attention(query, key, value, None, self.block_q, self.block_k)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                              dropout_p=0.0, is_causal=False)

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attention(query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

