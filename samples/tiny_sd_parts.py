"""Builders for the tiny Stable Diffusion reference pipeline (architecture only, no training),
and the eval set its numbers are measured on.

Shared by samples/train_tiny_sd.py (which trains them and checks its VAE on the eval set) and
samples/measure_reference.py (which also needs an untrained pipeline as the FID baseline).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from diffq.eval.evaluator import split_words
from diffq.eval.shapes import caption, render, sample_scenes, to_tensor

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 32  # longest shapes caption is 26 tokens with BOS/EOS
LATENT_CHANNELS = 4
TEXT_WIDTH = 128
# Training noise schedule = SD 1.x schedule; sampling uses 20 DPM-Solver++ steps over it.
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the words of texts: BOS + words + EOS, padded to MAX_LENGTH.

    Special ids are pad 0, unk 1, BOS 2, EOS 3; CLIPTextModel pools at the first EOS
    (an EOS id of 2 would select its legacy argmax pooling).
    """
    words = sorted({w for t in texts for w in split_words(t)})
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=MAX_LENGTH, padding_side="right",
    )


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    """Small CLIP text transformer (hidden 128, 3 layers)."""
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(cfg)


def build_vae() -> AutoencoderKL:
    """64x64x3 <-> 16x16x4 KL autoencoder (two downsamplings)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=LATENT_CHANNELS,
        norm_num_groups=8, sample_size=64,
    )


UNET_WIDTHS = (32, 64, 128)


def build_unet(widths: tuple[int, int, int] = UNET_WIDTHS, heads: int = 1) -> UNet2DConditionModel:
    """Three-level UNet over 16x16 latents, cross-attention at the 16x16 and 8x8 levels.

    `heads` is the number of attention heads (diffusers' legacy `attention_head_dim` means that).
    One head (head dims 32 and 64) trains ~25 % faster per step on CPU than four heads of 8 and 16.
    """
    return UNet2DConditionModel(
        sample_size=16, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=widths, layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=heads,
    )


def train_scheduler() -> DDPMScheduler:
    """Forward-process schedule the UNet is trained on."""
    return DDPMScheduler(**SCHEDULE)


def sampling_scheduler() -> DPMSolverMultistepScheduler:
    """Scheduler shipped with the pipeline; 20 steps give good samples."""
    return DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                       steps_offset=1)


def assemble(vae: AutoencoderKL, text_encoder: CLIPTextModel,
             tokenizer: PreTrainedTokenizerFast, unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """StableDiffusionPipeline without safety checker, in eval mode."""
    for m in (vae, text_encoder, unet):
        m.eval().requires_grad_(False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def save_fp16(pipe: DiffusionPipeline, out_dir: str) -> None:
    """Save the pipeline as fp16 safetensors (the pipeline itself is left as it was)."""
    dtype = pipe.dtype
    pipe.to(torch.float16)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    pipe.to(dtype)
    # transformers loads with the config's dtype by default while diffusers loads float32;
    # recording float32 keeps a plain from_pretrained() in one dtype.
    cfg_path = Path(out_dir) / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def eval_set(n: int) -> tuple[torch.Tensor, list[str]]:
    """The first n eval scenes: real images (float [0, 1]) and their captions, in the order of
    samples/prompts/shapes-eval.txt, so every reference number is measured on the same set."""
    scenes = sample_scenes("eval", n, seed=0)
    return to_tensor([render(s) for s in scenes]).float() / 255, [caption(s, i) for i, s in enumerate(scenes)]
