"""`diffq calibrate`: run a diffusers pipeline over prompts, collect the denoiser's (UNet or
DiT) activations across denoising steps, quantize, and write the quantized pipeline, statistics
and a report."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torchmetrics.functional import spearman_corrcoef
from tqdm.auto import tqdm

from diffq.api import (
    ALL,
    LayerStats,
    MixedResult,
    Plan,
    SensitivityTable,
    calibrate,
    convert,
    load_recipe,
    load_stats,
    merge_stats,
    plan,
    plan_mixed,
    quantize,
    save_stats,
    verifiable,
    weight_bytes,
)
from diffq.assets import shipped
from diffq.commands.settings import SamplingSettings
from diffq.errors import InputError
from diffq.eval.plots import activation_range_plot, draw_optional, mixed_precision_plots, verification_plot
from diffq.integrations.pipeline import (
    DENOISERS,
    VERIFY_BATCH,
    calibration_pass,
    check_pipeline_dir,
    denoiser,
    denoiser_calls,
    denoiser_structure,
    load_pipeline,
    pipeline_components,
    resolve_components,
    sample_latents,
    save_quantized_pipeline,
    text_encoder_calls,
)
from diffq.integrations.unet import check_groups
from diffq.io import (
    check_at_least,
    check_output,
    read_prompts,
    write_json,
    write_text,
    writing_directory,
)
from diffq.markdown import Markdown
from diffq.nn.base import split_layers


@dataclass
class CalibrateSettings(SamplingSettings):
    prompts: Path = field(default_factory=lambda: shipped("prompts") / "shapes-calib.txt")
    recipe: str = "w8a8"
    num_prompts: int = 128
    out: Path = Path("out/tiny-sd-w8a8")
    resume: bool = False


@dataclass(frozen=True)
class Processes:
    """This process's place in a multi-process calibration (`accelerate launch`)."""

    index: int = 0
    count: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.index == 0


def processes() -> Processes:
    """accelerate's view of the launch; one process unless started by a distributed launcher."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import PartialState

    state = PartialState()  # initializes torch.distributed (gloo on CPU)
    return Processes(state.process_index, state.num_processes)


def gather_stats(stats: dict[str, LayerStats] | None, procs: Processes) -> dict[str, LayerStats]:
    """Every process's statistics merged, in process order, on every process (exact: min of
    minima, max of maxima, summed integer histograms)."""
    import torch.distributed as dist

    local = None if stats is None else {n: st.tensors() for n, st in stats.items()}
    parts: list = [None] * procs.count
    dist.all_gather_object(parts, local)
    merged = None
    for part in parts:
        if part:
            merged = merge_stats(merged, {n: LayerStats(**t) for n, t in part.items()})
    if merged is None:
        raise InputError("no process had prompts to calibrate on")
    return merged


def _cache_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.calib-cache"


def _check(s: CalibrateSettings) -> list[str]:
    s.check_sampling()
    check_at_least("--num-prompts", s.num_prompts)
    check_output(s.out, s.overwrite, (s.model, s.prompts))
    check_pipeline_dir(s.model)
    return read_prompts(s.prompts)[: s.num_prompts]


def run_calibrate(s: CalibrateSettings, progress: bool = True) -> dict:
    """Calibrate and write `s.out`: unet/ or transformer/ (diffq checkpoint), quantized text
    encoders, stats.safetensors, report.*"""
    t0 = time.perf_counter()
    prompts = _check(s)
    state = processes()
    if state.count > 1 and s.resume:
        raise InputError("--resume is not supported with several processes; run it in one process")
    recipe = load_recipe(s.recipe)
    check_groups(recipe, s.steps)
    names = resolve_components(pipeline_components(s.model), recipe.components)  # before loading
    pipe = load_pipeline(s.model, progress=progress, call=s.size)
    fp_bytes = sum(weight_bytes(getattr(pipe, n)) for n in names)
    comps, stats, mixed, den = {}, None, None, None
    if names[0] in DENOISERS:
        den, stats, mixed = _quantize_denoiser(s, pipe, recipe, prompts, progress, state)
        comps[names[0]] = den
        recipe = mixed.recipe if mixed is not None else recipe
    encoders = names[len(comps):]
    if encoders:  # recorded before any is quantized: they read token ids, not each other
        calls = text_encoder_calls(pipe, encoders, prompts, s.seed, s.guidance, s.batch_size)
        text_recipe = recipe.for_text_encoder().with_name(recipe.name)  # no timesteps: one group
        for name in encoders:
            comps[name] = quantize(getattr(pipe, name), text_recipe, calibration=calls[name])
    report = {
        "recipe": recipe.name, "model": str(s.model), "prompts": str(s.prompts),
        "num_prompts": len(prompts), "steps": s.steps, "guidance": s.guidance, "seed": s.seed,
        "components": list(comps),
        "weight_bytes": sum(weight_bytes(m) for m in comps.values()), "weight_bytes_fp": fp_bytes,
        "layers": _per_layer(comps, "quantized"), "skipped": _per_layer(comps, "skipped"),
        "kernels": _per_layer(comps, "kernels"),
        "split_layers": [_layer_name(c, n) for c, m in comps.items()
                         for n in split_layers(m, m.diffq.report.kernels)],
        "unmatched_patterns": {c: m.diffq.report.unmatched_patterns for c, m in comps.items()
                               if m.diffq.report.unmatched_patterns},
    }
    if mixed is not None:
        report["mixed"] = mixed_summary(mixed)
    if den is not None and den.diffq.report.verification is not None:
        report["verification"] = den.diffq.report.verification
    if not state.is_main_process:  # every process quantized the same merged statistics
        return {**report, "seconds": round(time.perf_counter() - t0, 1), "written": False}
    with writing_directory(s.out, s.overwrite) as tmp:  # the finished work, published first
        save_quantized_pipeline(s.model, comps, tmp)
        if mixed is not None:
            (tmp / "sensitivity.json").write_text(mixed.table.to_json())
        (tmp / "pipeline.json").write_text(json.dumps({"base_model": str(Path(s.model).resolve()),
                                                       "components": list(comps)}, indent=1))
        if stats:
            save_stats(stats, tmp / "stats.safetensors", asdict_str(s))
        report["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(tmp / "report.json", report)
    cache = _cache_dir(s.out)
    if cache.exists():
        shutil.rmtree(cache, ignore_errors=True)
    report.update(_figures(s.out, stats, mixed, den))
    _write_report(s.out, report)
    return report


def _layer_name(component: str, layer: str) -> str:
    """A layer's name in the report: the denoiser's as it is, a text encoder's prefixed with its
    component name."""
    return layer if component in DENOISERS else f"{component}.{layer}"


def _per_layer(comps: dict, field: str) -> dict:
    """One report field (`quantized`, `skipped`, `kernels`) of every component, by layer name."""
    return {_layer_name(c, n): v for c, m in comps.items()
            for n, v in getattr(m.diffq.report, field).items()}


def _quantize_denoiser(s: CalibrateSettings, pipe, recipe, prompts: list[str], progress: bool,
                       state: Processes):
    """Roles from one traced call, static statistics (one batch held back to verify them),
    mixed widths, layer inputs where the recipe needs them, then convert in place.
    Returns (the denoiser, its statistics, the mixed-precision result or None)."""
    den = denoiser(pipe)
    structure = denoiser_structure(pipe, prompts[0], s.seed, s.steps, s.guidance)
    p = plan(den, recipe, structure=structure)  # activation specs do not depend on mixed widths
    stats, held = None, []
    if p.static:
        stats, held = _collect(s, pipe, prompts, p, progress and state.is_main_process, state)
    mixed = None
    if recipe.mixed is not None:
        mixed = _plan_mixed(s, pipe, prompts, recipe, progress)
        p = plan(den, mixed.recipe, structure=structure)
    inputs = {}
    if p.needs:  # GPTQ / AWQ / smoothing need the layer inputs: one more pass over the prompts
        with calibrate(den, p, activations=False) as cal:
            cal.run(_sampling_pass(s, pipe, prompts, progress))
        inputs = cal.input_stats
    convert(den, p, stats, inputs, verify=held)
    den.diffq.report.mixed = mixed
    return den, stats, mixed


def _figures(out: Path, stats: dict | None, mixed: MixedResult | None, den) -> dict:
    """Draw the report's figures into the published `out`; a figure that cannot be made is a
    warning, never a lost model."""
    warnings, plotted = [], []
    if stats:
        b = next((q.input_quant.boundaries for q in den.modules()
                  if getattr(q, "input_quant", None) is not None
                  and hasattr(q.input_quant, "boundaries")), None)
        plotted, w = draw_optional("activation_ranges.png", lambda: activation_range_plot(
            stats, b, out / "activation_ranges.png"))
        warnings += [w] if w else []
    figures = []
    if mixed is not None:
        figures, w = draw_optional("mixed-precision figures", lambda: mixed_precision_plots(
            mixed.table, mixed.allocation.bits, out))
        warnings += [w] if w else []
    checked: list[str] = []
    v = None if den is None else den.diffq.report.verification
    if v is not None:
        checked, w = draw_optional("verification figure", lambda: verification_plot(v, out))
        warnings += [w] if w else []
    return {"plotted_layers": plotted, "mixed_figures": figures, "verification_figures": checked,
            "warnings": warnings}


def _sampling_pass(s: CalibrateSettings, pipe, prompts: list[str], progress: bool):
    """A callable that samples every prompt once (batched, same seeds as the statistics pass)."""
    return calibration_pass(pipe, prompts, s.seed, s.steps, s.guidance, s.batch_size, progress)


def _plan_mixed(s: CalibrateSettings, pipe, prompts: list[str], recipe, progress: bool) -> MixedResult:
    """Replay denoiser calls of a few prompts at evenly spaced steps to measure per-layer
    sensitivity, then choose widths; the table is cached next to the output for --resume."""
    cfg = recipe.mixed
    calls = denoiser_calls(pipe, prompts[: cfg.prompts], s.steps, s.guidance, s.seed, cfg.timesteps)
    cached = _cache_dir(s.out) / "sensitivity.json"
    table = SensitivityTable.from_json(cached.read_text()) if s.resume and cached.is_file() else None
    result = plan_mixed(denoiser(pipe), recipe, calls, table=table, progress=progress)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(result.table.to_json())
    return result


def mixed_summary(m: MixedResult) -> dict:
    a, t = m.allocation, m.table
    finite = torch.isfinite(t.error[:, 0]) & (t.error[:, 0] > 0)
    return {
        "average_bits": round(a.average_bits, 3), "bytes": a.bytes,
        "bits": dict(sorted((b, sum(1 for v in a.bits.values() if v == b)) for b in t.bits)),
        "predicted_error": a.predicted_error, "measured_error": m.measured_error,
        "proxy_spearman": (float(spearman_corrcoef(t.proxy[finite, 0].float(), t.error[finite, 0].float()))
                           if finite.sum() > 1 else None),
        "layers": a.bits,
    }


def asdict_str(s: CalibrateSettings) -> dict:
    return {k: str(v) for k, v in asdict(s).items() if k not in ("overwrite", "resume", "out")}


def resume_hint(out: Path) -> str | None:
    """What an interrupted run left to continue from, for the interrupt message."""
    progress = _cache_dir(out) / "progress.json"
    if not progress.is_file():
        return None
    done = json.loads(progress.read_text())["done"]
    return (f"{done} finished prompts are cached in {progress.parent}: rerun the same command "
            "with --resume to continue from there")


def _settings_diff(cached: dict, now: dict) -> str:
    return ", ".join(f"{k} {cached.get(k)!r} -> {now.get(k)!r}"
                     for k in sorted(set(cached) | set(now)) if cached.get(k) != now.get(k))


def _collect(s, pipe, prompts, p: Plan, progress, procs: Processes = Processes()) -> tuple[dict, list]:
    """Collect in prompt batches; after each batch the statistics so far are cached next to the
    output, so an interrupted run continues with --resume (a plain rerun says what it discards).
    With several processes each takes every count-th batch (same seeds as one process would
    use) and nothing is cached. The bar moves every denoising step. Returns (statistics, the
    held-back calls of batch VERIFY_BATCH, which the statistics leave out)."""
    cache = _cache_dir(s.out)
    meta = {**asdict_str(s), "recipe": p.recipe.name}
    stats, done, held = None, 0, []
    verifying = verifiable(p) and len(prompts) > s.batch_size  # another batch gives the statistics
    if (cache / "progress.json").is_file():
        info = json.loads((cache / "progress.json").read_text())
        if not s.resume:
            print(f"diffq calibrate: note: discarding {info['done']} finished prompts cached in {cache} "
                  "by an interrupted run (pass --resume to continue it instead)", file=sys.stderr)
        elif info["meta"] != meta:
            raise InputError(f"--resume: the cached run in {cache} used other settings "
                             f"({_settings_diff(info['meta'], meta)}); run without --resume to "
                             "start over")
        else:
            stats, done = load_stats(cache / "stats.safetensors"), info["done"]
    if procs.count == 1:
        cache.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(prompts) * s.steps, initial=done * s.steps, desc="calibrating",
               unit="step", disable=not progress)
    for i in range(done, len(prompts), s.batch_size):
        batch = prompts[i:i + s.batch_size]
        if (i // s.batch_size) % procs.count != procs.index:
            continue

        def step_done(_pipe, _i, _t, kwargs, batch=batch):
            bar.update(len(batch))
            return kwargs

        def drive(batch=batch, i=i, step_done=step_done):
            sample_latents(pipe, batch, s.seed + i, s.steps, s.guidance, step_done)

        held_batch = verifying and i // s.batch_size == VERIFY_BATCH
        with calibrate(denoiser(pipe), p, inputs=False, holdout=ALL if held_batch else 0) as cal:
            cal.run(drive)
        if held_batch:  # this batch's calls check the scales the others give
            held += cal.held
            continue
        stats = merge_stats(stats, cal.activation_stats)
        if procs.count == 1:
            save_stats(stats, cache / "stats.safetensors", meta)
            write_json(cache / "progress.json", {"meta": meta, "done": i + len(batch)})
    bar.close()
    if procs.count == 1:
        return stats, held
    return gather_stats(stats, procs), gather_calls(held, procs)


def gather_calls(calls: list, procs: Processes) -> list:
    """The held-back calls of every process (one process ran the verification batch)."""
    import torch.distributed as dist

    parts: list = [None] * procs.count
    dist.all_gather_object(parts, calls)
    return [c for part in parts for c in part]


def _verification_section(md: Markdown, v: dict, figures: list[str]) -> None:
    layers = v["layers"]
    moved = Counter(d["choice"] for d in layers.values())
    widened = (f"; {len(v['widened'])} layers widened to dynamic by the whole-model check"
               if v["widened"] else "")
    md.heading("Verification", 2).text(
        f"Static scales checked on {v['calls']} denoiser calls held back from the statistics (one prompt "
        f"batch, every timestep). Whole model on them: **{v['sqnr_db']:.2f} dB** output SQNR vs FP, "
        f"all-dynamic W8A8 {v['dynamic_sqnr_db']:.2f} dB (the bar: no more than 0.5 dB below). "
        f"Per layer: {', '.join(f'{n} {c}' for c, n in moved.most_common())}{widened}.")
    for f in figures:
        md.image(f, "per-layer output SQNR on the held-back calls, before and after")
    worst = sorted(layers.items(), key=lambda kv: kv[1]["sqnr_db"]["static"])[:20]
    md.text("The 20 layers with the largest static error:")
    md.table(["layer", "role", "static dB", "percentile dB", "mse dB", "dynamic dB", "choice"],
             [(f"`{n}`", d["role"], *(f"{d['sqnr_db'][k]:.1f}" if k in d["sqnr_db"] else "-"
                                     for k in ("static", "percentile", "mse", "dynamic")), d["choice"])
              for n, d in worst])


def _write_report(out: Path, r: dict) -> None:
    write_json(out / "report.json", r)
    md = Markdown(f"diffq calibrate: {r['recipe']}").text(
        f"Model `{r['model']}`, {r['num_prompts']} prompts from `{r['prompts']}`, "
        f"{r['steps']} steps, guidance {r['guidance']}, seed {r['seed']}; took {r['seconds']} s.",
    ).text(
        f"Weight bytes: {r['weight_bytes']:,} vs {r['weight_bytes_fp']:,} bf16 "
        f"({r['weight_bytes'] / r['weight_bytes_fp']:.3f}x).",
    ).text(f"**{len(r['layers'])} layers quantized**, {len(r['skipped'])} kept float.")
    md.table(["count", "scheme or reason"],
             [*((n, what) for what, n in Counter(r["layers"].values()).most_common()),
              *((n, f"float: {why}") for why, n in Counter(r["skipped"].values()).most_common())])
    md.text("What the quantized layers run on this CPU (\"simulated\": activations rounded to "
            "int8 and computed in float, no kernel for that scheme here yet):")
    md.table(["layers", "kernel"], [(n, k) for k, n in Counter(r["kernels"].values()).most_common()])
    if r.get("split_layers"):
        md.text(f"This CPU has no VNNI (its u8 x s8 products saturate at int16): "
                f"{len(r['split_layers'])} of these layers run their int8 weights split in two "
                "halves, exact at twice the multiply work; `--recipe w7a8` (int7 weights) runs "
                "them whole.")
    md.warnings(r["warnings"])
    if r["plotted_layers"]:
        md.image("activation_ranges.png", "activation range over timesteps")
    if "mixed" in r:
        m = r["mixed"]
        counts = ", ".join(f"{n} layers at {b} bits" for b, n in m["bits"].items())
        rho = "n/a" if m["proxy_spearman"] is None else f"{m['proxy_spearman']:.2f}"
        md.heading("Mixed precision", 2).text(
            f"Average weight width {m['average_bits']} bits ({counts}); {m['bytes']:,} bytes in the "
            "mixed layers. Relative MSE of the denoiser output (fake-quant weights only, sensitivity "
            f"calls): predicted (sum of per-layer) {m['predicted_error']:.3g}, measured "
            f"{m['measured_error']:.3g}. Proxy (weight error x input energy) vs measured rank "
            f"correlation at the lowest width: {rho}.")
        for f in r["mixed_figures"]:
            md.image(f, f)
    if "verification" in r:
        _verification_section(md, r["verification"], r.get("verification_figures", []))
    md.table(["layer", "scheme"], [*((f"`{n}`", v) for n, v in r["layers"].items()),
                                   *((f"`{n}`", f"float ({why})") for n, why in r["skipped"].items())])
    write_text(out / "report.md", str(md))
