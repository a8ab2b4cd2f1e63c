"""diffq calibrate / eval / compare / bench on diffusion-transformer pipelines (tiny random
PixArt and Flux saved as a user's folders), and the refusals that go with them."""
import json

import pytest

from diffq import cli
from tests.dit_pipelines import build

FAST = ["--steps", "4", "--batch-size", "2", "--no-progress"]


def run(*args) -> int:
    return cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "pixart"
    build("pixart")[0].save_pretrained(path)
    return path


def test_calibrate_eval_compare_on_a_dit_pipeline(pixart, tmp_path):
    recipe = tmp_path / "te.yaml"
    recipe.write_text("name: w8a8-dit\nactivations: {timestep_groups: 2}\n"
                      "keep_float: [input, output, embedding]\ncomponents: [denoiser, text_encoder]\n")
    out = tmp_path / "q"
    assert run("calibrate", "--model", pixart, "--recipe", recipe, "--num-prompts", "4", "--out", out,
               *FAST) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["components"] == ["transformer", "text_encoder"]
    assert (out / "transformer" / "diffq.json").is_file() and (out / "text_encoder" / "diffq.json").is_file()
    assert "pos_embed.proj" in report["skipped"] and "proj_out" in report["skipped"]
    assert any(n.startswith("text_encoder.") for n in report["layers"])
    assert report["verification"]["calls"] == 4  # the held-back batch (its CFG pairs in one call) x 4 steps
    ev = tmp_path / "ev"
    assert run("eval", "--model", pixart, "--quantized", out, "--num-images", "2", "--out", ev, *FAST) == 0
    r = json.loads((ev / "report.json").read_text())
    assert r["components"] == ["transformer", "text_encoder"] and r["metrics"]["psnr_db"] > 25
    cmp = tmp_path / "cmp"
    assert run("compare", "--model", pixart, "--schemes", "fp,naive-w8a8,w8a8", "--num-images", "2",
               "--num-prompts", "4", "--out", cmp, *FAST) == 0
    rows = json.loads((cmp / "compare.json").read_text())["rows"]
    assert [r["scheme"] for r in rows] == ["fp", "naive-w8a8", "w8a8"]
    assert rows[2]["psnr_db"] > 25 and rows[2]["weight_ratio_bf16"] < 0.8  # tiny: embedders stay float


def test_height_and_width_reach_every_pipeline_call(tmp_path):
    flux = tmp_path / "flux"
    build("flux")[0].save_pretrained(flux)
    out = tmp_path / "q"
    assert run("calibrate", "--model", flux, "--num-prompts", "4", "--height", "32", "--width", "48",
               "--out", out, *FAST) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["components"] == ["transformer"]
    # 32 x 48 pixels -> 16 x 24 latents -> 8 x 12 packed tokens per image
    stats = json.loads((out / "transformer" / "diffq.json").read_text())
    assert stats["recipe"]["name"] == "w8a8"
    ev = tmp_path / "ev"
    assert run("eval", "--model", flux, "--quantized", out, "--num-images", "2", "--height", "32",
               "--width", "48", "--out", ev, *FAST) == 0
    from PIL import Image

    assert Image.open(ev / "grid.png").size[1] > 0
    assert json.loads((ev / "report.json").read_text())["metrics"]["psnr_db"] > 25


def test_recipe_naming_the_other_denoiser_is_one_clear_error(pixart, tmp_path, capsys):
    recipe = tmp_path / "unet.yaml"
    recipe.write_text("name: w8-unet\ncomponents: [unet]\n")
    assert run("calibrate", "--model", pixart, "--recipe", recipe, "--out", tmp_path / "q", *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert "denoiser is 'transformer'" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_video_pipeline_calibrates_and_eval_says_it_scores_images(tmp_path, capsys):
    wan = tmp_path / "wan"
    build("wan")[0].save_pretrained(wan)
    out = tmp_path / "q"
    assert run("calibrate", "--model", wan, "--num-prompts", "4", "--height", "16", "--width", "16",
               "--out", out, *FAST) == 0
    assert json.loads((out / "report.json").read_text())["components"] == ["transformer"]
    capsys.readouterr()
    assert run("eval", "--model", wan, "--quantized", out, "--num-images", "2", "--height", "16",
               "--width", "16", "--out", tmp_path / "ev", *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert "makes videos" in err and len(err.splitlines()) == 1 and not (tmp_path / "ev").exists()
