"""Layer-by-layer calibration (the GPTQ way) for models with a stack of repeated blocks, e.g. the
decoder layers of a causal LM: capture the inputs of the first block once, then for each block
collect its layers' input statistics on the cached inputs, quantize it, and run the *quantized*
block to produce the next block's inputs. Only one block computes at a time, and each block sees
the errors of the blocks before it, which GPTQ then compensates."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from diffq.calib.collector import call_model
from diffq.calib.hessian import InputCollector, InputStats
from diffq.calib.hooks import input_hooks
from diffq.core.recipe import LayerPlan
from diffq.errors import CalibrationError, RecipeError
from diffq.nn.prepare import PreparedLayer, input_needs, prepare_and_convert

Call = tuple[tuple, dict]


class _Stop(Exception):
    """Raised by the capture hook: nothing after the first block needs to run."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's repeated blocks: the longest nn.ModuleList of one module type
    that holds Linear layers (`model.layers` of Llama, `transformer.h` of GPT-2)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1
                and any(isinstance(x, nn.Linear) for x in m[0].modules())
                and (best is None or len(m) > len(best[1]))):
            best = (name, m)
    if best is None:
        raise RecipeError("sequential calibration needs a model with a list of repeated blocks")
    return best


def _no_cache(kwargs: dict) -> dict:
    # a KV cache passed along would grow on every replay of the block and change its output
    out = {k: (None if hasattr(v, "get_seq_length") else v) for k, v in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, calibration: Iterable[Any]) -> list[Call]:
    """The (args, kwargs) of every call of `block` while running `model` on the calibration
    items; the model stops at the block, so later blocks never run."""
    calls: list[Call] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((tuple(args), _no_cache(kwargs)))
        raise _Stop

    with input_hooks({"": block}, lambda _n, _m: hook, with_kwargs=True):
        for item in calibration:
            try:
                call_model(model, item)
            except _Stop:
                pass
    if not calls:
        raise CalibrationError("the calibration data is empty (or never reached the first block)")
    return calls


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(call: Call, hidden: torch.Tensor) -> Call:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def run_block(block: nn.Module, calls: list[Call]) -> list[torch.Tensor]:
    """The block's hidden-state output for each cached call."""
    return [_hidden(block(*a, **k)) for a, k in calls]


def _collector(model: nn.Module, needs: dict[str, tuple[bool, int]]) -> InputCollector:
    return InputCollector({n: model.get_submodule(n) for n in needs},
                          hessian=[n for n, (h, _) in needs.items() if h],
                          samples={n: k for n, (_, k) in needs.items() if k})


def quantize_sequential(model: nn.Module, plans: dict[str, LayerPlan], calibration: Iterable[Any],
                        on_block: Callable[[int, nn.Module], None] | None = None,
                        progress: bool = False,
                        load_block: Callable[[str], None] | None = None,
                        materialize=None) -> dict[str, PreparedLayer]:
    """Quantize the planned layers of `model` block by block (see the module docstring), then
    the planned layers outside the blocks with one more pass of the calibration data (now
    through the quantized blocks) if they need inputs. `on_block(i, block)` is called after
    block i is quantized (e.g. to offload it); `load_block(name)` before block `name` is first
    used, for models whose blocks start on the meta device (see diffq.integrations.lowmem);
    `materialize` as in `diffq.nn.prepare.prepare_and_convert`, for offloaded (device_map) models.
    Static activation plans are not supported."""
    from tqdm.auto import tqdm

    static = [n for n, p in plans.items() if p.activations is not None and p.activations.mode == "static"]
    if static:
        raise RecipeError(f"sequential calibration supports weight-only and dynamic-activation "
                          f"recipes; layer {static[0]!r} has static activations")
    calibration = list(calibration)
    prefix, blocks = find_blocks(model)
    calls = capture_block_inputs(model, blocks[0], calibration)
    prepared: dict[str, PreparedLayer] = {}
    for i, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress, leave=False)):
        head = f"{prefix}.{i}." if prefix else f"{i}."
        if load_block is not None:
            load_block(head[:-1])
        sub = {n: p for n, p in plans.items() if n.startswith(head)}
        needs = {n: nd for n, p in sub.items() if (nd := input_needs(model.get_submodule(n), p))}
        stats: dict[str, InputStats] = {}
        if needs:
            with _collector(model, needs) as inputs:
                run_block(block, calls)
            stats = inputs.stats()
        prepared.update(prepare_and_convert(model, sub, stats, materialize=materialize)[0])
        if i + 1 < len(blocks):
            calls = [_with_hidden(c, h) for c, h in zip(calls, run_block(block, calls), strict=True)]
        if on_block is not None:
            on_block(i, block)
    del calls
    outside = {n: p for n, p in plans.items() if not n.startswith(f"{prefix}." if prefix else "")}
    needs = {n: nd for n, p in outside.items() if (nd := input_needs(model.get_submodule(n), p))}
    stats = {}
    if needs:
        with torch.no_grad(), _collector(model, needs) as inputs:
            for item in calibration:
                call_model(model, item)
        stats = inputs.stats()
    prepared.update(prepare_and_convert(model, outside, stats, materialize=materialize)[0])
    return prepared
