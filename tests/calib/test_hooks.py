"""The one hook manager: hooks live exactly as long as the `with` block, errors included."""
import pytest
import torch
from torch import nn

from diffq.calib.hooks import input_hooks


def test_hooks_see_inputs_and_are_removed_even_on_error(gen):
    layers = {"a": nn.Linear(4, 4), "b": nn.Linear(4, 2)}
    seen = []
    x = torch.randn(3, 4, generator=gen)
    with input_hooks(layers, lambda n, _m: lambda _mod, args: seen.append((n, args[0].shape))):
        layers["b"](layers["a"](x))
    assert seen == [("a", (3, 4)), ("b", (3, 4))]
    with pytest.raises(RuntimeError), input_hooks(layers, lambda n, _m: lambda *_: None):
        raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in layers.values())


def test_kwargs_hooks(gen):
    m = nn.Linear(4, 4)
    got = {}

    def make(_n, _m):
        def hook(_mod, args, kwargs):
            got.update(kwargs)
        return hook

    with input_hooks({"m": m}, make, with_kwargs=True):
        m(input=torch.randn(1, 4, generator=gen))
    assert "input" in got and not m._forward_pre_hooks
