"""Error-minimizing quantization algorithms (GPTQ, AWQ, SmoothQuant, outliers): pure functions
on tensors, no hooks and no I/O. `diffq.calib.hessian` collects their inputs from a model."""
from diffq.algos.awq import awq_clip, awq_search
from diffq.algos.gptq import gptq
from diffq.algos.hessian import conv_rows, hessian_error, linear_rows, update_channel_stats, update_hessian
from diffq.algos.outliers import outlier_channels, sparse_outliers
from diffq.algos.smoothquant import smooth_input, smooth_scales, smooth_search, smooth_weight

__all__ = ["awq_clip", "awq_search", "gptq", "conv_rows", "hessian_error", "linear_rows",
           "update_channel_stats", "update_hessian", "outlier_channels", "sparse_outliers",
           "smooth_input", "smooth_scales", "smooth_search", "smooth_weight"]
