"""Pure-torch reference implementations: quantize the input for real, dequantize, run float."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffq.core.formats import get_format
from diffq.core.granularity import PerTensor, PerToken
from diffq.core.pack import unpack_int4
from diffq.core.quant import QParams, choose_qparams, dequantize, fake_quantize, quantize
from diffq.core.weights import QuantizedWeight
from diffq.ops.types import ActQuant

_INT8 = get_format("int8")


def _feature_shape(x: torch.Tensor, axis: int, v: torch.Tensor) -> torch.Tensor:
    if v.dim() == 0 or v.numel() == 1:
        return v.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = v.numel()
    return v.reshape(shape)


def quantize_activation(x: torch.Tensor, act: ActQuant) -> tuple[torch.Tensor, QParams]:
    """x -> (codes, qparams); codes int8 (or float8) in x's shape, qparams broadcastable."""
    if act.dynamic:
        qp = choose_qparams(x, act.fmt, PerToken(act.feature_axis))
    else:
        zp = None if act.zero_point is None else _feature_shape(x, act.feature_axis, act.zero_point)
        qp = QParams(_feature_shape(x, act.feature_axis, act.scale.float()), zp)
    return quantize(x, qp, act.fmt, PerTensor()), qp


def _dequant_input(x: torch.Tensor, act: ActQuant | None) -> torch.Tensor:
    if act is None:
        return x
    q, qp = quantize_activation(x, act)
    return dequantize(q, qp, act.fmt, x.dtype)


def pointwise(shape: tuple[int, ...], stride, padding, dilation, groups: int) -> bool:
    """A convolution of weight `shape` that is 1x1 with unit stride and no padding: a Linear
    over the pixels."""
    return (len(shape) == 4 and tuple(shape[2:]) == (1, 1) and groups == 1
            and tuple(stride) == (1, 1) and not isinstance(padding, str) and tuple(padding) == (0, 0)
            and tuple(dilation) == (1, 1))


def per_image(act: ActQuant | None, shape, stride, padding, dilation, groups: int) -> bool:
    """Whether a convolution's dynamic int8 activations take one scale per image."""
    return (act is not None and act.dynamic and act.fmt.name == "int8"
            and not pointwise(shape, stride, padding, dilation, groups))


def per_image_scales(x: torch.Tensor) -> torch.Tensor:
    """One symmetric int8 scale per image of x [N, C, H, W], as [N, 1, 1, 1] fp32: what the
    dynamic activations of a kxk convolution take (per-pixel scales vary inside the kernel
    window, so they do not factor out of its sums; one scale per image does)."""
    return choose_qparams(x.reshape(x.shape[0], -1), _INT8, PerToken(-1)).scale.reshape(-1, 1, 1, 1)


def per_image_qdq(x: torch.Tensor) -> torch.Tensor:
    """x [N, C, H, W] quantized to int8 with `per_image_scales` and back, in x's dtype."""
    s = per_image_scales(x)
    return dequantize(int8_codes(x, s), QParams(s), _INT8, x.dtype)


def linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, act: ActQuant | None
) -> torch.Tensor:
    w = weight.dequantize(x.dtype)
    return F.linear(_dequant_input(x, act), w, None if bias is None else bias.to(x.dtype))


def conv2d(x, weight, bias, act, stride, padding, dilation, groups) -> torch.Tensor:
    """Dynamic int8 activations: per pixel for a 1x1 convolution, per image otherwise (the
    scales the int8 kernels can take)."""
    w = weight.dequantize(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    if per_image(act, weight.shape, stride, padding, dilation, groups):
        xq = per_image_qdq(x)
    else:
        xq = _dequant_input(x, act)
    return F.conv2d(xq, w, b, stride, padding, dilation, groups)


def segment_starts(segments: list[int]) -> list[int]:
    """The first input channel of each channel segment."""
    return [sum(segments[:i]) for i in range(len(segments))]


def per_channel_scales(scale: torch.Tensor, segments: list[int]) -> torch.Tensor:
    """Per-segment scales [S] -> fp32 per-channel scales [sum(segments)] (a new tensor)."""
    s = scale.reshape(-1).float()
    return torch.cat([s[i:i + 1].expand(n) for i, n in enumerate(segments)])


def int8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 codes of x with a broadcastable fp32 `scale`: diffq's one activation grid."""
    return quantize(x, QParams(scale), _INT8, PerTensor())


def quantize_act(x: torch.Tensor, scale: torch.Tensor | None,
                 segments: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of x [..., C] and the scales that dequantize them: static with one
    scale per channel segment (`scale` [S]; returned per channel, [C]), or dynamic per token
    when `scale` is None (returned [..., 1])."""
    if scale is None:
        s = choose_qparams(x, _INT8, PerToken(-1)).scale
    else:
        s = per_channel_scales(scale, segments)
    return int8_codes(x, s).contiguous(), s


def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor | None, bias: torch.Tensor | None,
                 group_size: int) -> torch.Tensor:
    """x [..., K] @ dq(W)^T + b; W int4 [N, K] in diffq's storage: `packed` uint8 [N, K/2],
    per-group `scale` and `zero_point` [N, K/g(, 1)]."""
    n = packed.shape[0]
    q = unpack_int4(packed).reshape(n, -1, group_size).float()
    if zero_point is not None:
        q = q - zero_point.reshape(n, -1, 1).float()
    w = (q * scale.reshape(n, -1, 1).float()).reshape(n, -1).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _qdq_row_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Symmetric int8 quantize-dequantize of x [B, H, L, D] with one scale per `block` rows."""
    b, h, length, d = x.shape
    n = -(-length // block)
    xb = F.pad(x, (0, 0, 0, n * block - length)).reshape(b, h, n, block * d)
    return fake_quantize(xb, choose_qparams(xb, _INT8, PerToken(-1)), _INT8, PerTensor()
                         ).reshape(b, h, n * block, d)[:, :, :length]


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None,
                   block_q: int = 128, block_k: int = 64) -> torch.Tensor:
    """SageAttention numerics in fp32: K minus its mean over the sequence, Q and K quantized to
    int8 per block of rows, softmax(q k^T * sm_scale) v. q [B, H, Lq, D], k/v [B, H, Lk, D]."""
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    k = k.float() - k.mean(dim=2, keepdim=True, dtype=torch.float32)
    scores = _qdq_row_blocks(q.float(), block_q) @ _qdq_row_blocks(k, block_k).transpose(-1, -2)
    return ((scores * scale).softmax(dim=-1) @ v.float()).to(q.dtype)
