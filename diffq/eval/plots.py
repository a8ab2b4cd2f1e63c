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


def _stage(name: str) -> str:
    """down / mid / up / other: where a UNet layer sits along the U."""
    head = name.split(".")[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head, "other")


_STAGE_COLORS = {"down": "tab:blue", "mid": "tab:purple", "up": "tab:orange", "other": "tab:gray"}


def mixed_precision_plots(table, chosen_bits: dict[str, int], out: Path) -> list[str]:
    """sensitivity.png (per-layer output error per width, along the U), bits.png (chosen width
    per layer along the U) and proxy.png (proxy vs measured error). Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(table.layers)))
    stages = [_stage(n) for n in table.layers]

    def stage_axis(ax):
        starts = [i for i in x if i == 0 or stages[i] != stages[i - 1]]
        for i in starts:
            ax.axvline(i - 0.5, color="gray", linewidth=0.6)
            ax.text(i, 1.0, stages[i], transform=ax.get_xaxis_transform(), fontsize=7, va="bottom")
        ax.set_xlabel("layer (model order: down -> mid -> up)")

    fig, ax = plt.subplots(figsize=(9, 3.5), dpi=110)
    for j, b in enumerate(table.bits[:-1]):
        err = table.error[:, j].clamp(min=1e-12).numpy()
        ax.plot(x, err, marker=".", linewidth=0.8, label=f"only this layer at {b} bits")
    ax.set_yscale("log")
    ax.set_ylabel("relative MSE of the output")
    stage_axis(ax)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 2.8), dpi=110)
    ax.bar(x, [chosen_bits[n] for n in table.layers], color=[_STAGE_COLORS[s] for s in stages], width=0.85)
    ax.set_ylabel("weight bits")
    ax.set_yticks(sorted(set(table.bits)))
    stage_axis(ax)
    fig.tight_layout()
    fig.savefig(out / "bits.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=110)
    ok = torch.isfinite(table.error[:, 0]) & (table.error[:, 0] > 0) & (table.proxy[:, 0] > 0)
    ax.scatter(table.proxy[ok, 0].numpy(), table.error[ok, 0].numpy(), s=10,
               c=[_STAGE_COLORS[s] for s, k in zip(stages, ok.tolist(), strict=True) if k])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"proxy: layer error at {table.bits[0]} bits")
    ax.set_ylabel("measured output error")
    ax.set_title("proxy vs measured sensitivity", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "proxy.png")
    plt.close(fig)
    return ["sensitivity.png", "bits.png", "proxy.png"]
