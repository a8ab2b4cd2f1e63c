"""Batch-1 greedy decode tokens/s of a Llama-architecture causal LM at a width where decode is
bound by weight reads: fp32, bf16 and diffq weight-only int4 (g128) / int8, one run each.

The weights are random (speed does not depend on them; quality is measured on samples/tiny-llm
with `diffq eval`). The reference LLM itself is 256 wide, where per-call overhead, not weight
bytes, sets the decode speed.

    python samples/bench_llm_decode.py [--hidden 2048] [--layers 4] [--tokens 32] [--threads 1]
"""
import argparse
import copy
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from diffq import quantize
from diffq.commands.llm import decode_speeds
from diffq.core.recipe import Recipe, WeightSpec


def build(hidden: int, layers: int, vocab: int) -> LlamaForCausalLM:
    """A random-weight (seed 0) Llama: 128-wide heads, MLP 2.75x wide, tied embeddings."""
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 128,
                      num_key_value_heads=hidden // 128, vocab_size=vocab,
                      max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fp = build(a.hidden, a.layers, a.vocab)
    prompt = torch.randint(a.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    tok = SimpleNamespace(pad_token_id=0)
    specs = {"int4 g128": WeightSpec("int4", "per_group", group_size=128),
             "int8": WeightSpec("int8", "per_channel")}
    print(f"Llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; batch 1, "
          f"{a.tokens} tokens, {a.threads} thread(s)")
    for name, spec in specs.items():
        q = quantize(copy.deepcopy(fp), Recipe(name=name, weights=spec, skip=["*lm_head"]))
        s = decode_speeds(fp, q, prompt, a.tokens, tok)
        print(f"{name}: tok/s fp32 {s['fp32']:.1f}, bf16 {s['bf16']:.1f}, "
              f"quantized {s['quantized_bf16']:.1f} -> {s['quantized_bf16'] / s['bf16']:.2f}x bf16")


if __name__ == "__main__":
    main()
