"""Layer roles from structure, not names: one traced forward call tells which Linear / Conv2d
layers read the model input, produce its output, embed the timestep, modulate the sample
stream, read the text context, or consume a skip concat (and where its halves meet).

Every tensor of the call carries a tag while a `TorchFunctionMode` watches each torch op:
`src`, the model inputs it depends on, and `last`, the layers that produced it with no other
layer in between (a layer's output starts a new `last`). Roles follow from the tags:

- input: reads the sample with no layer before it; output: in `last` of the model output;
- embedding / modulation: reads only conditioning inputs (timestep, noise level, class, pooled
  text); modulation when its output meets the sample stream in an op (adaLN, a ResNet's
  time projection), embedding otherwise (the timestep MLP);
- context: reads the text sequence (`encoder_hidden_states`-like inputs) and not the sample;
- skip: its input is a concatenation along its feature axis (`segments`: the part sizes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

ROLES = ("input", "output", "embedding", "modulation", "context", "skip")
_CATS = {torch.cat, torch.concat, torch.concatenate}
T = torch.Tensor
# ops that read only the dtype / device / shape of their other tensor arguments (`t.type_as(x)`
# casts t, it does not mix x in), and ops whose output holds no input data at all
_SELF_ONLY = {T.type_as, T.to, T.view_as, T.reshape_as, T.expand_as}
_NO_DATA = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, T.new_zeros,
            T.new_ones, T.new_empty, T.new_full}
_SAMPLE_KEYS = ("sample", "hidden_states", "x")


@dataclass(frozen=True)
class _Tag:
    src: frozenset = frozenset()
    last: frozenset = frozenset()
    cat: tuple | None = None  # (dim from the end, part sizes) of a concatenation, kept through
    # ops whose output has its shape


@dataclass
class Structure:
    """What one traced call showed: layer -> roles, skip-concat consumers -> part sizes."""

    roles: dict[str, set[str]] = field(default_factory=dict)
    segments: dict[str, list[int]] = field(default_factory=dict)

    def with_role(self, role: str) -> list[str]:
        return [n for n, r in self.roles.items() if role in r]

    def describe(self, name: str) -> str:
        return ", ".join(r for r in ROLES if r in self.roles.get(name, ())) or "body"


class _Tracer(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[int, _Tag] = {}
        self.alive: list[torch.Tensor] = []  # ids stay unique while the call runs
        self.meets: set[str] = set()  # layers whose output met the sample stream
        self.sample = "sample"
        self.conditioning: frozenset = frozenset()

    def tag(self, t: torch.Tensor, tag: _Tag) -> None:
        self.tags[id(t)] = tag
        self.alive.append(t)

    def get(self, t) -> _Tag | None:
        return self.tags.get(id(t)) if isinstance(t, torch.Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _NO_DATA:
            return out
        flat, _ = tree_flatten(args[:1] if func in _SELF_ONLY else (args, kwargs))
        tags = [(t, g) for t in flat if (g := self.get(t)) is not None]
        if not tags:
            return out
        self._note_meeting([g for _, g in tags])
        src = frozenset().union(*(g.src for _, g in tags))
        last = frozenset().union(*(g.last for _, g in tags))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        cat = None
        if func in _CATS and _joins_layers([self.get(p) for p in args[0]]):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            nd = outs[0].dim()
            cat = (dim % nd - nd, [int(p.shape[dim]) for p in args[0]])
        for o in outs:
            keep = cat or next((g.cat for t, g in tags if g.cat and t.shape == o.shape), None)
            self.tag(o, _Tag(src, last, keep))
        return out

    def _note_meeting(self, tags: list[_Tag]) -> None:
        """An op joining the sample stream with a conditioning-only tensor: the latter's
        producing layers modulate the sample."""
        if not any(self.sample in g.src for g in tags):
            return
        for g in tags:
            if g.src and g.src <= self.conditioning:
                self.meets |= g.last


def _joins_layers(parts: list[_Tag | None]) -> bool:
    """A skip concat joins the outputs of different layers (a sinusoidal embedding's
    cat(sin, cos) joins none)."""
    return (len(parts) > 1 and all(g is not None and g.last for g in parts)
            and len({g.last for g in parts}) > 1)


def _flat_inputs(args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    named = {f"arg{i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    named.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    return named


def _sample_name(args: tuple, kwargs: dict, named: dict[str, torch.Tensor]) -> str | None:
    for k in _SAMPLE_KEYS:
        if k in kwargs and isinstance(kwargs[k], torch.Tensor):
            return k
    return "arg0" if args and isinstance(args[0], torch.Tensor) else next(iter(named), None)


@torch.no_grad()
def trace_structure(model: nn.Module, args: tuple = (), kwargs: dict | None = None,
                    layers: dict[str, nn.Module] | None = None) -> Structure:
    """Run `model(*args, **kwargs)` once and read the roles of `layers` (default: every
    Linear / Conv2d) from the tensors' provenance. Inputs of three or more dimensions other than
    the sample are text context; the rest (timestep, class labels, pooled text) conditioning."""
    kwargs = dict(kwargs or {})
    if layers is None:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    named = _flat_inputs(args, kwargs)
    tracer = _Tracer()
    tracer.sample = _sample_name(args, kwargs, named) or "sample"
    context = {k for k, v in named.items() if k != tracer.sample and v.dim() >= 3
               and v.is_floating_point()}
    tracer.conditioning = frozenset(set(named) - context - {tracer.sample})
    seen: dict[str, _Tag] = {}

    def pre(name):
        def hook(_m, inputs):
            g = tracer.get(inputs[0]) if inputs else None
            seen.setdefault(name, g or _Tag())
        return hook

    def post(name):
        def hook(_m, _inputs, output):
            g = tracer.get(output) or _Tag()
            tracer.tag(output, _Tag(g.src, frozenset({name})))
        return hook

    handles = [h for n, m in layers.items()
               for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))]
    try:
        with tracer:
            for k, v in named.items():
                tracer.tag(v, _Tag(frozenset({k})))
            out = model(*args, **kwargs)
            outputs = [tracer.get(t) for t in tree_flatten(_plain(out))[0]]
    finally:
        for h in handles:
            h.remove()
    produced = frozenset().union(*(g.last for g in outputs if g is not None))
    return _read_roles(layers, seen, produced, tracer, context)


def _plain(out):
    """diffusers / transformers outputs (dataclass-like dicts) as plain containers."""
    if hasattr(out, "to_tuple"):
        return out.to_tuple()
    return out


def _read_roles(layers, seen: dict[str, _Tag], produced: frozenset, tracer: _Tracer,
                context: set[str]) -> Structure:
    st = Structure()
    for name, m in layers.items():
        g = seen.get(name)
        if g is None:
            continue  # not reached by this call
        roles = set()
        if tracer.sample in g.src and not g.last:
            roles.add("input")
        if name in produced:
            roles.add("output")
        if g.src and g.src <= tracer.conditioning:
            roles.add("modulation" if name in tracer.meets else "embedding")
        elif g.src & context and tracer.sample not in g.src:
            roles.add("context")
        if g.cat is not None:  # NCHW convs join channels at dim -3, Linear features at -1
            dim, sizes = g.cat
            conv = isinstance(m, nn.Conv2d)
            features = m.in_channels if conv else m.in_features
            if dim == (-3 if conv else -1) and sum(sizes) == features:
                roles.add("skip")
                st.segments[name] = sizes
        st.roles[name] = roles
    return st
