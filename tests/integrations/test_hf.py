"""diffq as a diffusers / transformers quantization backend, with the real library classes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.quantizers import PipelineQuantizationConfig
from safetensors.torch import load_file

import diffq
from diffq import DiffqConfig
from diffq.errors import CheckpointError
from diffq.integrations.pipeline import apply_quantized
from diffq.nn import QConv2d, QLinear

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "samples" / "tiny-sd"
PROMPTS = ["a red circle", "a green triangle"]


@pytest.fixture(autouse=True)
def registered():
    """What a user of the drop-in does once: register diffq's backend (undone after each test)."""
    with diffq.register():
        yield


def test_import_changes_no_registry_and_register_is_undone_on_exit():
    code = ("import diffq\n"
            "from diffusers.quantizers import auto as d\n"
            "from transformers.quantizers import auto as t\n"
            "maps = (d.AUTO_QUANTIZER_MAPPING, d.AUTO_QUANTIZATION_CONFIG_MAPPING,\n"
            "        t.AUTO_QUANTIZER_MAPPING, t.AUTO_QUANTIZATION_CONFIG_MAPPING)\n"
            "print(['diffq' in m for m in maps])\n"
            "with diffq.register() as r:\n"
            "    print(['diffq' in m for m in maps], len(r.added))\n"
            "    with diffq.register() as inner:  # idempotent: the outer registration owns them\n"
            "        print(len(inner.added))\n"
            "    print(['diffq' in m for m in maps])\n"
            "print(['diffq' in m for m in maps])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split("\n")[:5] == ["[False, False, False, False]", "[True, True, True, True] 4", "0",
                                        "[True, True, True, True]", "[False, False, False, False]"]


def images(pipe, steps: int = 3):
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=steps, generator=gens, output_type="np").images


def n_quantized(module) -> int:
    return sum(isinstance(m, (QLinear, QConv2d)) for m in module.modules())


def test_unet_weight_only_on_load():
    fp = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    q = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet",
                                             quantization_config=DiffqConfig(weights="int8"))
    assert n_quantized(q) > 100 and q.down_blocks[0].resnets[0].conv1.qweight.dtype == torch.int8
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 8, 128)
    with torch.no_grad():
        a, b = fp(x, t, c).sample, q(x, t, c).sample
    assert (a - b).pow(2).mean() / a.pow(2).mean() < 1e-3


def test_pipeline_config_quantizes_unet_and_text_encoder_and_round_trips(tmp_path):
    pq = PipelineQuantizationConfig(quant_backend="diffq", quant_kwargs={"weights": "int8"},
                                    components_to_quantize=["unet", "text_encoder"])
    pipe = DiffusionPipeline.from_pretrained(MODEL, quantization_config=pq)
    assert n_quantized(pipe.unet) > 100 and n_quantized(pipe.text_encoder) > 10
    assert n_quantized(pipe.vae) == 0
    before = images(pipe)
    pipe.save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "text_encoder" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "diffq" and cfg["recipe"]["name"] == "w8" and cfg["layers"]
    again = DiffusionPipeline.from_pretrained(tmp_path / "q")
    assert n_quantized(again.text_encoder) == n_quantized(pipe.text_encoder)
    assert (images(again) == before).all()


def test_int4_i8_pipeline_reloads_its_products_from_the_checkpoint(tmp_path):
    """diffusers and transformers assign the stored tensors on load: the int8 products the
    kernels multiply are remade from them, so the reload computes the same images."""
    recipe = {"name": "w4i8-weights", "weights": {"format": "int4_i8", "granularity": "per_group",
                                                  "group_size": 32}}
    pq = PipelineQuantizationConfig(quant_backend="diffq", quant_kwargs={"recipe": recipe},
                                    components_to_quantize=["unet", "text_encoder"])
    pipe = DiffusionPipeline.from_pretrained(MODEL, quantization_config=pq)
    conv = pipe.unet.down_blocks[0].resnets[0].conv1
    assert conv.qweight.dtype == torch.uint8 and conv.weight_layout.format == "int4_i8"
    before = images(pipe)
    pipe.save_pretrained(tmp_path / "q")
    again = DiffusionPipeline.from_pretrained(tmp_path / "q")
    assert torch.equal(again.unet.down_blocks[0].resnets[0].conv1.qweight_compute, conv.qweight_compute)
    assert (images(again) == before).all()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """tiny-sd with a W8A8 UNet (4 timestep groups, split skip concats), saved with save_pretrained."""
    pipe = DiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)

    def drive():
        pipe(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(7), output_type="latent")

    diffq.quantize(pipe.unet, "w8a8", calibration=drive)
    out = tmp_path_factory.mktemp("w8a8") / "pipe"
    pipe.save_pretrained(out)
    return pipe, out


def test_calibrated_pipeline_reloads_bit_identical(calibrated):
    pipe, out = calibrated
    cfg = json.loads((out / "unet" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "diffq" and cfg["recipe"]["name"] == "w8a8"
    tensors = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(k.endswith(".qweight") and v.dtype == torch.int8 for k, v in tensors.items())
    tables = {k: v for k, v in tensors.items() if k.endswith("input_quant.scale")}
    assert tables and all(v.shape[0] == 4 for v in tables.values())
    again = DiffusionPipeline.from_pretrained(out)
    conv = again.unet.up_blocks[1].resnets[0].conv1
    assert conv.input_quant.segments == pipe.unet.up_blocks[1].resnets[0].conv1.input_quant.segments
    assert (images(again) == images(pipe)).all()


def test_reload_with_torch_dtype_keeps_codes_and_tables(calibrated):
    _, out = calibrated
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet", torch_dtype=torch.bfloat16)
    conv = unet.up_blocks[1].resnets[0].conv1
    assert conv.qweight.dtype == torch.int8 and conv.input_quant.scale.dtype == torch.float32
    assert conv.bias.dtype == torch.bfloat16


def test_calibrate_writes_a_loadable_pipeline(tmp_path):
    from diffq import cli

    out = tmp_path / "cal"
    assert cli.main(["calibrate", "--model", str(MODEL), "--num-prompts", "2", "--steps", "4",
                     "--batch-size", "2", "--no-progress", "--out", str(out)]) == 0
    assert (out / "model_index.json").is_file() and (out / "unet" / "diffq.json").is_file()
    assert json.loads((out / "unet" / "config.json").read_text())["quantization_config"]["layers"]
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (MODEL / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()  # FP parts as they are
    loaded = DiffusionPipeline.from_pretrained(out)
    applied = DiffusionPipeline.from_pretrained(MODEL)
    apply_quantized(applied, out)  # the diffq.json route (diffq eval --quantized)
    assert (images(loaded) == images(applied)).all()


def test_unknown_scheme_names_the_valid_ones():
    with pytest.raises(ValueError, match="int8, int4"):
        DiffqConfig(weights="int3")
    with pytest.raises(ValueError, match="w8a8"):
        DiffqConfig(recipe="w3a3")
    with pytest.raises(ValueError, match="needs calibration"):
        UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet",
                                             quantization_config=DiffqConfig(recipe="w8a8"))


def test_newer_format_version_is_refused(calibrated, tmp_path):
    import shutil

    _, out = calibrated
    shutil.copytree(out / "unet", tmp_path / "unet")
    path = tmp_path / "unet" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"]["format_version"] = 99
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="newer than this diffq reads.*pip install -U diffq-toolkit"):
        UNet2DConditionModel.from_pretrained(tmp_path / "unet")


def test_mismatched_shapes_are_refused(calibrated, tmp_path):
    import shutil

    _, out = calibrated
    shutil.copytree(out / "unet", tmp_path / "unet")
    path = tmp_path / "unet" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["cross_attention_dim"] = 64  # attn2.to_k / to_v now take 64 inputs, the checkpoint 128
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="another architecture"):
        UNet2DConditionModel.from_pretrained(tmp_path / "unet")


def test_without_diffq_registered_the_error_names_diffq(calibrated):
    _, out = calibrated
    code = ("import diffq\nfrom diffusers import UNet2DConditionModel\n"
            f"UNet2DConditionModel.from_pretrained({str(out / 'unet')!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "Unknown quantization type, got diffq" in r.stderr.strip().splitlines()[-1]


def test_transformers_checkpoint_without_diffq_fails_and_says_what_to_install(tmp_path):
    from transformers import CLIPTextModel

    from diffq.checkpoint import NOTICE_KEY
    from diffq.integrations.hf_transformers import DiffqTransformersConfig

    q = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder",
                                      quantization_config=DiffqTransformersConfig(weights="int8"))
    q.save_pretrained(tmp_path / "te")
    # transformers alone would warn, then run on random weights; the markers make it an error.
    # transformers prints that report only at its default verbosity: drop any *_VERBOSITY the
    # host environment carries.
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    code = ("import diffq\nfrom transformers import CLIPTextModel\n"
            f"CLIPTextModel.from_pretrained({str(tmp_path / 'te')!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "ignore_mismatched_sizes" in r.stderr.strip().splitlines()[-1]
    assert NOTICE_KEY in r.stderr and "pip_install_diffq_toolkit" in NOTICE_KEY
    # with diffq registered the markers are expected: nothing unexpected, missing or mismatched
    again, info = CLIPTextModel.from_pretrained(tmp_path / "te", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, 30, (2, 8))
    with torch.no_grad():
        assert torch.equal(again(ids)[0], q(ids)[0])


def tiny_sdxl(path: Path) -> Path:
    """A random tiny StableDiffusionXLPipeline (tiny-sd's VAE and tokenizer), saved to `path`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    te = dict(vocab_size=34, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=32, projection_dim=32)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                                in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=64,
                                norm_num_groups=8)
    tok = AutoTokenizer.from_pretrained(MODEL / "tokenizer")
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(MODEL, subfolder="vae"), unet=unet,
        text_encoder=CLIPTextModel(CLIPTextConfig(**te)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**te)),
        tokenizer=tok, tokenizer_2=tok, scheduler=EulerDiscreteScheduler())
    pipe.save_pretrained(path)
    return path


def test_sdxl_pipeline_quantizes_on_load_and_round_trips(tmp_path):
    src = tiny_sdxl(tmp_path / "sdxl")
    pq = PipelineQuantizationConfig(quant_backend="diffq", quant_kwargs={"weights": "int8"},
                                    components_to_quantize=["unet", "text_encoder", "text_encoder_2"])
    pipe = DiffusionPipeline.from_pretrained(src, quantization_config=pq)
    assert all(n_quantized(getattr(pipe, c)) > 5 for c in ("unet", "text_encoder", "text_encoder_2"))
    before = images(pipe, steps=2)
    pipe.save_pretrained(tmp_path / "q")
    assert (images(DiffusionPipeline.from_pretrained(tmp_path / "q"), steps=2) == before).all()


def test_dit_transformer_weight_only_and_calibrated_round_trip(tmp_path):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                             num_attention_heads=4, caption_channels=32, in_channels=4,
                             cross_attention_dim=32,
                             out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                             num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                             norm_elementwise_affine=False, norm_eps=1e-6).save_pretrained(tmp_path / "dit")
    w8 = PixArtTransformer2DModel.from_pretrained(tmp_path / "dit",
                                                  quantization_config=DiffqConfig(weights="int8"))
    assert n_quantized(w8) > 10
    g = torch.Generator().manual_seed(0)
    cond = {"resolution": None, "aspect_ratio": None}
    calls = [((torch.randn(2, 4, 8, 8, generator=g),),
              {"encoder_hidden_states": torch.randn(2, 6, 32, generator=g), "timestep": torch.tensor([t, t]),
               "added_cond_kwargs": cond}) for t in (999, 800, 600, 400, 200, 1)]
    model = PixArtTransformer2DModel.from_pretrained(tmp_path / "dit")
    diffq.quantize(model, "w8a8", calibration=calls)
    model.save_pretrained(tmp_path / "q")
    again = PixArtTransformer2DModel.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        for args, kwargs in calls:
            assert torch.equal(model(*args, **kwargs).sample, again(*args, **kwargs).sample)
