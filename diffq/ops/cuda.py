"""CUDA kernels of the diffq ops: the Triton kernels of `diffq.kernels`, imported on the first
CUDA call so that `import diffq` never imports triton. What a kernel does not cover (grouped
convs, fp32 W4A16 activations, a machine without triton) runs the pure-torch reference.

The W8A8 op schemas take activation scales as fp32 device tensors, which the kernels read
directly: no host-device copy or sync per call.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import torch
from torch import Tensor

from diffq.ops import library, reference
from diffq.ops.fused import apply_post


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernels can run; without triton, says once that CUDA runs the float
    reference (dequantize + float op), not int8 compute, and which extra brings the kernels."""
    if importlib.util.find_spec("triton") is not None:
        return True
    warnings.warn("diffq: triton is not installed, so quantized layers on CUDA run the float "
                  "reference instead of int8 kernels: pip install 'diffq-toolkit[triton]'", stacklevel=3)
    return False


@library.w8a8_linear.register_kernel("cuda")
def _w8a8_linear_cuda(x, qweight, w_scale, bias, x_scale, kernels, fast=False, post=""):
    if not triton_available():
        return library.linear_reference(x, qweight, w_scale, bias, x_scale, post)
    from diffq.kernels import w8a8_gemm

    return apply_post(w8a8_gemm.w8a8_linear(x, qweight, w_scale, bias, x_scale), post)


@library.w8a8_conv2d.register_kernel("cuda")
def _w8a8_conv2d_cuda(x, qweight, w_scale, bias, x_scales, segments, stride, padding, dilation,
                      groups, kernels, fast=False):
    if groups != 1 or not triton_available():
        return library.conv2d_reference(x, qweight, w_scale, bias, x_scales, segments, stride,
                                        padding, dilation, groups)
    from diffq.kernels import int8_conv

    def ohwi():  # the kernel's NHWC weight layout
        return qweight.permute(0, 2, 3, 1).contiguous()
    w_ohwi = kernels.get(("conv_ohwi", qweight.data_ptr()), ohwi) if fast else ohwi()
    return int8_conv.w8a8_conv2d(x, w_ohwi, w_scale, bias, x_scales, segments, stride, padding, dilation)


@library.w4a16_linear.register_kernel("cuda")
def _w4a16_linear_cuda(x, packed, scale, zero_point, bias, group_size):
    if x.dtype not in (torch.float16, torch.bfloat16) or group_size % 16 or not triton_available():
        return reference.w4a16_linear(x, packed, scale, zero_point, bias, group_size)
    from diffq.kernels import w4a16_gemm

    return w4a16_gemm.w4a16_matmul(x, packed, scale, zero_point, bias, group_size)


@library.int8_attention.register_kernel("cuda")
def _int8_attention_cuda(q, k, v, sm_scale=None, block_q=128, block_k=64):
    if not triton_available():
        return reference.int8_attention(q, k, v, sm_scale, block_q, block_k)
    from diffq.kernels import int8_attention

    return int8_attention.int8_attention(q, k, v, sm_scale, block_q, block_k)


@library.quantize_act.register_kernel("cuda")
def _quantize_act_cuda(x: Tensor, scale: Tensor | None, segments: list[int]) -> tuple[Tensor, Tensor]:
    if not triton_available():
        return reference.quantize_act(x, scale, segments)
    from diffq.kernels import act_quant

    if scale is None:
        return act_quant.quantize_dynamic(x)
    return act_quant.quantize_static(x, scale, segments), reference.per_channel_scales(scale, segments)
