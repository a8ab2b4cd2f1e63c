import pytest
import torch

import diffq
from diffq.calib.collector import ActivationCollector, LayerStats
from diffq.calib.structure import trace_structure
from diffq.core import sqnr_db
from diffq.nn.timestep import TimestepClock, install_clock

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=8,
    ).eval()


def _calls(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(2, 4, 8, 8, generator=g), torch.tensor(float(t))),
             {"encoder_hidden_states": torch.randn(2, 5, 32, generator=g)})
            for t in torch.linspace(999, 1, n).round().tolist()]


def _channel_arithmetic(unet) -> dict[str, list[int]]:
    """What diffusers' up blocks concatenate, from their channel counts (the reference)."""
    prev, out = unet.mid_block.resnets[-1].out_channels, {}
    for i, block in enumerate(unet.up_blocks):
        for j, res in enumerate(block.resnets):
            if res.in_channels > prev:
                for layer in ("conv1", "conv_shortcut"):
                    if isinstance(getattr(res, layer, None), torch.nn.Conv2d):
                        out[f"up_blocks.{i}.resnets.{j}.{layer}"] = [prev, res.in_channels - prev]
            prev = res.out_channels
    return out


def test_traced_skip_segments_match_the_concat(unet):
    st = trace_structure(unet, *_calls(1)[0])
    seg = st.segments
    assert seg and seg == _channel_arithmetic(unet), "the up path consumes skip connections"
    assert st.with_role("input") == ["conv_in"] and st.with_role("output") == ["conv_out"]
    assert set(st.with_role("embedding")) == {"time_embedding.linear_1", "time_embedding.linear_2"}
    assert all(n.endswith("time_emb_proj") for n in st.with_role("modulation"))
    assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in st.with_role("context"))
    p = diffq.plan(unet, "w8a8", structure=st)  # the recipe's role rules, no diffusers name
    assert {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"} <= set(p.skipped)
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert p.layers[k].activations.float_prefix == 1 and p.roles[k] == ["context"]
    assert p.layers[k.replace("attn2", "attn1")].activations.float_prefix == 0
    for name, (h, skip) in seg.items():
        assert unet.get_submodule(name).in_channels == h + skip
    # the second half of each cat is the skip tensor popped from the down path
    block = unet.up_blocks[1]
    seen = {}

    def grab_res(_m, a, k):
        seen["res"] = (k.get("res_hidden_states_tuple") or a[1])[-1]

    def grab_cat(_m, a):
        seen["cat"] = a[0]

    hooks = [block.register_forward_pre_hook(grab_res, with_kwargs=True),
             block.resnets[0].register_forward_pre_hook(grab_cat)]
    with torch.no_grad():
        args, kwargs = _calls(1)[0]
        unet(*args, **kwargs)
    for hk in hooks:
        hk.remove()
    h, skip = seg["up_blocks.1.resnets.0.conv1"]
    assert torch.equal(seen["cat"][:, h:], seen["res"])


def test_w8a8_on_diffusers_unet_with_split_and_groups(unet, tmp_path):
    import copy

    model = copy.deepcopy(unet)
    args, kwargs = _calls(1, seed=7)[0]
    with torch.no_grad():
        ref = unet(*args, **kwargs).sample
    diffq.quantize(model, "w8a8", calibration=_calls(8))  # roles and skip splits traced
    q = model.get_submodule("up_blocks.1.resnets.0.conv1").input_quant
    assert q.scale.shape == (4, 2) and len(q.segments) == 2
    assert not torch.equal(q.scale[:, 0], q.scale[:, 1])  # the halves really differ in range
    assert isinstance(model.conv_in, torch.nn.Conv2d)
    assert "time_embedding.linear_1" in model.diffq.report.skipped
    with torch.no_grad():
        out = model(*args, **kwargs).sample
    assert sqnr_db(ref, out) > 20
    diffq.save(model, tmp_path / "unet")
    reloaded = diffq.load(tmp_path / "unet", copy.deepcopy(unet))
    with torch.no_grad():
        assert torch.equal(reloaded(*args, **kwargs).sample, out)


def test_collections_merge_exactly(unet):
    layers = {n: (m, 1, [m.in_channels], 0) for n, m in unet.named_modules()
              if isinstance(m, torch.nn.Conv2d)}
    calls = _calls(6)

    def collect(items):
        clock = TimestepClock()
        h = install_clock(unet, clock)
        with torch.no_grad(), ActivationCollector(layers, clock) as c:
            for a, k in items:
                unet(*a, **k)
        h.remove()
        return c.stats()

    whole = collect(calls)
    parts = LayerStats.merge  # two "processes", each with half of the prompts
    a, b = collect(calls[::2]), collect(calls[1::2])
    for n in layers:
        m = parts(a[n], b[n])
        for k, v in whole[n].tensors().items():
            assert torch.equal(v, m.tensors()[k]), (n, k)
