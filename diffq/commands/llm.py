"""`diffq calibrate` / `diffq eval` for transformers models (the shared LLM path; loading and
the model glue are in `diffq.integrations.llm`). Quantized output: `<out>/model/` (diffq
checkpoint), `llm.json` (the float model it came from), report.md / report.json."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from diffq.api import quantize, weight_bytes
from diffq.checkpoint import save
from diffq.core.recipe import load_recipe
from diffq.errors import InputError
from diffq.eval import llm as metrics
from diffq.integrations.llm import (
    MODEL_DIR,
    SOURCE_FILE,
    calibration_items,
    greedy,
    is_causal,
    is_transformers_dir,
    load_model,
    load_quantized,
    load_tokenizer,
    logits_fn,
    max_length,
    sentence_embeddings,
    token_stream,
    windows,
)
from diffq.io import check_at_least, check_output, read_text, write_json, write_text, writing_directory
from diffq.markdown import Markdown, cell
from diffq.nn.convert import linearize_conv1d
from diffq.nn.state import diffq_state


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
        write_json(tmp / "report.json", report)
        write_text(tmp / "report.md", _calibrate_md(report))
    report["out"] = str(out)
    return report


def _calibrate_md(r: dict) -> str:
    md = Markdown(f"{r['recipe']} on {r['model']}").bullets([
        f"calibration: {r['samples']} windows of {r['seq_len']} tokens from {r['dataset']}",
        f"layer-by-layer calibration: {cell(r['sequential'])}",
        f"int8 KV cache: {cell(r['kv_cache'] is not None)}",
        f"weight bytes: {r['weight_bytes']:,} ({r['weight_bytes'] / r['weight_bytes_fp']:.3f}x bf16)",
        f"time: {r['seconds']} s"])
    md.table(["layer", "scheme"], r["layers"].items())
    md.text("Kept float:").bullets(f"{n}: {why}" for n, why in r["skipped"].items())
    if r["unmatched_patterns"]:
        md.text("Recipe patterns that matched no layer of this model:")
        md.bullets(f"`{p}`" for p in r["unmatched_patterns"])
    return str(md)


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


def eval_causal(fp: nn.Module, q: nn.Module, tok, text: str, s: LLMEvalSettings) -> dict:
    ids = token_stream(tok, text)[: s.max_tokens]
    context = max_length(fp, s.seq_len)
    ppl_fp, n = metrics.perplexity(logits_fn(fp), ids, context, min(s.stride, context))
    ppl_q, _ = metrics.perplexity(logits_fn(q), ids, context, min(s.stride, context))
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
            write_json(tmp / "eval.json", report)
            write_text(tmp / "eval.md", _eval_md(report))
    return report


def _eval_md(r: dict) -> str:
    md = Markdown(f"{r['recipe']}: {r['quantized']} vs {r['model']}").text(
        f"dataset: {r['dataset']}", f"weight bytes: {r['weight_bytes']:,} vs {r['weight_bytes_fp']:,} (bf16)")
    rows = []
    for k, v in r["metrics"].items():
        rows += [(f"{k} {kk}", vv) for kk, vv in v.items()] if isinstance(v, dict) else [(k, v)]
    return str(md.table(["metric", "value"], rows))


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
