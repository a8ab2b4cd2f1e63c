"""Load diffusers pipelines, apply diffq checkpoints to their components, generate images."""
from __future__ import annotations

import contextlib
import inspect
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffq.assets import check_exists
from diffq.calib.collector import first_call
from diffq.calib.structure import Structure, trace_structure
from diffq.checkpoint import META_FILE, load
from diffq.errors import CheckpointError, InputError
from diffq.integrations.adapters import register

DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
QUANTIZABLE_COMPONENTS = (*DENOISERS, *TEXT_ENCODERS)


def check_pipeline_dir(path: str | Path) -> Path:
    path = check_exists(Path(path), "model directory")
    if not path.is_dir():
        raise InputError(f"{path} is a file, not a diffusers pipeline directory")
    if not (path / "model_index.json").is_file():
        raise InputError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    return path


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """diffusers' and transformers' loading bars on or off while the block runs, then as they were
    (they are process-wide switches of those libraries)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = [(lib, lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _ in before:
        (lib.enable_progress_bar if enabled else lib.disable_progress_bar)()
    try:
        yield
    finally:
        for lib, was in before:
            (lib.enable_progress_bar if was else lib.disable_progress_bar)()


_CALL_OPTIONS = "_diffq_call_options"


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True,
                  call: dict | None = None):
    """A diffusers pipeline from a local directory (diffq-quantized components included), with
    its sampling progress bar off; `call` (e.g. height, width) goes into every pipeline call diffq
    makes with it (`sampling_kwargs`)."""
    path = check_pipeline_dir(path)
    from diffusers import DiffusionPipeline

    try:
        with library_progress_bars(progress), register():  # diffq components load as such
            pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the pipeline in {path}: {str(e).splitlines()[0]}") from None
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is None:
        raise InputError(f"the pipeline in {path} has no UNet (or denoising transformer) to quantize")
    pipe.set_progress_bar_config(disable=True)
    setattr(pipe, _CALL_OPTIONS, dict(call or {}))
    return pipe


def denoiser_name(pipe) -> str:
    """The pipeline attribute holding its denoiser: "unet", or "transformer" for a DiT."""
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def denoiser(pipe):
    return getattr(pipe, denoiser_name(pipe))


def pipeline_components(path: str | Path) -> set[str]:
    """The quantizable components a pipeline folder has (its model_index.json), read before
    anything is loaded so that a recipe naming a missing one is refused at once."""
    index = json.loads((check_pipeline_dir(path) / "model_index.json").read_text(encoding="utf-8"))
    return {n for n in QUANTIZABLE_COMPONENTS if isinstance(index.get(n), list) and index[n][0] is not None}


def resolve_components(available: set[str], requested: list[str]) -> list[str]:
    """A recipe's `components` as attribute names of a pipeline with `available` components,
    denoiser first: "denoiser" is whichever it has; "unet" / "transformer" must be the one it has."""
    name = "unet" if "unet" in available else "transformer"
    out = []
    for c in requested:
        if c == "denoiser":
            c = name
        elif c in DENOISERS and c != name:
            raise InputError(f"the recipe quantizes component {c!r}, but this pipeline's denoiser is "
                             f"{name!r}; use 'denoiser' in the recipe's components")
        if c not in available:
            raise InputError(f"the recipe quantizes {c!r}, which this pipeline lacks")
        if c not in out:
            out.append(c)
    return sorted(out, key=lambda c: c not in DENOISERS)


def sampling_kwargs(pipe) -> dict:
    """What diffq passes to every call of `pipe`: the options it was loaded with (height, width),
    and resolution binning (PixArt, Sana) off where the pipeline has it, so the size asked for (or
    the denoiser's native size) is the size sampled."""
    params = inspect.signature(type(pipe).__call__).parameters
    binning = {"use_resolution_binning": False} if "use_resolution_binning" in params else {}
    return binning | getattr(pipe, _CALL_OPTIONS, {})


def quantized_components(qdir: str | Path) -> dict[str, Path]:
    """Component name -> diffq checkpoint directory inside a quantized-pipeline directory."""
    qdir = Path(qdir)
    if qdir.is_file():
        raise CheckpointError(f"--quantized {qdir} is a file, not a quantized directory (the output "
                              "folder of diffq calibrate or diffq.save)")
    if not qdir.is_dir():
        raise CheckpointError(f"quantized directory {qdir} does not exist")
    found = {c: qdir / c for c in QUANTIZABLE_COMPONENTS if (qdir / c / META_FILE).is_file()}
    if not found and (qdir / META_FILE).is_file():
        found = {"unet": qdir}  # a bare diffq.save of a UNet
    if not found:
        raise CheckpointError(f"{qdir} holds no diffq checkpoint ({META_FILE} in unet/ etc.)")
    return found


def save_quantized_pipeline(source: str | Path, components: dict, out: Path) -> None:
    """Write a pipeline directory that `DiffusionPipeline.from_pretrained(out)` loads after
    `import diffq`: the float components of `source` copied as they are, each quantized one
    saved with `save_pretrained` (config.json with quantization_config, safetensors) plus its
    diffq.json, so that `diffq.load` / `apply_quantized` read it too."""
    from diffq.checkpoint import metadata, tied_aliases
    from diffq.integrations.adapters import attach

    source = check_pipeline_dir(source)
    shutil.copytree(source, out, dirs_exist_ok=True, ignore=lambda d, names: [
        n for n in names if Path(d) == source and n in components])
    for name, module in components.items():
        attach(module)
        module.save_pretrained(out / name)
        meta = metadata(module, tied_aliases(module))
        (out / name / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def apply_quantized(pipe, qdir: str | Path, verify_hashes: bool = True) -> list[str]:
    """Load every quantized component of `qdir` into the float pipeline `pipe` (in place)."""
    comps = quantized_components(qdir)
    for name, path in comps.items():
        module = getattr(pipe, name, None)
        if module is None:
            raise CheckpointError(f"{qdir} quantizes component {name!r}, which the pipeline lacks")
        load(path, module, verify_hashes=verify_hashes)
    return list(comps)


@torch.inference_mode()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 20,
             guidance: float = 5.0, batch_size: int = 8, progress: bool = True,
             desc: str = "generating") -> list[Image.Image]:
    """One image per (prompt, seed); image i depends only on its prompt and seed."""
    images: list[Image.Image] = []
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for i in range(0, len(prompts), batch_size):
        ps, ss = prompts[i:i + batch_size], seeds[i:i + batch_size]
        gens = [torch.Generator().manual_seed(s) for s in ss]
        out = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="pil", **sampling_kwargs(pipe))
        if not hasattr(out, "images"):
            raise InputError(f"{type(pipe).__name__} makes videos, and eval / compare score images; "
                             "calibrate it with `diffq calibrate` or `diffq.quantize`")
        images.extend(out.images)
        bar.update(len(ps))
    bar.close()
    return images


def sample_latents(pipe, prompts: list[str], first_seed: int, steps: int, guidance: float,
                   on_step=None) -> None:
    """One calibration sampling call: prompt k of the batch uses seed `first_seed + k`, so prompt
    i of a prompt file always samples with seed + i (calibrate, compare and resumed runs alike).
    `on_step(pipe, i, t, kwargs)` runs after every denoising step."""
    gens = [torch.Generator().manual_seed(first_seed + k) for k in range(len(prompts))]
    kw = sampling_kwargs(pipe) | ({} if on_step is None else {"callback_on_step_end": on_step})
    pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
         output_type="latent", **kw)


VERIFY_BATCH = 1  # the calibration prompt batch held back to verify the scales the others give


def calibration_pass(pipe, prompts: list[str], seed: int, steps: int, guidance: float,
                     batch_size: int, progress: bool = False, batches=None):
    """A callable that samples every calibration prompt once, in batches (`sample_latents`);
    `batches(k)` True for the batch indices to run (default: all)."""
    def drive():
        for i in tqdm(range(0, len(prompts), batch_size), desc="layer inputs", disable=not progress):
            if batches is None or batches(i // batch_size):
                sample_latents(pipe, prompts[i:i + batch_size], seed + i, steps, guidance)
    return drive


def denoiser_structure(pipe, prompt: str, seed: int, steps: int, guidance: float) -> Structure:
    """The denoiser's layer roles and skip concats, traced on its first call while sampling
    `prompt` (the run stops at that call)."""
    model = denoiser(pipe)
    call = first_call(model, calibration_pass(pipe, [prompt], seed, steps, guidance, 1))
    return trace_structure(model, *call)


def denoiser_calls(pipe, prompts: list[str], steps: int, guidance: float, seed: int, timesteps: int) -> list:
    """The denoiser calls (args, kwargs) of one sampling run over `prompts` at `timesteps` evenly
    spaced denoising steps, to replay (mixed-precision sensitivity)."""
    from diffq.mixed.sensitivity import record_calls

    keep = set(torch.linspace(0, steps - 1, min(timesteps, steps)).round().long().tolist())
    return record_calls(denoiser(pipe), lambda: sample_latents(pipe, prompts, seed, steps, guidance),
                        keep=keep.__contains__)


def text_encoder_calls(pipe, names: list[str], prompts: list[str], seed: int, guidance: float,
                       batch_size: int) -> dict[str, list]:
    """Every call the pipeline makes to each text encoder of `names` while it samples the prompts
    (with its own tokenizers, padding, masks and the unconditional branch), in one pass of two
    denoising steps per batch (PixArt's pipeline cannot take one with a multistep scheduler)."""
    from diffq.mixed.sensitivity import record_calls_of

    def drive():
        for i in range(0, len(prompts), batch_size):
            sample_latents(pipe, prompts[i:i + batch_size], seed + i, 2, guidance)
    return record_calls_of({n: getattr(pipe, n) for n in names}, drive)
