import torch


def outlier_inputs(g: torch.Generator, n: int, k: int, channels: torch.Tensor, factor: float = 20.0):
    """Gaussian rows [n, k] whose `channels` are `factor` times larger: the activation outliers
    of LLMs and of diffusion attention projections."""
    x = torch.randn(n, k, generator=g)
    x[:, channels] *= factor
    return x
