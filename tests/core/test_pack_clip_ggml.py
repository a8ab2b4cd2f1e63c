import struct

import numpy as np
import pytest
import torch

from diffq.core import PerChannel, PerGroup, choose_qparams, fake_quantize, get_format
from diffq.core.clip import mse_clip_qparams
from diffq.core.ggml import dequantize_q8_0, from_gguf_bytes, quantize_q8_0, to_gguf_bytes
from diffq.core.pack import pack_int4, pack_nibbles, unpack_int4, unpack_nibbles


def test_int4_pack_roundtrip_exact(gen):
    q = torch.randint(-8, 8, (7, 64), generator=gen, dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (7, 32)
    assert torch.equal(unpack_int4(p), q)


def test_nibble_order_low_first():
    p = pack_nibbles(torch.tensor([1, 2, 15, 0], dtype=torch.uint8))
    assert p.tolist() == [0x21, 0x0F]
    assert unpack_nibbles(p).tolist() == [1, 2, 15, 0]
    with pytest.raises(ValueError):
        pack_nibbles(torch.zeros(3, dtype=torch.uint8))


@pytest.mark.parametrize("fmt_name,gran", [("int4", PerGroup(32)), ("int4", PerChannel(0)),
                                           ("int8", PerChannel(0))])
def test_mse_clip_never_worse_per_block(fmt_name, gran, gen):
    x = torch.randn(32, 256, generator=gen) ** 3  # heavy tails: clipping pays
    fmt = get_format(fmt_name)
    plain = fake_quantize(x, choose_qparams(x, fmt, gran), fmt, gran)
    clipped = fake_quantize(x, mse_clip_qparams(x, fmt, gran), fmt, gran)
    e_plain = (plain - x).pow(2).sum(1)
    e_clip = (clipped - x).pow(2).sum(1)
    assert (e_clip <= e_plain + 1e-6).all()
    if fmt_name == "int4":
        assert e_clip.sum() < 0.9 * e_plain.sum()  # measured ~0.8


def _ggml_reference(x: np.ndarray) -> bytes:
    """ggml's quantize_row_q8_0_ref, transcribed to numpy (fp32 maths, roundf)."""
    out = b""
    for block in x.reshape(-1, 32).astype(np.float32):
        amax = np.float32(np.abs(block).max())
        d = np.float32(amax / np.float32(127))
        inv = np.float32(1.0) / d if d else np.float32(0.0)
        v = block * inv
        qs = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)
        out += struct.pack("<e", float(np.float16(d))) + qs.tobytes()
    return out


def test_q8_0_matches_gguf_block_layout(gen):
    x = torch.randn(4, 96, generator=gen)
    codes, d = quantize_q8_0(x)
    assert codes.shape == (4, 3, 32) and d.shape == (4, 3, 1) and d.dtype == torch.float16
    raw = to_gguf_bytes(codes, d)
    assert len(raw) == 12 * 34  # 12 blocks of fp16 d + 32 int8
    assert raw == _ggml_reference(x.numpy())
    c2, d2 = from_gguf_bytes(raw)
    assert torch.equal(c2.reshape(codes.shape), codes) and torch.equal(d2.reshape(d.shape), d)
    err = (dequantize_q8_0(codes, d) - x).abs().reshape(4, 3, 32)
    # half a step, plus 127 codes x fp16's relative rounding of d (2^-11)
    assert (err <= d.float() * (0.5 + 127 * 2**-11) + 1e-7).all()


def test_q8_0_rejects_ragged():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(torch.randn(2, 40))
    with pytest.raises(ValueError):
        from_gguf_bytes(b"\x00" * 35)
