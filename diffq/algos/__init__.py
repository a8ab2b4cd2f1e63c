"""Error-minimizing quantization algorithms (GPTQ, AWQ, SmoothQuant): pure functions on tensors."""
