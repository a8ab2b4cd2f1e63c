"""Figures for reports (matplotlib's object API: no pyplot, no process-wide backend change).

Figures are optional: `draw_optional` turns any failure into one warning line, so a report step
never costs the work it describes.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch


def draw_optional(what: str, draw: Callable[[], list[str]]) -> tuple[list[str], str | None]:
    """(draw()'s result, None), or ([], one warning line) when the figure cannot be made."""
    try:
        return draw(), None
    except ImportError as e:
        return [], f"{what} not drawn: {e} (matplotlib is a dependency of diffq-toolkit; reinstall it)"
    except Exception as e:  # a figure must never cost the finished model  # noqa: BLE001
        return [], f"{what} not drawn: {type(e).__name__}: {e}"


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    return fig, fig.subplots()


def _save(fig, path: Path) -> None:
    """PNG written next to its final name, then renamed: a reader never sees half a file."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def distinct_inputs(stats: dict) -> dict[str, list[str]]:
    """First layer name -> every layer that reads the same input (identical statistics): the six
    `time_emb_proj` of a UNet share one input and would draw one line six times."""
    groups: dict[str, list[str]] = {}
    for name, st in stats.items():
        twin = next((g for g in groups if stats[g].timesteps.shape == st.timesteps.shape
                     and stats[g].minmax.shape == st.minmax.shape
                     and torch.equal(stats[g].timesteps, st.timesteps)
                     and torch.equal(stats[g].minmax, st.minmax)), None)
        groups.setdefault(twin or name, []).append(name)
    return groups


def activation_range_plot(stats: dict,
                          boundaries: torch.Tensor | None, path: Path, top: int = 6) -> list[str]:
    """Abs-max of layer inputs against the timestep for the `top` distinct inputs whose range
    varies most across timesteps; dashed lines mark the timestep-group boundaries. Returns the
    layer names drawn (one per input)."""
    curves = {}
    groups = distinct_inputs(stats)
    for name in groups:  # LayerStats: one row per timestep value
        st = stats[name]
        per_t = st.minmax.abs().amax(dim=(1, 2)).double()
        curves[name] = (st.timesteps, per_t, float(per_t.max() / per_t.min().clamp(min=1e-12)))
    chosen = sorted(curves, key=lambda n: -curves[n][2])[:top]
    fig, ax = _figure((7, 4))
    for name in chosen:
        values, per_t, ratio = curves[name]
        shared = f" +{len(groups[name]) - 1} sharing it" if len(groups[name]) > 1 else ""
        ax.plot(values.numpy(), per_t.numpy(), marker=".", label=f"{name}{shared} ({ratio:.1f}x)")
    for b in ([] if boundaries is None else boundaries.tolist()):
        ax.axvline(b, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("timestep (noisier →)")
    ax.set_ylabel("input abs-max")
    ax.set_yscale("log")
    ax.set_title("Activation range over denoising timesteps (most varying inputs)")
    ax.legend(fontsize=6)
    _save(fig, path)
    return chosen


def _stage(name: str) -> str:
    """down / mid / up / other: where a UNet layer sits along the U."""
    head = name.split(".")[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head, "other")


_STAGE_COLORS = {"down": "tab:blue", "mid": "tab:purple", "up": "tab:orange", "other": "tab:gray"}


def mixed_precision_plots(table, chosen_bits: dict[str, int], out: Path) -> list[str]:
    """sensitivity.png (per-layer output error per width, along the U), bits.png (chosen width
    per layer along the U) and proxy.png (proxy vs measured error). Returns the file names."""
    x = list(range(len(table.layers)))
    stages = [_stage(n) for n in table.layers]

    def stage_axis(ax):
        starts = [i for i in x if i == 0 or stages[i] != stages[i - 1]]
        for i in starts:
            ax.axvline(i - 0.5, color="gray", linewidth=0.6)
            ax.text(i, 1.0, stages[i], transform=ax.get_xaxis_transform(), fontsize=7, va="bottom")
        ax.set_xlabel("layer (model order: down -> mid -> up)")

    fig, ax = _figure((9, 3.5))
    for j, b in enumerate(table.bits[:-1]):
        err = table.error[:, j].clamp(min=1e-12).numpy()
        ax.plot(x, err, marker=".", linewidth=0.8, label=f"only this layer at {b} bits")
    ax.set_yscale("log")
    ax.set_ylabel("relative MSE of the output")
    stage_axis(ax)
    ax.legend(fontsize=7)
    _save(fig, out / "sensitivity.png")

    fig, ax = _figure((9, 2.8))
    ax.bar(x, [chosen_bits[n] for n in table.layers], color=[_STAGE_COLORS[s] for s in stages], width=0.85)
    ax.set_ylabel("weight bits")
    ax.set_yticks(sorted(set(table.bits)))
    stage_axis(ax)
    _save(fig, out / "bits.png")

    fig, ax = _figure((4.5, 4))
    ok = torch.isfinite(table.error[:, 0]) & (table.error[:, 0] > 0) & (table.proxy[:, 0] > 0)
    ax.scatter(table.proxy[ok, 0].numpy(), table.error[ok, 0].numpy(), s=10,
               c=[_STAGE_COLORS[s] for s, k in zip(stages, ok.tolist(), strict=True) if k])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"proxy: layer error at {table.bits[0]} bits")
    ax.set_ylabel("measured output error")
    ax.set_title("proxy vs measured sensitivity", fontsize=9)
    _save(fig, out / "proxy.png")
    return ["sensitivity.png", "bits.png", "proxy.png"]


def verification_plot(verification: dict, out: Path) -> list[str]:
    """Per-layer output SQNR on the held-back calls along the network (model order): the
    recipe's static scales (before) and what was chosen (after), dynamic for reference."""
    layers = verification["layers"]
    names = list(layers)
    x = range(len(names))

    def series(key):
        return [min(layers[n]["sqnr_db"][key], 80.0) for n in names]

    def chosen(n):
        c = layers[n]["choice"].removesuffix(" (widened)")
        if c in ("float", "weight-only"):  # no activation rounding: the top of the plot
            return 80.0
        return min(layers[n]["sqnr_db"]["dynamic" if c.startswith("dynamic") else c], 80.0)

    fig, ax = _figure((max(6.0, len(names) * 0.09), 3.6))
    ax.plot(x, series("static"), "o-", ms=3, lw=1, label="static scales (before)")
    ax.plot(x, [chosen(n) for n in names], "s-", ms=3, lw=1, label="chosen (after)")
    ax.plot(x, series("dynamic"), ":", lw=1, color="gray", label="dynamic")
    ax.set_xlabel("layer, in model order")
    ax.set_ylabel("output SQNR on held-back calls (dB)")
    ax.set_title(f"{len(names)} static layers, {verification['calls']} held-back calls; whole model "
                 f"{verification['sqnr_db']:.1f} dB vs all-dynamic {verification['dynamic_sqnr_db']:.1f} dB")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, out / "verification.png")
    return ["verification.png"]
