"""Metrics for quantized language models, on plain tensors and any callable model (no
transformers import): perplexity with a sliding window, embedding agreement for encoders,
greedy-token agreement and batch-1 decode throughput for causal LMs."""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor,
               context: int, stride: int) -> tuple[float, int]:
    """exp(mean NLL) of the token stream ids [N] with windows of `context` tokens moved by
    `stride` (capped at context - 1); each window scores only its tokens not scored before, all
    with >= context - stride tokens of history except in the first window. logits_of(ids [1, T]) -> [1, T, V].
    Returns (perplexity, tokens scored)."""
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError("perplexity needs a 1-D stream of at least 2 tokens")
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in [1, context], got {stride} (context {context})")
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    # each window must also hold the token before its first new target, so at most context - 1
    # new tokens per window
    step, nll, scored = min(stride, context - 1), 0.0, 1  # token 0 has no history: never scored
    while scored < ids.numel():
        end = min(ids.numel(), context if scored == 1 else scored + step)
        window = ids[max(0, end - context):end][None]
        logits = logits_of(window)[0, :-1].float()
        new = end - scored  # targets at positions scored..end-1: the last `new` of the window
        nll += float(F.cross_entropy(logits[-new:], window[0, -new:], reduction="sum"))
        scored = end
    count = ids.numel() - 1
    return math.exp(nll / count), count


def embedding_agreement(fp: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
    """Sentence embeddings fp, q [N, D] (N >= 2): mean / min cosine similarity per sentence and
    the fraction of sentences whose nearest other sentence (cosine) is the same in both."""
    cos = F.cosine_similarity(fp.float(), q.float(), dim=-1)

    def nearest(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e.float(), dim=-1)
        sim = e @ e.t()
        sim.fill_diagonal_(-math.inf)
        return sim.argmax(-1)

    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "nn_agreement": float((nearest(fp) == nearest(q)).float().mean())}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden [N, T, D] over the tokens where mask [N, T] is 1 -> [N, D]."""
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def token_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two generated token tensors of the same shape agree."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a == b).float().mean())


def decode_throughput(step: Callable[[], int], repeats: int = 3) -> float:
    """Tokens per second of `step()` (runs a decode, returns the tokens it generated): the
    best of `repeats` runs after one warm-up, the least disturbed by other work on the host."""
    step()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        n = step()
        best = min(best, (time.perf_counter() - t) / n)
    return 1.0 / best
