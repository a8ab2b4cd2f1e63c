"""Tiny randomly initialized transformers models and a byte-level tokenizer for the LLM tests."""
from __future__ import annotations

from pathlib import Path

import torch

TEXT = ("The quick brown fox jumps over the lazy dog. Return the number of items in a container. "
        "Open the file and return a stream; raise OSError upon failure. ") * 40


def llama(layers: int = 2, seed: int = 0, vocab: int = 300):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=0, bos_token_id=0, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()


def clip_text(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=77)).eval()


def t5_encoder(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                   num_heads=4)).eval()


def byte_tokenizer(pad: bool = False):
    """A byte-level BPE tokenizer (vocab <= 300) with an eos token and, if `pad`, a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<eos>", "<pad>"] if pad else ["<eos>"]
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>",
                                   pad_token="<pad>" if pad else None)


def save_model_dir(model, path: Path, pad: bool = False) -> Path:
    model.save_pretrained(path)
    byte_tokenizer(pad).save_pretrained(path)
    return path


def batches(n: int = 4, length: int = 32, seed: int = 0, vocab: int = 300) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (2, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out
