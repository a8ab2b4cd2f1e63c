"""Builders for the tiny DiT reference pipeline (architecture only, no training).

A PixArt-alpha-style pipeline over the shapes world: the shipped tiny-sd VAE and tokenizer,
a small T5 text encoder and a PixArtTransformer2DModel (adaLN-single modulation, self- and
cross-attention over 8x8 patches of the 16x16x4 latents).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
from tiny_sd_parts import TEXT_WIDTH, sampling_scheduler
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

TINY_SD = Path(__file__).resolve().parent / "tiny-sd"
MAX_SEQUENCE_LENGTH = 120  # PixArtAlphaPipeline's default; padded tokens are masked out
DIT_WIDTH, DIT_LAYERS, HEAD_DIM = 128, 8, 32


def load_tokenizer(source: Path = TINY_SD) -> PreTrainedTokenizerFast:
    """tiny-sd's word-level tokenizer (pad 0, BOS 2, EOS 3), padded to PixArt's sequence length."""
    tok = PreTrainedTokenizerFast.from_pretrained(source, subfolder="tokenizer")
    tok.model_max_length = MAX_SEQUENCE_LENGTH
    return tok


def load_vae(source: Path = TINY_SD) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)


def build_text_encoder(vocab_size: int) -> T5EncoderModel:
    """Small T5 encoder (hidden 128, 3 layers, relative positions, so any padded length works)."""
    cfg = T5Config(vocab_size=vocab_size, d_model=TEXT_WIDTH, d_kv=32, d_ff=4 * TEXT_WIDTH, num_layers=3,
                   num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    return T5EncoderModel(cfg)


def build_transformer(layers: int = DIT_LAYERS, width: int = DIT_WIDTH) -> PixArtTransformer2DModel:
    """PixArt-alpha transformer over 16x16x4 latents, patch 2 (64 image tokens)."""
    return PixArtTransformer2DModel(
        num_attention_heads=width // HEAD_DIM, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
        num_layers=layers, cross_attention_dim=width, sample_size=16, patch_size=2,
        caption_channels=TEXT_WIDTH,
    )


def assemble(vae: AutoencoderKL, text_encoder: T5EncoderModel, tokenizer: PreTrainedTokenizerFast,
             transformer: PixArtTransformer2DModel) -> PixArtAlphaPipeline:
    """PixArtAlphaPipeline in eval mode, sampled with tiny-sd's 20-step DPM-Solver++."""
    for m in (vae, text_encoder, transformer):
        m.eval().requires_grad_(False)
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=sampling_scheduler())
