import typing

import pytest
import torch

from diffq.core import storage
from diffq.core.formats import Format
from diffq.core.granularity import PerChannel, PerGroup
from diffq.core.recipe import WeightSpec
from diffq.core.storage import Layout, StorageFormat, storage_format, storage_formats
from diffq.core.weights import QuantizedWeight, quantize_weight
from diffq.errors import RecipeError
from diffq.ops import reference

SPECS = [
    WeightSpec(format="int8"),
    WeightSpec(format="int8", granularity="per_tensor"),
    WeightSpec(format="int4", granularity="per_group", group_size=32, symmetric=False, scale_dtype="float16"),
    WeightSpec(format="nf4", granularity="per_group", group_size=64, scale_dtype="bfloat16"),
    WeightSpec(format="fp8_e4m3"),
    WeightSpec(format="fp8_e5m2", granularity="per_group", group_size=16),
    WeightSpec(format="q8_0", granularity="per_group", group_size=32),
    WeightSpec(format="int4_i8", granularity="per_group", group_size=16, scale_dtype="float16"),
]


def test_recipe_schema_names_exactly_the_registered_formats():
    schema = typing.get_args(typing.get_type_hints(WeightSpec)["format"])
    assert set(schema) == set(storage_formats())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-{s.granularity}")
def test_layout_knows_the_shapes_and_bytes_of_real_storage(spec, gen):
    w = torch.randn(24, 8, 2, 4, generator=gen)
    qw = quantize_weight(w, spec)
    empty = QuantizedWeight.empty(spec.layout(), tuple(w.shape))
    for real, blank in ((qw.data, empty.data), (qw.scale, empty.scale), (qw.zero_point, empty.zero_point)):
        assert (real is None) == (blank is None)
        if real is not None:
            assert (real.shape, real.dtype) == (blank.shape, blank.dtype)
    assert qw.layout.nbytes(24, 64) == qw.nbytes == empty.nbytes
    assert qw.dequantize().shape == w.shape


def test_q8_0_is_one_layout_under_every_method(gen):
    """q8_0 stores fp16 scales per 32 columns whether RTN or GPTQ chose the codes."""
    from diffq.algos.gptq import gptq

    spec = WeightSpec(format="q8_0", granularity="per_group", group_size=32)
    w = torch.randn(8, 64, generator=gen)
    x = torch.randn(256, 64, generator=gen)
    rtn, g = quantize_weight(w, spec), gptq(w, x.t() @ x / 256, spec)
    assert rtn.layout == g.layout == Layout("q8_0", PerGroup(32), torch.float16, True)
    assert (rtn.scale.dtype, rtn.scale.shape) == (g.scale.dtype, g.scale.shape) == (torch.float16, (8, 2, 1))


def test_formats_refuse_what_they_cannot_store():
    with pytest.raises(RecipeError, match="q8_0"):
        WeightSpec(format="q8_0", granularity="per_channel").validate()
    with pytest.raises(RecipeError, match="rounds as ggml"):
        WeightSpec(format="q8_0", granularity="per_group", group_size=32, clip="mse").validate()
    with pytest.raises(RecipeError, match="asymmetric"):
        WeightSpec(format="fp8_e4m3", symmetric=False).validate()
    with pytest.raises(RecipeError, match="per_group"):
        WeightSpec(format="nf4").validate()
    with pytest.raises(RecipeError, match="known: int8"):
        storage_format("int3")


def test_a_new_format_is_one_class_and_one_registration(monkeypatch, gen):
    """A 3-bit signed integer grid, registered from outside the package, works end to end."""
    int3 = StorageFormat("int3", Format("int3", 3, "int", -4, 3, torch.int8))
    monkeypatch.setitem(storage.FORMATS._items, "int3", int3)
    layout = Layout("int3", PerChannel(0))
    w, x = torch.randn(16, 32, generator=gen), torch.randn(4, 32, generator=gen)
    qw = quantize_weight(w, layout)
    assert qw.data.dtype == torch.int8 and int(qw.data.min()) >= -4 and int(qw.data.max()) <= 3
    assert qw.nbytes == layout.nbytes(16, 32)
    # 3 bits: each weight within half a step of its channel's scale
    assert ((qw.dequantize() - w).abs() <= qw.scale / 2 + 1e-6).all()
    torch.testing.assert_close(reference.linear(x, qw, None, None), x @ qw.dequantize().t())
