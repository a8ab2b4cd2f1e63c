"""Activations fused into the quantized Linear that feeds them.

A module that computes act(proj(x)) (diffusers' `GELU`, the feed-forward input of SD3, Flux,
PixArt and Sana blocks) is replaced by `LinearAct`, which keeps `proj` under the same name
(so state dicts and checkpoints are unchanged) and lets the int8 kernel apply the activation
in its epilogue: oneDNN's post-op for static activations, the compiled rescale pass for
dynamic ones. On this CPU that also avoids PyTorch's bf16 tanh-GELU, which takes 76 ms on the
2714 x 6144 output of an SD3-medium feed-forward where the post-op adds 4 ms
(`python samples/bench_cpu_ops.py --threads 2`).

The swap is structural and repeatable: it runs after quantizing and after every load.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from diffq.nn.qlinear import QLinear
from diffq.ops import fused


class LinearAct(nn.Module):
    """proj with its activation fused (`proj.post`); the original module is kept to undo."""

    def __init__(self, original: nn.Module, child: str, post: str):
        super().__init__()
        self.proj = getattr(original, child)
        self.proj.post = post
        self.child = child
        self.__dict__["original"] = original  # not a child: no second copy in the state dict

    def forward(self, x):
        if type(self.proj) is QLinear:
            return self.proj(x)
        # an adapter wraps proj (PEFT's LoRA): its delta belongs before the activation, so the
        # wrapped layer runs without its post-op and the activation follows the sum
        base = _base(self.proj)
        post, base.post = base.post, ""
        try:
            y = self.proj(x)
        finally:
            base.post = post
        return fused.apply_post(y, post)

    def extra_repr(self) -> str:
        return f"post={self.proj.post!r} (fused from {type(self.original).__name__})"


def _base(proj: nn.Module) -> QLinear:
    """The QLinear itself, or the one an adapter wrapper (PEFT) holds."""
    return proj if type(proj) is QLinear else proj.get_base_layer()


def _diffusers_gelu(m: nn.Module) -> str | None:
    approx = getattr(m, "approximate", None)
    return {"tanh": "gelu_tanh", "none": "gelu"}.get(approx)


# class name -> (child Linear's name, the post-op it applies, or None when not fusable)
FUSIBLE: dict[str, tuple[str, Callable[[nn.Module], str | None]]] = {
    "GELU": ("proj", _diffusers_gelu),
}


def _is_diffusers(m: nn.Module) -> bool:
    return type(m).__module__.startswith("diffusers.")


def fuse_activations(model: nn.Module) -> list[str]:
    """Swap every fusable act(proj(x)) module whose proj is a QLinear for a LinearAct; returns
    the names swapped."""
    swapped = []
    for name, m in list(model.named_modules()):
        entry = FUSIBLE.get(type(m).__name__)
        if entry is None or not _is_diffusers(m) or not name:
            continue
        child, how = entry
        proj, post = getattr(m, child, None), how(m)
        if type(proj) is QLinear and post is not None:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, LinearAct(m, child, post))
            swapped.append(name)
    return swapped


def unfuse_activations(model: nn.Module) -> None:
    """Put the original modules back (their proj is the same QLinear, post cleared, still
    wrapped by any adapter loaded meanwhile)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LinearAct):
            _base(m.proj).post = ""
            setattr(m.original, m.child, m.proj)  # with whatever wraps it now (an adapter)
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, m.original)
