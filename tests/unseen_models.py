"""Denoisers nobody here trained, built with the pathologies of real checkpoints (#19): a plain
nn.Module UNet with EDM preconditioning (the noise level sigma is the second argument: c_in /
c_skip / c_out / c_noise), class conditioning, InstanceNorm where GroupNorm would be, layer
names that share nothing with diffusers', a few outlier input channels (max / rms >= 300) and
layer inputs spanning more than six orders of magnitude. Random weights with planted ranges:
the float model is the reference, so its function need not be a trained one."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SIGMA_DATA = 0.5
SIGMAS = (0.02, 0.2, 1.0, 5.0, 40.0)  # EDM's range, log-spaced


class Fourier(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(n) * 4)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        a = c.reshape(-1, 1) * self.freqs * 2 * math.pi
        return torch.cat((a.cos(), a.sin()), dim=1)


class Unit(nn.Module):
    """(x + f(x, emb)) / sqrt 2, f: norm, conv, modulation by the embedding, norm, conv;
    optionally self-attention over pixels with 1x1 convs."""

    def __init__(self, cin: int, cout: int, emb: int, attn: bool) -> None:
        super().__init__()
        self.n0 = nn.InstanceNorm2d(cin, affine=True)
        self.c0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.gain = nn.Linear(emb, cout)
        self.n1 = nn.InstanceNorm2d(cout, affine=True)
        self.c1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.proj = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.attn = attn
        if attn:
            self.an = nn.InstanceNorm2d(cout, affine=True)
            self.qkv = nn.Conv2d(cout, 3 * cout, 1)
            self.mix = nn.Conv2d(cout, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.c0(F.silu(self.n0(x)))
        h = h * (1 + self.gain(emb)[:, :, None, None])
        h = self.c1(F.silu(self.n1(h)))
        x = ((x if self.proj is None else self.proj(x)) + h) / math.sqrt(2)
        if self.attn:
            b, c, hh, ww = x.shape
            q, k, v = self.qkv(self.an(x)).reshape(b, 3, c, hh * ww).unbind(1)
            w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)
            x = (x + self.mix((v @ w.transpose(1, 2)).reshape(b, c, hh, ww))) / math.sqrt(2)
        return x


class EDMNet(nn.Module):
    def __init__(self, ch: int = 32, classes: int = 4, emb: int = 64, image: int = 3) -> None:
        super().__init__()
        self.classes = classes
        self.fourier = Fourier(16)
        self.noise_map = nn.Linear(32, emb)
        self.label_map = nn.Linear(classes, emb, bias=False)
        self.emb_mlp = nn.Linear(emb, emb)
        self.stem = nn.Conv2d(image, ch, 3, padding=1)
        self.enc = nn.ModuleList([Unit(ch, ch, emb, False), Unit(ch, 2 * ch, emb, True)])
        self.mid = Unit(2 * ch, 2 * ch, emb, True)
        self.dec = nn.ModuleList([Unit(4 * ch, 2 * ch, emb, True), Unit(3 * ch, ch, emb, False)])
        self.head_norm = nn.InstanceNorm2d(ch, affine=True)
        self.head = nn.Conv2d(ch, image, 3, padding=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, 1, 1, 1).float()
        c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
        c_out = s * SIGMA_DATA / (s ** 2 + SIGMA_DATA ** 2).sqrt()
        c_in = 1 / (SIGMA_DATA ** 2 + s ** 2).sqrt()
        emb = self.noise_map(self.fourier(sigma.float().log() / 4))
        emb = F.silu(emb + self.label_map(F.one_hot(labels, self.classes).float()))
        emb = F.silu(self.emb_mlp(emb))
        h = self.stem(x * c_in)
        skips = []
        for i, unit in enumerate(self.enc):
            h = unit(h, emb)
            skips.append(h)
            if i == 0:
                h = F.avg_pool2d(h, 2)
        h = self.mid(h, emb)
        for i, unit in enumerate(self.dec):
            h = unit(torch.cat((h, skips.pop()), dim=1), emb)
            if i == 0:
                h = F.interpolate(h, scale_factor=2.0)
        return c_skip * x + c_out * self.head(F.silu(self.head_norm(h)))


@torch.no_grad()
def plant_pathologies(net: EDMNet) -> EDMNet:
    """Real checkpoints' ranges on random weights: outlier channels (norm offsets of 4000, so a
    channel's max is hundreds of times the typical channel's rms) entering attention and a
    unit's second conv; a skip half 50x louder than the other; an embedding path at ~1e3 and
    an attention output at ~1e-3 (each scale taken back uniformly by the next layer, which
    per-channel weights do not mind); a head input at ~1e-3."""
    for unit in (net.enc[1], net.mid, net.dec[0]):  # outlier channels entering qkv (1x1 conv)
        unit.an.bias[torch.tensor([3, 17])] = 4000.0
    for unit in (net.enc[0], net.dec[1]):  # ... and a 3x3 conv
        unit.n1.bias[torch.tensor([5])] = 6000.0
    net.enc[0].c1.weight *= 50  # enc[0]'s output, the skip of dec[1], 50x the other half
    net.enc[0].c1.bias *= 50
    net.emb_mlp.weight *= 3e3  # the embedding after silu at ~1e3 ...
    net.emb_mlp.bias *= 3e3
    for unit in [*net.enc, net.mid, *net.dec]:
        unit.gain.weight /= 3e3  # ... which the modulation layers take back
    c = net.mid.mix.in_channels  # the attention output at ~1e-3 (v rows of qkv), mix takes it back
    net.mid.qkv.weight[2 * c:] *= 1e-3
    net.mid.qkv.bias[2 * c:] *= 1e-3
    net.mid.mix.weight *= 1e3
    net.head_norm.weight.fill_(1e-3)  # head input ~1e-3
    net.head_norm.bias.zero_()
    net.head.weight *= 1e3
    return net


def edm_net(seed: int = 0, **kw) -> EDMNet:
    torch.manual_seed(seed)
    return plant_pathologies(EDMNet(**kw)).eval()


def edm_calls(seed: int, per_sigma: int = 2, batch: int = 2, size: int = 16, classes: int = 4,
              amplitude: float = 1.0) -> list:
    """Calls (args, kwargs) at every sigma of SIGMAS: noisy smooth 'images' x = y + sigma * n."""
    g = torch.Generator().manual_seed(seed)
    calls = []
    for s in SIGMAS:
        for _ in range(per_sigma):
            y = F.interpolate(torch.randn(batch, 3, size // 4, size // 4, generator=g), size=size,
                              mode="bilinear") * SIGMA_DATA * amplitude
            x = y + s * torch.randn(batch, 3, size, size, generator=g)
            calls.append(((x, torch.full((batch,), s), torch.randint(0, classes, (batch,), generator=g)), {}))
    return calls
