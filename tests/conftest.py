import os
import random
import zlib

import numpy as np
import pytest
import torch
from torch import nn

# Triton kernels (tests/kernels, -m triton) run in Triton's CPU interpreter without a GPU. Triton
# reads this when it is imported, and `import diffusers` imports it, so it is set here, before
# any test module is collected.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _test_seed(request: pytest.FixtureRequest) -> int:
    """A seed fixed by the test's id: every run of a test draws the same inputs, and tests draw
    different ones from each other."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(autouse=True)
def _seeded(request: pytest.FixtureRequest) -> None:
    """torch's, numpy's and Python's global generators seeded per test, so a failure replays."""
    seed = _test_seed(request)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded by the test's id (reproducible run to run)."""
    return torch.Generator().manual_seed(_test_seed(request))


class ToyUNet(nn.Module):
    """A small conv/linear model with a timestep argument, like a diffusion UNet's call."""

    def __init__(self, c: int = 64):
        super().__init__()
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        self.time_proj = nn.Linear(1, c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * c, 2 * c, 3, padding=2, dilation=2, groups=2)
        self.attn_q = nn.Linear(2 * c, 2 * c)
        self.up = nn.Conv2d(3 * c, c, 1)
        self.conv_out = nn.Conv2d(c, 4, 3, padding=1)
        self.norm = nn.GroupNorm(4, c)
        self.emb = nn.Embedding(8, c)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = timestep.float().reshape(-1, 1) / 1000
        h = self.conv_in(x) + self.time_proj(t)[:, :, None, None]
        skip = h
        d = torch.relu(self.down(h))
        d = d * (1 + timestep.float().reshape(-1, 1, 1, 1) / 250)  # ranges move with t
        d = self.mid(d)
        q = self.attn_q(d.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(d.shape)
        u = nn.functional.interpolate(q, scale_factor=2)
        h = self.up(torch.cat([skip, u], dim=1))
        return self.conv_out(torch.relu(self.norm(h)))


@pytest.fixture
def toy_unet() -> ToyUNet:
    torch.manual_seed(0)
    return ToyUNet()


def toy_calibration(n_steps: int = 10, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 4, 8, 8, generator=g), torch.full((batch,), float(t)))
            for t in torch.linspace(999, 0, n_steps).round().tolist()]


def assert_same_quantized_layers(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every quantized layer of `a` has an in-memory twin in `b` with the same state."""
    from diffq.nn.base import QuantizedLayer

    for name, q in a.named_modules():
        if isinstance(q, QuantizedLayer):
            twin = b.get_submodule(name)
            assert isinstance(twin, QuantizedLayer) and twin.qweight.device.type == "cpu", name
            assert_same_state(q, twin)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Same state-dict keys, dtypes and bits (1-byte dtypes such as float8 compared as bytes)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    as_bits = lambda v: v.view(torch.uint8) if v.element_size() == 1 else v  # noqa: E731
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(as_bits(sa[k]), as_bits(sb[k])), k
