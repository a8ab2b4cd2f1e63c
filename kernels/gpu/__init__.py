"""Triton kernels for diffq, installed as `diffq.kernels`. Each module imports triton, so
import them only where a kernel runs (diffq.ops.cuda does so on first CUDA call):

- `act_quant`: static (per-tensor / per-segment, from a timestep-group table) and dynamic
  per-token int8 activation quantization.
- `w8a8_gemm`: int8 x int8 -> int32 GEMM with a fused dequant + bias + activation epilogue.
- `int8_conv`: int8 NHWC implicit-GEMM convolution with the same epilogue.
- `w4a16_gemm`: fp16/bf16 activations x packed int4 group-wise weights (GEMM and GEMV).
- `int8_attention`: SageAttention-style int8 QK^T attention and a diffusers processor.

Under `TRITON_INTERPRET=1` (set before import) the kernels run on CPU tensors for testing.
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (small fixed block configs)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
