"""Train the TinyClip evaluator contrastively on the train split of the shapes world.

    python samples/train_tiny_clip.py --out samples/tiny-clip          # ~2 min on 2 CPU cores
    python samples/train_tiny_clip.py --smoke --out /tmp/tiny-clip     # a few seconds
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from diffq.eval.evaluator import TinyClip, TinyClipConfig, WordTokenizer
from diffq.eval.metrics import caption_retrieval_top1
from diffq.eval.shapes import make_dataset


def contrastive_loss(model: TinyClip, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (image, caption) pairs."""
    logits = model.logit_scale.exp().clamp(max=100) * model.encode_image(images) @ (
        model.encode_text(texts).T
    )
    target = torch.arange(len(texts))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(args: argparse.Namespace) -> TinyClip:
    """Train on freshly rendered train-split scenes and return the model in eval mode."""
    torch.manual_seed(args.seed)
    images, captions, _ = make_dataset("train", args.n_train, seed=args.seed)
    tok = WordTokenizer.build(captions, TinyClipConfig.max_words)
    model = TinyClip(TinyClipConfig(vocab_size=len(tok.vocab)), tok.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(len(captions), (args.batch,), generator=gen)
        batch = images[idx].float() / 255
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = contrastive_loss(model, batch, [captions[i] for i in idx.tolist()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--n-train", type=int, default=12000)
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads; 1 is faster when other jobs share the cores")
    p.add_argument("--smoke", action="store_true", help="a few tiny steps, for tests")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.batch, args.n_train, args.warmup = 3, 8, 64, 1
    torch.set_num_threads(args.threads)
    model = train(args)
    model.save_pretrained(args.out)
    n_eval = 16 if args.smoke else 256
    images, captions, _ = make_dataset("eval", n_eval, seed=1234, unique=True)
    top1 = caption_retrieval_top1(
        TinyClip.from_pretrained(args.out), images.float() / 255, captions
    )
    print(f"zero-shot caption retrieval top-1 on {n_eval} eval images: {top1:.4f}")


if __name__ == "__main__":
    main()
