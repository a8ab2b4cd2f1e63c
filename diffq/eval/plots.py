"""Figures for reports (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import torch


def activation_range_plot(stats: dict,
                          boundaries: torch.Tensor | None, path: Path, top: int = 6) -> list[str]:
    """Abs-max of layer inputs against the timestep for the `top` layers whose range varies most
    across timesteps; dashed lines mark the timestep-group boundaries. Returns the layer names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for name, st in stats.items():  # LayerStats: one row per timestep value
        per_t = st.minmax.abs().amax(dim=(1, 2)).double()
        curves[name] = (st.timesteps, per_t, float(per_t.max() / per_t.min().clamp(min=1e-12)))
    chosen = sorted(curves, key=lambda n: -curves[n][2])[:top]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name in chosen:
        values, per_t, ratio = curves[name]
        ax.plot(values.numpy(), per_t.numpy(), marker=".", label=f"{name} ({ratio:.1f}x)")
    for b in ([] if boundaries is None else boundaries.tolist()):
        ax.axvline(b, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("timestep (noisier →)")
    ax.set_ylabel("input abs-max")
    ax.set_yscale("log")
    ax.set_title("Activation range over denoising timesteps (most varying layers)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return chosen
