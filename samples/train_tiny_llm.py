"""Train the reference causal LM `samples/tiny-llm`: a LlamaForCausalLM (hidden 256, 4 layers,
4 heads, byte-level BPE of 4096 tokens) on the docstrings of the Python standard library, a corpus
every machine has offline. Modules whose name hashes to 0 mod 10 form the held-out split.

    python samples/train_tiny_llm.py --out samples/tiny-llm --max-minutes 70   # ~60 min, 1 thread
    python samples/train_tiny_llm.py --smoke --out /tmp/tiny-llm               # a few seconds

Writes <out>/: config.json, model.safetensors (fp16), tokenizer files, corpus-heldout.txt,
corpus-calib.txt (a slice of the train split, for `diffq calibrate --dataset`) and train.json.
The corpus depends on the Python version (its docstrings); train.json records it.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import sys
import time
import warnings
import zlib
from pathlib import Path

import torch

# importing these has side effects (a browser, printing, GUI) or drags in a display
_SKIP = {"antigravity", "this", "__hello__", "__phello__", "idlelib", "tkinter", "turtle",
         "turtledemo", "pydoc_data", "lib2to3", "ensurepip", "venv", "xxsubtype", "msvcrt",
         "winreg", "winsound", "_msi", "msilib", "nturl2path", "sre_compile", "sre_parse",
         "sre_constants", "asyncio.__main__"}


def _members(mod) -> list:
    out = []
    for name in sorted(vars(mod)):
        obj = vars(mod)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj):
            out.append(obj)
            out += [m for n, m in sorted(vars(obj).items()) if not n.startswith("_") and callable(m)]
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            out.append(obj)
    return out


def stdlib_docstrings(limit: int | None = None) -> dict[str, list[str]]:
    """Module name -> its deduplicated docstrings (module, then public classes, their methods and
    functions, by name), over `sys.stdlib_module_names` in sorted order."""
    seen: set[str] = set()
    corpus: dict[str, list[str]] = {}
    names = sorted(n for n in sys.stdlib_module_names if n not in _SKIP and not n.startswith("_"))
    for name in names[:limit]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # platform-specific modules
            continue
        docs = []
        for obj in [mod, *_members(mod)]:
            try:
                doc = inspect.getdoc(obj)
            except Exception:
                doc = None
            if doc and len(doc) > 40 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
        if docs:
            corpus[name] = docs
    return corpus


def split(corpus: dict[str, list[str]]) -> tuple[str, str]:
    """(train, held-out) text: a module is held out when crc32(name) % 10 == 0."""
    train, held = [], []
    for name, docs in corpus.items():
        (held if zlib.crc32(name.encode()) % 10 == 0 else train).extend(docs)
    return "\n\n".join(train) + "\n", "\n\n".join(held) + "\n"


def train_tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<eos>")


def encode(tok, text: str) -> torch.Tensor:
    """Documents separated by <eos>, as one stream."""
    ids = []
    for doc in text.split("\n\n"):
        ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def build_model(vocab: int, hidden: int, layers: int, heads: int, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max(seq, 512), tie_word_embeddings=True,
                      eos_token_id=0, bos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def heldout_perplexity(model, ids: torch.Tensor, seq: int, max_tokens: int) -> float:
    from diffq.eval.llm import perplexity

    model.eval()
    ppl, _ = perplexity(lambda x: model(input_ids=x, use_cache=False).logits, ids[:max_tokens],
                        seq, seq // 2)
    model.train()
    return ppl


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("samples/tiny-llm"))
    p.add_argument("--smoke", action="store_true", help="tiny corpus / model / run: seconds")
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop training after this")
    p.add_argument("--steps", type=int, default=1400,
                   help="cosine schedule length (~60 min at 2.5 s/step, 1 thread)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    corpus = stdlib_docstrings(limit=25 if args.smoke else None)
    train_text, held_text = split(corpus)
    vocab, hidden, layers, heads = (320, 64, 4, 4) if args.smoke else (4096, 256, 4, 4)
    steps = min(args.steps, 5) if args.smoke else args.steps
    tok = train_tokenizer(train_text, vocab)
    train_ids, held_ids = encode(tok, train_text), encode(tok, held_text)
    print(f"corpus: {len(corpus)} modules, train {len(train_ids)} tokens, held-out {len(held_ids)} "
          f"tokens ({time.time() - t0:.1f} s)")
    model = build_model(len(tok), hidden, layers, heads, args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    warmup, t_train, done = min(200, max(steps // 10, 1)), time.time(), 0
    for step in range(steps):
        # cosine schedule over the step budget; a time limit simply stops early
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(len(train_ids) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s:s + args.seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} "
                  f"{(time.time() - t_train) / done:.3f} s/step", flush=True)
        if time.time() - t_train > args.max_minutes * 60:
            break
    step_s = (time.time() - t_train) / done
    ppl = heldout_perplexity(model, held_ids, args.seq, 4096 if args.smoke else 65536)
    print(f"trained {done} steps ({step_s:.3f} s/step); held-out perplexity {ppl:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.out)
    tok.save_pretrained(args.out)
    (args.out / "corpus-heldout.txt").write_text(held_text, encoding="utf-8")
    (args.out / "corpus-calib.txt").write_text(train_text[: 200_000], encoding="utf-8")
    (args.out / "train.json").write_text(json.dumps({
        "python": sys.version.split()[0], "torch": torch.__version__, "seed": args.seed,
        "steps": done, "batch": args.batch, "seq": args.seq, "seconds_per_step": round(step_s, 4),
        "heldout_perplexity": round(ppl, 3), "modules": len(corpus),
        "train_tokens": len(train_ids), "heldout_tokens": len(held_ids)}, indent=1))


if __name__ == "__main__":
    main()
