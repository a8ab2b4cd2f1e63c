"""Every diffusion-transformer class (SD3, Flux, PixArt, Sana, Wan; tiny random configs) through
the whole lifecycle in its own pipeline: roles traced, time-step-aware calibration on the
timestep values that model receives, convert, save_pretrained, from_pretrained, generate."""
import json

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.quantizers import PipelineQuantizationConfig

import diffq
from diffq.calib.collector import first_call
from diffq.calib.structure import trace_structure
from diffq.eval.metrics import psnr
from diffq.integrations.pipeline import sampling_kwargs
from diffq.nn import QConv2d, QLinear
from tests.dit_pipelines import KINDS, LOAD_KWARGS, build

CALIB = ["a red circle", "a blue square at the top", "two green triangles", "a small yellow star",
         "a big purple circle", "an orange square"]
HELD = ["a red square", "a blue circle on the left"]  # not in CALIB
# timestep values each model is called with: SD3 / Sana / Wan sigma * 1000, Flux t / 1000,
# PixArt the integer DDPM timestep
TIMESTEP_RANGE = {"sd3": (0, 1000), "flux": (0, 1), "pixart": (0, 1000), "sana": (0, 1000), "wan": (0, 1000)}


def sample(pipe, kind: str, kw: dict, prompts: list[str], seed: int, output_type: str = "np"):
    """Images (video frames for Wan) as a float tensor [N, C, H, W]; prompt k uses seed + k."""
    out = pipe(prompts, num_inference_steps=4, guidance_scale=4.0, output_type=output_type,
               generator=[torch.Generator().manual_seed(seed + k) for k in range(len(prompts))],
               **(sampling_kwargs(pipe) | kw))
    x = torch.as_tensor(out.frames if kind == "wan" else out.images)
    return x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float()


def drive(pipe, kind: str, kw: dict):
    return lambda: [sample(pipe, kind, kw, CALIB[i:i + 2], i, output_type="latent") for i in range(0, 6, 2)]


@pytest.mark.parametrize("kind", KINDS)
def test_roles_are_found_in_every_dit_class(kind):
    pipe, kw = build(kind)
    structure = trace_structure(pipe.transformer, *first_call(pipe.transformer, drive(pipe, kind, kw)))
    found = {role for roles in structure.roles.values() for role in roles}
    # patch embedding (Wan's is a Conv3d: no quantizable layer), final projection, timestep MLP,
    # adaLN modulation, text-only layers
    expected = {"output", "embedding", "modulation", "context"} | ({"input"} if kind != "wan" else set())
    assert expected <= found, found
    assert structure.with_role("output") == ["proj_out"]
    assert all("norm" in n or "adaln" in n or "time" in n or "scale_shift" in n
               for n in structure.with_role("modulation")), structure.with_role("modulation")


@pytest.mark.parametrize("kind", KINDS)
def test_dit_w8a8_calibrate_save_load_generate(kind, tmp_path):
    pipe, kw = build(kind)
    fp = sample(pipe, kind, kw, HELD, 100)
    diffq.quantize(pipe.transformer, "w8a8", calibration=drive(pipe, kind, kw))
    report = pipe.transformer.diffq.report
    layers = [m for m in pipe.transformer.modules() if isinstance(m, (QLinear, QConv2d))]
    assert len(layers) >= 15 and all(m.qweight.dtype == torch.int8 for m in layers)
    if kind == "wan":
        assert isinstance(pipe.transformer.patch_embedding, torch.nn.Conv3d)
    else:
        assert any("role input" in why for why in report.skipped.values())
    assert report.verification is not None and report.verification["calls"] > 0
    lo, hi = TIMESTEP_RANGE[kind]
    bounds = [m.input_quant.boundaries for m in layers
              if m.input_quant is not None and hasattr(m.input_quant, "boundaries")]
    for b in bounds:  # groups split the timestep values this model really receives
        assert lo <= float(b.min()) and float(b.max()) <= hi, (kind, b)
    q = sample(pipe, kind, kw, HELD, 100)
    assert psnr(q, fp) > 30  # held-out prompts and seeds, against the float pipeline
    pipe.save_pretrained(tmp_path / "q")
    with diffq.register():
        again = DiffusionPipeline.from_pretrained(tmp_path / "q", **LOAD_KWARGS.get(kind, {}))
    again.set_progress_bar_config(disable=True)
    assert torch.equal(sample(again, kind, kw, HELD, 100), q)  # bit-identical after reload


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_pipeline_config_quantizes_transformer_and_text_encoder(kind, tmp_path):
    pipe, kw = build(kind)
    pipe.save_pretrained(tmp_path / "fp")
    with diffq.register():  # before the config: it checks that its backend is registered
        pq = PipelineQuantizationConfig(quant_backend="diffq", quant_kwargs={"weights": "int8"},
                                        components_to_quantize=["transformer", "text_encoder"])
        q = DiffusionPipeline.from_pretrained(tmp_path / "fp", quantization_config=pq,
                                              **LOAD_KWARGS.get(kind, {}))
        q.set_progress_bar_config(disable=True)
        n = sum(isinstance(m, (QLinear, QConv2d)) for m in q.transformer.modules())
        assert n >= 15 and any(isinstance(m, QLinear) for m in q.text_encoder.modules())
        before = sample(q, kind, kw, HELD, 0)
        q.save_pretrained(tmp_path / "q")
        cfg = json.loads((tmp_path / "q" / "transformer" / "config.json").read_text())
        assert cfg["quantization_config"]["quant_method"] == "diffq"
        again = DiffusionPipeline.from_pretrained(tmp_path / "q", **LOAD_KWARGS.get(kind, {}))
        again.set_progress_bar_config(disable=True)
        assert torch.equal(sample(again, kind, kw, HELD, 0), before)
