"""The models `diffq bench` times: one registry of named workloads, each a float model, the
calls that calibrate it and the call that is timed.

Random weights everywhere but the shipped pipelines: speed does not depend on the weights,
and quality is measured elsewhere (`diffq compare`, `diffq eval`). Sizes follow published
configs where the row names a real model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from diffq.assets import shipped
from diffq.errors import InputError
from diffq.io import read_prompts

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # Stable Diffusion 1.5's published unet/config.json (860 M parameters)

SD3_BLOCKS = 6  # of SD3-medium's 24: every block has the same shapes, so the ratio holds
SD3_MEDIUM = dict(
    sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=SD3_BLOCKS,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192,
)  # SD3-medium's published transformer/config.json, fewer blocks
SD3_TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens, as the SD3 pipeline sends them

BERT_MINI = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, vocab_size=8192, max_position_embeddings=128)
LLAMA_2048 = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=16, vocab_size=4096,
                  max_position_embeddings=512, tie_word_embeddings=True)


@dataclass
class Built:
    """A workload ready to time: `run(m, dtype)` returns the timed call of variant `m` whose
    float ops are in `dtype`; one call does `units` units of work (steps, tokens)."""

    model: nn.Module  # fp32, eval
    calibration: list
    run: Callable[[nn.Module, torch.dtype], Callable[[], object]]
    units: int = 1


@dataclass(frozen=True)
class Workload:
    label: str
    unit: str  # what one unit of work is, for the table
    schemes: tuple[str, ...]  # default recipes
    build: Callable[[int], Built]  # batch -> Built


def _seeded(n: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(n)


def cast_call(call, dtype: torch.dtype):
    """A call with its activation tensors (2-d and up) in `dtype`, images channels-last;
    timesteps and ids as they were."""
    def one(v):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() < 2:
            return v
        v = v.to(dtype)
        return v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
    args, kwargs = call
    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def _step_built(model: nn.Module, calls: list) -> Built:
    """A denoiser: calibrated on `calls`, timed on the middle one."""
    call = calls[len(calls) // 2]

    def run(m, dtype):
        a, kw = cast_call(call, dtype)
        return lambda: m(*a, **kw)
    return Built(model.float().eval(), calls, run)


def _synthetic_calls(shape: tuple, context: dict[str, tuple], steps: list[float]) -> list:
    """(latents, t) calls with seeded random latents and fixed random context tensors."""
    g = _seeded()
    ctx = {k: torch.randn(s, generator=g) for k, s in context.items()}
    return [((torch.randn(shape, generator=g), torch.full((shape[0],), t)), dict(ctx)) for t in steps]


def _sd15(batch: int) -> Built:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    calls = _synthetic_calls((batch, 4, 64, 64), {"encoder_hidden_states": (batch, 77, 768)},
                             torch.linspace(999, 1, 4).round().tolist())
    return _step_built(UNet2DConditionModel(**SD15_UNET), calls)


def _sd3(batch: int) -> Built:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    calls = _synthetic_calls((batch, 16, 64, 64),
                             {"encoder_hidden_states": (batch, SD3_TEXT_TOKENS, 4096),
                              "pooled_projections": (batch, 2048)},
                             torch.linspace(1000, 50, 4).tolist())  # sigma x 1000
    model = SD3Transformer2DModel(**SD3_MEDIUM)
    return _step_built(model, [((a[0],), {**kw, "timestep": a[1]}) for a, kw in calls])


def pipeline_built(path: Path, batch: int) -> Built:
    """A pipeline folder's denoiser (UNet or DiT) on 4 calls replayed from sampling
    ceil(batch / 2) eval prompts with guidance."""
    from diffq.integrations.pipeline import DENOISERS, denoiser, denoiser_calls, load_pipeline

    if not any((path / d / "config.json").is_file() for d in DENOISERS):
        raise InputError(f"{path} has no unet/ or transformer/ to benchmark")
    pipe = load_pipeline(path, progress=False)
    prompts = read_prompts(shipped("prompts") / "shapes-eval.txt")[: (batch + 1) // 2]
    calls = denoiser_calls(pipe, prompts, steps=20, guidance=5.0, seed=0, timesteps=4)
    return _step_built(denoiser(pipe), calls)


def _bert(batch: int) -> Built:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(**BERT_MINI), add_pooling_layer=False)
    g = _seeded()
    items = [{"input_ids": torch.randint(BERT_MINI["vocab_size"], (batch, 64), generator=g)}
             for _ in range(3)]
    for it in items:
        it["attention_mask"] = torch.ones_like(it["input_ids"])
    timed = items[-1]
    return Built(model.eval(), items[:-1], lambda m, dtype: lambda: m(**timed))


DECODE_TOKENS = 32


def _llm_decode(batch: int) -> Built:
    from transformers import LlamaConfig, LlamaForCausalLM

    from diffq.integrations.llm import greedy

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_2048))
    g = _seeded()
    items = [{"input_ids": torch.randint(LLAMA_2048["vocab_size"], (2, 64), generator=g)} for _ in range(2)]
    prompt = torch.randint(LLAMA_2048["vocab_size"], (batch, 16), generator=g)
    tok = SimpleNamespace(pad_token_id=0)
    return Built(model.eval(), items,
                 lambda m, dtype: lambda: greedy(m, prompt, DECODE_TOKENS, tok), units=DECODE_TOKENS)


WORKLOADS: dict[str, Workload] = {
    "tiny-sd": Workload("tiny-sd UNet step (shipped, batch 2, 32x32 latents)", "step", ("w8a8",),
                        lambda b: pipeline_built(shipped("tiny-sd"), b)),
    "sd15": Workload("SD1.5-architecture UNet step (random weights, 64x64 latents)", "step",
                     ("w8a8",), _sd15),
    "sd3": Workload(f"SD3-medium-like DiT step ({SD3_BLOCKS} of 24 blocks, 64x64 latents, "
                    f"{SD3_TEXT_TOKENS} text tokens)", "step", ("w8a8",), _sd3),
    "bert": Workload("BERT-like encoder (6 x 384, 64 tokens)", "batch",
                     ("llm-w8a8-smoothquant",), _bert),
    "llm-decode": Workload("Llama-architecture decode (hidden 2048, 4 layers, 16-token prompt)",
                           "token", ("llm-w8a8-smoothquant", "llm-w4a16-gptq"), _llm_decode),
}
DEFAULT_BATCH = {"bert": 32, "llm-decode": 1}  # others: the --batch option (2: guidance)
