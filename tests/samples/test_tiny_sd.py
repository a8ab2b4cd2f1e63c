from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel

TINY_SD = Path(__file__).resolve().parents[2] / "samples" / "tiny-sd"
PROMPT = "a large red circle at the center on a gray background"


def _load() -> StableDiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(str(TINY_SD))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_offline_as_stable_diffusion():
    pipe = _load()
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    unet: UNet2DConditionModel = pipe.unet
    assert len(unet.config.block_out_channels) >= 3
    assert sum("CrossAttn" in t for t in unet.config.down_block_types) >= 2
    assert unet.config.in_channels == pipe.vae.config.latent_channels


def test_tokenizer_adds_bos_and_eos_and_pads():
    tok = _load().tokenizer
    ids = tok([PROMPT, ""], padding="max_length", max_length=tok.model_max_length).input_ids
    assert all(len(row) == tok.model_max_length for row in ids)
    assert ids[0][0] == tok.bos_token_id and ids[1][:2] == [tok.bos_token_id, tok.eos_token_id]
    assert tok.unk_token_id not in ids[0]


def test_generates_a_64x64_image_with_guidance():
    pipe = _load()
    out = pipe(PROMPT, num_inference_steps=2, guidance_scale=4.0, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    assert (out >= 0).all() and (out <= 1).all()


def test_weights_are_fp16_safetensors_and_folder_is_small():
    files = [f for f in TINY_SD.rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in {".bin", ".pt", ".pkl", ".ckpt"}]
    assert len([f for f in files if f.suffix == ".safetensors"]) == 3
    assert sum(f.stat().st_size for f in files) < 40 * 2**20
    from safetensors import safe_open

    with safe_open(str(TINY_SD / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
