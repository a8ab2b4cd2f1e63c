"""The shared LLM path's model glue: loading transformers models built from nn.Linear (causal
LMs such as Llama / GPT-2, encoders such as CLIP / T5 / BERT), their tokenizers and quantized
outputs, calibration windows, greedy decoding. A model directory is a transformers one when its
config.json names `architectures` and it has no diffusers model_index.json. The commands that
use it are `diffq.commands.llm`."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from diffq.checkpoint import load, read_meta
from diffq.errors import CheckpointError, InputError
from diffq.eval import llm as metrics
from diffq.integrations.adapters import register
from diffq.nn.convert import linearize_conv1d
from diffq.nn.state import diffq_state

MODEL_DIR = "model"  # the diffq checkpoint inside a quantized output directory
SOURCE_FILE = "llm.json"  # which float model it was made from


def is_transformers_dir(path: Path) -> bool:
    """config.json with `architectures` and no diffusers model_index.json."""
    path = Path(path)
    if not (path / "config.json").is_file() or (path / "model_index.json").exists():
        return False
    try:
        return bool(json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def is_causal(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def load_model(path: Path) -> nn.Module:
    """The float model of a transformers directory, by its config's first architecture."""
    import transformers

    if not is_transformers_dir(path):
        raise InputError(f"{path} is not a transformers model directory (config.json with architectures)")
    arch = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise InputError(f"{path}: architecture {arch!r} is not in this transformers version")
    from diffq.integrations.pipeline import library_progress_bars

    with library_progress_bars(False), register():  # the CLI prints one line per run
        return cls.from_pretrained(path, dtype=torch.float32).eval()


def load_tokenizer(path: Path):
    """The directory's tokenizer with a pad token (the eos token when it has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    return ensure_pad_token(tok)


def ensure_pad_token(tok):
    """Padding needs a pad token; tokenizers of causal LMs often have none, so reuse eos."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise InputError("the tokenizer has neither a pad nor an eos token; cannot pad batches")
        tok.pad_token = tok.eos_token
    return tok


def token_stream(tok, text: str) -> torch.Tensor:
    """The whole text as one 1-D token id stream (no special tokens)."""
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def windows(ids: torch.Tensor, count: int, length: int, what: str = "dataset") -> torch.Tensor:
    """`count` windows [count, length] spread evenly over the stream ids [N]."""
    if ids.numel() < count * length:
        raise InputError(f"{what} has {ids.numel()} tokens, fewer than {count} samples x {length} "
                         f"tokens; use a longer text file or fewer samples / a shorter length")
    step = (ids.numel() - length) // max(count - 1, 1)
    return torch.stack([ids[i * step:i * step + length] for i in range(count)])


def calibration_items(ids: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Model call items {input_ids, attention_mask} of up to batch_size windows each."""
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(batch_size)]


def max_length(model: nn.Module, wanted: int) -> int:
    """`wanted`, capped at the model's position limit (e.g. 77 for CLIP's text encoder)."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(wanted, limit) if limit else wanted


def load_quantized(quantized: Path, model_dir: Path | None = None, verify_hashes: bool = True
                   ) -> tuple[nn.Module, Path]:
    """(quantized model, float model dir) from a `diffq calibrate` output directory."""
    quantized = Path(quantized)
    src = quantized / SOURCE_FILE
    if model_dir is None:
        if not src.is_file():
            raise CheckpointError(f"{quantized} is not an LLM output of diffq calibrate (no {SOURCE_FILE})")
        model_dir = Path(json.loads(src.read_text(encoding="utf-8"))["model"])
    read_meta(quantized / MODEL_DIR)
    model = load_model(model_dir)
    linearize_conv1d(model)
    return load(quantized / MODEL_DIR, model, verify_hashes=verify_hashes).eval(), model_dir


def kv_cache_for(model: nn.Module):
    """A fresh int8 KV cache when the model's recipe asks for one, else None (float cache)."""
    recipe = diffq_state(model).recipe
    if recipe is None or recipe.kv_cache is None:
        return None
    from diffq.integrations.kvcache import Int8KVCache

    return Int8KVCache(recipe.kv_cache)


@torch.no_grad()
def greedy(model: nn.Module, prompt: torch.Tensor, tokens: int, tok) -> torch.Tensor:
    """Exactly `tokens` greedy tokens after prompt [1, T] (with the model's KV cache format)."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                         min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                         cache=kv_cache_for(model))
    return out[:, prompt.shape[1]:]


def logits_fn(model: nn.Module):
    return lambda ids: model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batch: dict) -> torch.Tensor:
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return metrics.mean_pool(hidden, batch["attention_mask"])
