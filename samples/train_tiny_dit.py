"""Train the tiny DiT reference pipeline (PixArt-alpha-style) on the shapes world.

The shipped tiny-sd VAE stays fixed (its latents are cached once); the PixArt transformer and a
small T5 text encoder are trained jointly from scratch, epsilon loss with min-SNR-5 weights and
10% caption dropout for classifier-free guidance, on tiny-sd's noise schedule.

    python samples/train_tiny_dit.py --out samples/tiny-dit      # what ships: ~65 min, 2 idle CPU cores
    python samples/train_tiny_dit.py --smoke --out /tmp/tiny-dit  # seconds
"""

from __future__ import annotations

import argparse
import time

import torch
from tiny_dit_parts import (
    DIT_LAYERS,
    DIT_WIDTH,
    HEAD_DIM,
    TINY_SD,
    assemble,
    build_text_encoder,
    build_transformer,
    load_tokenizer,
    load_vae,
)
from tiny_sd_parts import MAX_LENGTH, save_fp16
from train_tiny_sd import encode_latents, seeded_start, train_jointly

NO_EXTRA_CONDITIONS = {"resolution": None, "aspect_ratio": None}


def train(latents: tuple[torch.Tensor, torch.Tensor], scenes: list, scale: float, tokenizer,
          args: argparse.Namespace, gen: torch.Generator):
    """Jointly train transformer and text encoder; return their EMA copies.

    Captions are padded to tiny-sd's 32 tokens here and to 120 in the pipeline: T5's relative
    positions and the masked cross-attention make the two give the same result.
    """
    dit = build_transformer(args.layers, args.width).train()
    text_encoder = build_text_encoder(len(tokenizer)).train()

    def predict(noisy, t, tokens):
        context = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        return dit(noisy, encoder_hidden_states=context, encoder_attention_mask=tokens.attention_mask,
                   timestep=t, added_cond_kwargs=NO_EXTRA_CONDITIONS).sample

    return train_jointly(dit, text_encoder, predict, latents, scenes, scale, tokenizer, MAX_LENGTH, args,
                         gen, "dit")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--vae-from", default=str(TINY_SD),
                   help="pipeline folder whose vae/ and tokenizer/ are used")
    p.add_argument("--steps", type=int, default=7000)
    p.add_argument("--layers", type=int, default=DIT_LAYERS)
    p.add_argument("--width", type=int, default=DIT_WIDTH,
                   help=f"transformer width, a multiple of {HEAD_DIM}")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a few tiny steps, for tests")
    args = p.parse_args()
    if args.smoke:
        args.n_train, args.steps, args.batch, args.warmup, args.layers = 16, 2, 4, 1, 2
    if args.width % HEAD_DIM or min(args.layers, args.threads) < 1:
        p.error(f"--width must be a multiple of {HEAD_DIM}; --layers and --threads at least 1")
    return args


def main() -> None:
    args = parse_args()
    gen, t0, (images, _, scenes) = seeded_start(args)
    tokenizer, vae = load_tokenizer(args.vae_from), load_vae(args.vae_from)
    scale = vae.config.scaling_factor
    latents = encode_latents(vae, images)  # also re-derives the scaling factor: keep the shipped one
    vae.register_to_config(scaling_factor=scale)
    t_data = time.time() - t0
    dit, text_encoder = train(latents, scenes, scale, tokenizer, args, gen)
    save_fp16(assemble(vae, text_encoder, tokenizer, dit), args.out)
    print(f"done: data {t_data:.0f}s, total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
