"""accelerate: multi-process calibration merges statistics exactly; offloaded models calibrate alike."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from diffq.api import calibrate, plan
from tests.conftest import assert_same_quantized_layers

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "samples" / "tiny-sd"
ARGS = ["calibrate", "--model", str(MODEL), "--num-prompts", "4", "--steps", "4", "--batch-size", "1",
        "--no-progress"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].nan_to_num(-1), b[k].nan_to_num(-1)) for k in a)


@pytest.mark.slow
def test_two_processes_give_the_single_process_statistics(tmp_path):
    # both runs with one thread per process: float reductions (and so the statistics) depend
    # on the thread count, which is not what this test is about
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "diffq.cli", *ARGS, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "diffq.cli", *ARGS, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert same(load_file(str(tmp_path / "one" / "stats.safetensors")),
                load_file(str(tmp_path / "two" / "stats.safetensors")))
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert same(load_file(str(tmp_path / "one" / weights)), load_file(str(tmp_path / "two" / weights)))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # one writer, nothing partial


def test_offloaded_unet_collects_the_same_statistics():
    from accelerate import cpu_offload

    def stats_of(unet):
        g = torch.Generator().manual_seed(0)
        calls = [((torch.randn(2, 4, 16, 16, generator=g), torch.tensor([t, t]),
                   torch.randn(2, 8, 128, generator=g)), {}) for t in (999, 500, 1)]
        with calibrate(unet, plan(unet, "w8a8", example=calls[0])) as cal:
            cal.run(calls)
        return cal.activation_stats

    plain = stats_of(UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet"))
    offloaded = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.conv_in.weight.device.type == "meta"  # weights live in the offload hooks
    got = stats_of(offloaded)
    assert got.keys() == plain.keys()
    for name in plain:
        assert same(got[name].tensors(), plain[name].tensors()), name


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
def test_disk_offloaded_unet_quantizes_like_in_memory(recipe, tmp_path):
    """device_map with every weight offloaded to disk (the UNet does not fit the memory budget):
    statistics, GPTQ Hessians and quantized layers equal the in-memory run's; the quantized
    layers end up in memory, the float ones stay offloaded."""
    import diffq

    g = torch.Generator().manual_seed(0)
    calls = [((torch.randn(2, 4, 16, 16, generator=g), torch.tensor([t, t]),
               torch.randn(2, 8, 128, generator=g)), {}) for t in (999, 700, 400, 1)]
    plain = diffq.quantize(UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet"), recipe,
                           calibration=calls)
    offloaded = UNet2DConditionModel.from_pretrained(
        MODEL, subfolder="unet", device_map="auto", max_memory={"cpu": "1MB"},
        offload_folder=str(tmp_path), torch_dtype=torch.float32)
    assert offloaded.conv_in.weight.device.type == "meta"  # on disk, loaded per call
    diffq.quantize(offloaded, recipe, calibration=calls)
    assert_same_quantized_layers(plain, offloaded)
    assert offloaded.conv_in.weight.device.type == "meta"  # kept float by the recipe: still offloaded
    (x, t, e), _ = calls[0]
    with torch.no_grad():
        assert torch.equal(plain(x, t, e).sample, offloaded(x, t, e).sample)
