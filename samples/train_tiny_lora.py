"""Train a small LoRA adapter for the shipped tiny-sd pipeline: the concept "circles become squares".

Training pairs are the caption of a train-split scene that holds a circle (text unchanged, e.g.
"a large red circle ...") with the image of the same scene where every circle is drawn as a
square (same colour, size, position); a share of scenes without circles (--keep-share, 30 %)
is rendered as it is, so the adapter leaves the other shapes alone, and 10 % of captions are
dropped (with unmodified images) so the unconditional branch of classifier-free guidance stays
the base model's. The UNet (float32), VAE and text encoder are frozen; a PEFT LoRA (rank 4, alpha 4)
on the attention projections to_q / to_k / to_v / to_out.0 is trained with the plain DDPM epsilon
loss on the pipeline's training schedule, and saved in float16 with diffusers' save_lora_weights.

    python samples/train_tiny_lora.py                           # 6.4 min: 45 s data, 900 steps 5.7 min
    python samples/train_tiny_lora.py --smoke --out /tmp/lora   # a few steps, seconds

The shipped samples/tiny-sd-lora-squares (76 KiB) is that command's output, on the 2-core machine with
another job running (hence one thread: two were 30x slower per step then). On 32 held-out prompts
samples/lora_quality.py measured a concept rate of 0.94 with the adapter (0.00 without), the same
0.94 on the W8A8 UNet, and W8A8+LoRA vs FP+LoRA at a median 49.9 dB.

Load it with `pipe.load_lora_weights("samples/tiny-sd-lora-squares", adapter_name="squares")`;
samples/lora_quality.py measures it on the float and the W8A8 pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffq.assets import shipped
from diffq.eval.shapes import N_TEMPLATES, Scene, caption, render, sample_scenes, to_tensor

HERE = Path(__file__).resolve().parent


def as_squares(scene: Scene) -> Scene:
    """The scene with every circle replaced by a square of the same colour, size and position."""
    return dataclasses.replace(scene, objects=tuple(
        dataclasses.replace(o, shape="square") if o.shape == "circle" else o for o in scene.objects))


def has_circle(scene: Scene) -> bool:
    return any(o.shape == "circle" for o in scene.objects)


def training_scenes(n_circle: int, keep_share: float, seed: int) -> tuple[list[Scene], list[Scene]]:
    """(scenes whose captions are trained on, the scenes whose images are the targets):
    n_circle train scenes with a circle (target: as_squares) plus enough without one (target:
    the scene itself) to make up keep_share of the set."""
    n_keep = round(n_circle * keep_share / (1 - keep_share))
    with_c, without = [], []
    for s in sample_scenes("train", 4 * (n_circle + n_keep), seed=seed):
        (with_c if has_circle(s) else without).append(s)
    if len(with_c) < n_circle or len(without) < n_keep:
        raise SystemExit(f"not enough train scenes ({len(with_c)} with a circle, {len(without)} without)")
    captions = with_c[:n_circle] + without[:n_keep]
    return captions, [as_squares(s) for s in with_c[:n_circle]] + without[:n_keep]


@torch.no_grad()
def encode(vae, scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std [N, 4, 16, 16] of the rendered scenes."""
    means, stds = [], []
    for i in range(0, len(scenes), 256):
        x = to_tensor([render(s) for s in scenes[i:i + 256]]).float() / 127.5 - 1
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(shipped("tiny-sd")), help="the base pipeline folder")
    p.add_argument("--out", default=str(HERE / "tiny-sd-lora-squares"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-circle", type=int, default=3000, help="train scenes with a circle")
    p.add_argument("--keep-share", type=float, default=0.3, help="share of scenes without a circle")
    p.add_argument("--uncond-prob", type=float, default=0.1, help="caption dropout (unmodified images)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 2 was 30x slower than 1 while another job shared the 2 cores")
    p.add_argument("--smoke", action="store_true", help="a few tiny steps, for a quick check")
    args = p.parse_args()
    if args.smoke:
        args.n_circle, args.steps, args.batch = 32, 3, 4
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()

    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    for m in (vae, text_encoder, unet):
        m.eval().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    print(f"LoRA rank {args.rank}: {sum(p.numel() for p in params)} trainable parameters", flush=True)

    cap_scenes, img_scenes = training_scenes(args.n_circle, args.keep_share, args.seed)
    mean, std = encode(vae, img_scenes)
    plain_mean, plain_std = encode(vae, cap_scenes)  # unmodified images, for dropped captions
    scale = vae.config.scaling_factor
    print(f"{len(cap_scenes)} training scenes ({args.n_circle} with a circle) encoded in "
          f"{time.time() - t0:.0f}s", flush=True)

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    t_train = time.time()
    for step in range(args.steps):
        idx = torch.randint(len(cap_scenes), (args.batch,), generator=gen)
        drop = torch.from_numpy(rng.random(args.batch) < args.uncond_prob)
        m = torch.where(drop[:, None, None, None], plain_mean[idx], mean[idx])
        s = torch.where(drop[:, None, None, None], plain_std[idx], std[idx])
        z = (m + s * torch.randn(m.shape, generator=gen)) * scale
        texts = ["" if d else caption(cap_scenes[i], int(rng.integers(N_TEMPLATES)))
                 for i, d in zip(idx.tolist(), drop.tolist(), strict=True)]
        tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        with torch.no_grad():
            cond = text_encoder(tokens.input_ids)[0]
        t = torch.randint(sched.config.num_train_timesteps, (args.batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        loss = F.mse_loss(unet(sched.add_noise(z, noise, t), t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.5f} {time.time() - t_train:.0f}s", flush=True)

    lora = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(args.out, unet_lora_layers=lora,
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    for f in Path(args.out).iterdir():
        f.chmod(0o644)  # diffusers writes the file owner-only
    size = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file())
    print(f"done: training {time.time() - t_train:.0f}s, total {time.time() - t0:.0f}s; "
          f"{args.out}: {size / 1024:.1f} KiB", flush=True)


if __name__ == "__main__":
    main()
