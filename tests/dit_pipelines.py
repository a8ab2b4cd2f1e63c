"""Tiny random-weight pipelines of every diffusion-transformer class we support (SD3, Flux,
PixArt, Sana, Wan), built here (no download): the shipped word-level tokenizer, small text
encoders of each pipeline's own kind (CLIP, T5, Gemma2, UMT5), tiny VAEs.

`build(kind)` returns (pipeline, call kwargs that keep a sample small). Random weights have none of
a trained model's outliers; these test that every command and lifecycle step runs on each class.
"""
from __future__ import annotations

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from diffq.assets import shipped

KINDS = ("sd3", "flux", "pixart", "sana", "wan")
# what from_pretrained needs besides the folder (the tiny SD3 runs without its optional T5)
LOAD_KWARGS = {"sd3": {"text_encoder_3": None, "tokenizer_3": None}}


def tokenizer(max_length: int = 32) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast.from_pretrained(shipped("tiny-sd"), subfolder="tokenizer")
    tok.model_max_length = max_length
    return tok


def _clip(cls, vocab: int, width: int = 16):
    return cls(CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                              pad_token_id=0, bos_token_id=2, eos_token_id=3, projection_dim=width))


def _t5(vocab: int, width: int = 32, cls=T5EncoderModel, config=T5Config):
    return cls(config(vocab_size=vocab, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                      num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=3,
                      decoder_start_token_id=0))


def _vae(shift: float | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4,
                         scaling_factor=1.5, shift_factor=shift)


def _sd3(vocab: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=8)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(0.1),
        text_encoder=_clip(CLIPTextModelWithProjection, vocab), tokenizer=tokenizer(),
        text_encoder_2=_clip(CLIPTextModelWithProjection, vocab), tokenizer_2=tokenizer(),
        text_encoder_3=None, tokenizer_3=None), {"max_sequence_length": 16}


def _flux(vocab: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=_vae(0.1),
        text_encoder=_clip(CLIPTextModel, vocab), tokenizer=tokenizer(),
        text_encoder_2=_t5(vocab), tokenizer_2=tokenizer(512),
        transformer=transformer), {"height": 32, "width": 32, "max_sequence_length": 16}


def _pixart(vocab: int):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=32)
    return PixArtAlphaPipeline(tokenizer=tokenizer(120), text_encoder=_t5(vocab), vae=_vae(),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler()), {}


def _sana(vocab: int):
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
        attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8,
        cross_attention_dim=16, caption_channels=32, sample_size=8)
    blocks = ("ResBlock", "EfficientViTBlock")
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407)
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=16, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    pipe = SanaPipeline(tokenizer=tokenizer(300), text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return pipe, {"height": 32, "width": 32, "max_sequence_length": 16, "complex_human_instruction": None}


def _wan(vocab: int):
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text_encoder = _t5(vocab, cls=UMT5EncoderModel, config=UMT5Config)
    pipe = WanPipeline(tokenizer=tokenizer(512), text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return pipe, {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 16}


def build(kind: str, seed: int = 0):
    """(pipeline in eval mode with its progress bar off, small call kwargs) of one DiT class."""
    torch.manual_seed(seed)
    pipe, kwargs = {"sd3": _sd3, "flux": _flux, "pixart": _pixart, "sana": _sana, "wan": _wan}[kind](
        len(tokenizer()))
    for c in pipe.components.values():
        if isinstance(c, torch.nn.Module):
            c.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs
