"""The shared LLM path: `diffq calibrate` / `diffq eval` for transformers models built from
nn.Linear (causal LMs such as Llama / GPT-2, encoders such as CLIP / T5 / BERT). A model
directory is a transformers one when its config.json names `architectures` and it has no
diffusers model_index.json. Quantized output: `<out>/model/` (diffq checkpoint), report.md/json."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from diffq.api import quantize, weight_bytes
from diffq.checkpoint import load, read_meta, save
from diffq.core.recipe import load_recipe
from diffq.errors import CheckpointError, InputError
from diffq.eval import llm as metrics
from diffq.io import check_at_least, check_output, read_text, writing_directory
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

    with library_progress_bars(False):  # the CLI prints one line per run
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


@dataclass
class LLMCalibrateSettings:
    model: Path
    dataset: Path
    recipe: str = "llm-w4a16-gptq"
    num_samples: int = 32
    seq_len: int = 128
    batch_size: int = 8
    out: Path | None = None
    overwrite: bool = False
    low_memory: bool = False  # load one block's float weights at a time (diffq.integrations.lowmem)


def _load_for_calibration(s: LLMCalibrateSettings):
    """(model, load_block or None): the whole float model, or with --low-memory only its
    non-block weights and a loader for each block."""
    if not s.low_memory:
        model = load_model(s.model)
        linearize_conv1d(model)
        return model, None
    from diffq.integrations.lowmem import load_skeleton
    from diffq.sequential import find_blocks

    if not is_transformers_dir(s.model):
        raise InputError(f"{s.model} is not a transformers model directory (config.json with architectures)")
    model, lazy = load_skeleton(s.model, lambda m: find_blocks(m)[0])
    return model, lazy.load_block


def run_llm_calibrate(s: LLMCalibrateSettings, progress: bool = False) -> dict:
    """Quantize a transformers model on windows of a text file; write the checkpoint and report."""
    check_at_least("--num-samples", s.num_samples)
    check_at_least("--seq-len", s.seq_len, 2)
    check_at_least("--batch-size", s.batch_size)
    recipe = load_recipe(s.recipe)
    out = s.out or Path("out") / f"{Path(s.model).name}-{recipe.name}"
    check_output(out, s.overwrite, (s.model, s.dataset))
    model, load_block = _load_for_calibration(s)
    tok = load_tokenizer(s.model)
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise InputError(f"{s.model}: the model has no Linear layers to quantize")
    length = max_length(model, s.seq_len)
    text = read_text(s.dataset, "dataset file")
    ids = windows(token_stream(tok, text), s.num_samples, length, f"dataset {s.dataset}")
    fp_bytes = weight_bytes(model)
    t = time.perf_counter()
    quantize(model, recipe, calibration=calibration_items(ids, s.batch_size), progress=progress,
             load_block=load_block)
    seconds = time.perf_counter() - t
    rep = diffq_state(model).report
    if not rep.quantized:
        raise InputError(f"recipe {recipe.name!r} quantized no layer of {s.model} "
                         f"({len(rep.skipped)} kept float); check its skip / override patterns")
    report = {"recipe": recipe.name, "model": str(s.model), "dataset": str(s.dataset),
              "samples": s.num_samples, "seq_len": length, "seconds": round(seconds, 2),
              "sequential": rep.sequential,
              "kv_cache": None if recipe.kv_cache is None else asdict(recipe.kv_cache),
              "weight_bytes": weight_bytes(model), "weight_bytes_fp": fp_bytes,
              "layers": rep.quantized, "skipped": rep.skipped,
              "unmatched_patterns": rep.unmatched_patterns}
    with writing_directory(out, s.overwrite) as tmp:
        save(model, tmp / MODEL_DIR)
        (tmp / SOURCE_FILE).write_text(json.dumps({"model": str(Path(s.model).resolve()),
                                                   "architecture": type(model).__name__}, indent=1))
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        (tmp / "report.md").write_text(_calibrate_md(report))
    report["out"] = str(out)
    return report


def _calibrate_md(r: dict) -> str:
    lines = [f"# {r['recipe']} on {r['model']}", "",
             f"- calibration: {r['samples']} windows of {r['seq_len']} tokens from {r['dataset']}",
             f"- layer-by-layer calibration: {'yes' if r['sequential'] else 'no'}",
             f"- int8 KV cache: {'yes' if r['kv_cache'] else 'no'}",
             f"- weight bytes: {r['weight_bytes']:,} ({r['weight_bytes'] / r['weight_bytes_fp']:.3f}x bf16)",
             f"- time: {r['seconds']} s", "", "| layer | scheme |", "|---|---|"]
    lines += [f"| {n} | {v} |" for n, v in r["layers"].items()]
    lines += ["", "Kept float:"] + [f"- {n}: {why}" for n, why in r["skipped"].items()]
    if r["unmatched_patterns"]:
        lines += ["", "Recipe patterns that matched no layer of this model:"]
        lines += [f"- `{p}`" for p in r["unmatched_patterns"]]
    return "\n".join(lines) + "\n"


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


@dataclass
class LLMEvalSettings:
    quantized: Path
    dataset: Path
    model: Path | None = None  # default: the model the quantized directory was made from
    seq_len: int = 128  # perplexity context
    stride: int = 64
    max_tokens: int = 16384  # of the dataset, for perplexity
    num_samples: int = 64  # encoders: sentences (non-blank lines)
    decode_tokens: int = 32
    prompts: int = 4  # causal LMs: greedy generations compared with FP
    out: Path | None = None
    overwrite: bool = False
    no_verify: bool = False


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


def _logits(model: nn.Module):
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def eval_causal(fp: nn.Module, q: nn.Module, tok, text: str, s: LLMEvalSettings) -> dict:
    ids = token_stream(tok, text)[: s.max_tokens]
    context = max_length(fp, s.seq_len)
    ppl_fp, n = metrics.perplexity(_logits(fp), ids, context, min(s.stride, context))
    ppl_q, _ = metrics.perplexity(_logits(q), ids, context, min(s.stride, context))
    prompts = windows(ids, s.prompts, min(32, context // 2), "dataset")
    fp_tokens = torch.cat([greedy(fp, p[None], s.decode_tokens, tok) for p in prompts])
    q_tokens = torch.cat([greedy(q, p[None], s.decode_tokens, tok) for p in prompts])
    r = {"perplexity_fp": ppl_fp, "perplexity": ppl_q, "tokens_scored": n, "context": context,
         "stride": min(s.stride, context),
         "greedy_agreement": metrics.token_agreement(fp_tokens, q_tokens)}
    r["throughput_tokens_per_s"] = decode_speeds(fp, q, prompts[0][None], s.decode_tokens, tok)
    return r


def decode_speeds(fp: nn.Module, q: nn.Module, prompt: torch.Tensor, tokens: int, tok) -> dict:
    """Batch-1 greedy decode tokens/s: FP32, bf16 and the quantized model with bf16 activations
    (where the weight-only int8 / int4 decode kernels apply)."""
    def speed(m: nn.Module) -> float:
        return metrics.decode_throughput(lambda: greedy(m, prompt, tokens, tok).shape[1])

    out = {"fp32": speed(fp)}
    fp.to(torch.bfloat16)
    q.to(torch.bfloat16)
    try:
        out["bf16"], out["quantized_bf16"] = speed(fp), speed(q)
    finally:
        fp.float()
        q.float()
    return out


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batch: dict) -> torch.Tensor:
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return metrics.mean_pool(hidden, batch["attention_mask"])


def eval_encoder(fp: nn.Module, q: nn.Module, tok, text: str, s: LLMEvalSettings) -> dict:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) < max(s.num_samples, 2):
        raise InputError(f"dataset {s.dataset} has {len(lines)} non-blank lines, fewer than the "
                         f"{max(s.num_samples, 2)} sentences asked for")
    batch = tok(lines[: s.num_samples], padding=True, truncation=True,
                max_length=max_length(fp, s.seq_len), return_tensors="pt")
    return metrics.embedding_agreement(sentence_embeddings(fp, batch), sentence_embeddings(q, batch))


def run_llm_eval(s: LLMEvalSettings) -> dict:
    """Quantized vs FP: perplexity, greedy agreement and decode speed (causal LMs) or embedding
    agreement (encoders). Writes eval.json / eval.md to `out` when given."""
    check_at_least("--seq-len", s.seq_len, 2)
    check_at_least("--stride", s.stride)
    check_at_least("--num-samples", s.num_samples)
    if s.out is not None:
        check_output(s.out, s.overwrite, (s.model, s.quantized, s.dataset))
    text = read_text(s.dataset, "dataset file")
    q, model_dir = load_quantized(s.quantized, s.model, verify_hashes=not s.no_verify)
    fp = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    report = {"model": str(model_dir), "quantized": str(s.quantized), "dataset": str(s.dataset),
              "recipe": getattr(diffq_state(q).recipe, "name", None),
              "kind": "causal" if is_causal(fp) else "encoder",
              "weight_bytes": weight_bytes(q), "weight_bytes_fp": weight_bytes(fp)}
    report["metrics"] = (eval_causal if is_causal(fp) else eval_encoder)(fp, q, tok, text, s)
    if s.out is not None:
        with writing_directory(s.out, s.overwrite) as tmp:
            (tmp / "eval.json").write_text(json.dumps(report, indent=1))
            (tmp / "eval.md").write_text(_eval_md(report))
    return report


def _eval_md(r: dict) -> str:
    lines = [f"# {r['recipe']}: {r['quantized']} vs {r['model']}", "", f"dataset: {r['dataset']}",
             f"weight bytes: {r['weight_bytes']:,} vs {r['weight_bytes_fp']:,} (bf16)", "",
             "| metric | value |", "|---|---|"]
    for k, v in r["metrics"].items():
        if isinstance(v, dict):
            lines += [f"| {k} {kk} | {vv:.4g} |" for kk, vv in v.items()]
        else:
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines) + "\n"


def summary_line(r: dict) -> str:
    """One line for the CLI."""
    m = r["metrics"]
    if r["kind"] == "causal":
        t = m["throughput_tokens_per_s"]
        return (f"{r['recipe']}: perplexity {m['perplexity']:.3f} (FP {m['perplexity_fp']:.3f}), greedy "
                f"agreement {m['greedy_agreement']:.3f}, decode tokens/s fp32 {t['fp32']:.1f} / bf16 "
                f"{t['bf16']:.1f} / quantized {t['quantized_bf16']:.1f}")
    return (f"{r['recipe']}: embedding cosine {m['cosine_mean']:.4f} (min {m['cosine_min']:.4f}), "
            f"nearest-neighbour agreement {m['nn_agreement']:.3f}")
