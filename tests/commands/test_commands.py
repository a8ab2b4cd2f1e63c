"""diffq calibrate / eval / compare end to end on the shipped reference pipeline (few steps)."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffq import cli
from diffq.commands import calibrate as calibrate_mod
from diffq.commands.bench import faster_float
from diffq.markdown import cell
from diffq.ops import onednn
from tests.commands.test_data_safety import snapshot
from tests.dit_pipelines import build

ROOT = Path(__file__).resolve().parents[2]
MODEL = Path(os.environ.get("DIFFQ_TEST_PIPELINE", ROOT / "samples" / "tiny-sd"))
LORA = ROOT / "samples" / "tiny-sd-lora-squares"
EVALUATOR = ROOT / "samples" / "tiny-clip"
FAST = ["--steps", "4", "--batch-size", "2", "--no-progress"]


def run(*args: str) -> int:
    return cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "w8a8"
    assert run("calibrate", "--model", MODEL, "--num-prompts", "2", "--out", out, *FAST) == 0
    return out


def test_calibrate_writes_the_quantized_pipeline(calibrated):
    assert (calibrated / "unet" / "diffq.json").is_file()
    meta = json.loads((calibrated / "unet" / "diffq.json").read_text())
    assert meta["recipe"]["name"] == "w8a8"
    tensors = load_file(str(calibrated / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(k.endswith("qweight") and v.dtype == torch.int8 for k, v in tensors.items())
    report = json.loads((calibrated / "report.json").read_text())
    assert report["weight_bytes"] < 0.6 * report["weight_bytes_fp"]
    assert report["plotted_layers"] and (calibrated / "activation_ranges.png").stat().st_size > 1000
    assert "conv_in" in report["skipped"]
    split = [n for n, s in meta["layers"].items() if s["segments"] and len(s["segments"]) == 2]
    assert split and all(".resnets." in n for n in split)
    assert not list(calibrated.parent.glob(".*"))  # no partial or cache directories left
    md = (calibrated / "report.md").read_text()
    assert f"**{len(report['layers'])} layers quantized**, {len(report['skipped'])} kept float." in md
    kernels = report["kernels"]  # every layer says what it runs; static ones the int8 kernel
    assert set(kernels) == set(report["layers"]) and "| kernel |" in md
    static = [n for n, scheme in report["layers"].items() if "/static" in scheme]
    assert static and all(kernels[n] == "oneDNN int8" for n in static)
    # full-range int8 weights run split on a CPU without VNNI, and the report says so
    onednn_layers = [n for n, k in kernels.items() if k.startswith("oneDNN int8")]
    assert report["split_layers"] == (onednn_layers if onednn.saturates() else [])
    assert ("`--recipe w7a8`" in md) == onednn.saturates()
    modes = {f.stat().st_mode & 0o777 for f in calibrated.rglob("*") if f.is_file()}
    assert len(modes) == 1 and modes.pop() & 0o044  # safetensors files readable like the rest


def test_eval_reports_metrics(calibrated, tmp_path):
    out = tmp_path / "ev"
    assert run("eval", "--model", MODEL, "--quantized", calibrated, "--num-images", "2",
               "--out", out, *FAST) == 0
    r = json.loads((out / "report.json").read_text())
    for key in ("scheme", "num_images", "steps", "weight_bytes", "weight_bytes_fp"):
        assert key in r
    m = r["metrics"]
    assert set(m) >= {"psnr_db", "ssim", "clip_score", "clip_score_fp", "fid", "fid_fp"}
    assert r["scheme"] == "w8a8" and 15 < m["psnr_db"] < 100 and 0.5 < m["ssim"] < 1
    per_image = m["psnr_db_per_image"]
    assert len(per_image) == 2 and min(per_image) == m["psnr_db_min"] == per_image[m["worst_image"]]
    assert (out / "grid.png").is_file()
    worst_seed = r["seeds"][m["worst_image"]]
    assert f"{cell(m['psnr_db_min'])} (seed {worst_seed})" in (out / "report.md").read_text()


def test_text_encoder_component(tmp_path):
    recipe = tmp_path / "te.yaml"
    recipe.write_text("name: w8a8-te\n"
                      "activations: {timestep_groups: 2}\n"
                      "components: [unet, text_encoder]\n")
    out = tmp_path / "q"
    assert run("calibrate", "--model", MODEL, "--recipe", recipe, "--num-prompts", "2",
               "--out", out, *FAST) == 0
    assert (out / "text_encoder" / "diffq.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["components"] == ["unet", "text_encoder"]
    assert any(n.startswith("text_encoder.") for n in report["layers"])
    ev = tmp_path / "ev"
    assert run("eval", "--model", MODEL, "--quantized", out, "--num-images", "2", "--out", ev, *FAST) == 0
    assert json.loads((ev / "report.json").read_text())["components"] == ["unet", "text_encoder"]


def test_eval_fp_against_itself(tmp_path):
    out = tmp_path / "ev"
    assert run("eval", "--model", MODEL, "--num-images", "2", "--out", out, *FAST) == 0
    m = json.loads((out / "report.json").read_text())["metrics"]
    assert m["psnr_db"] == "inf" and m["ssim"] == pytest.approx(1.0, abs=1e-5)  # float SSIM
    assert m["clip_score"] == m["clip_score_fp"] and m["fid"] == m["fid_fp"]


def _one_line_exit_2(capsys, *args):
    assert run(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err
    return err


def test_bad_input_gives_one_line(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("un carr\xe9 rouge\n".encode("latin-1"))
    out = tmp_path / "out"
    no_t5 = tmp_path / "t5.yaml"  # a component tiny-sd does not have
    no_t5.write_text("name: w8-t5\ncomponents: [denoiser, text_encoder_3]\n")
    cases = [
        (["eval", "--model", tmp_path / "nope"], f"model directory {tmp_path / 'nope'} does not exist"),
        (["calibrate", "--model", tmp_path / "nope"], "does not exist"),
        (["calibrate", "--model", latin], "is a file, not a diffusers pipeline directory"),
        (["calibrate", "--model", tmp_path], "not a diffusers pipeline directory (no model_index.json)"),
        (["eval", "--model", MODEL, "--prompts", empty], "no prompts"),
        (["eval", "--model", MODEL, "--prompts", blank], "no prompts"),
        (["calibrate", "--model", MODEL, "--prompts", latin], "not UTF-8"),
        (["eval", "--model", MODEL, "--prompts", tmp_path / "missing.txt"], "does not exist"),
        (["eval", "--model", MODEL, "--num-images", "0"], "--num-images"),
        (["calibrate", "--model", MODEL, "--steps", "0"], "--steps"),
        (["calibrate", "--model", MODEL, "--recipe", "w3a3"], "unknown recipe"),
        (["calibrate", "--model", MODEL, "--steps", "2"], "timestep groups"),
        (["eval", "--model", MODEL, "--quantized", tmp_path / "nope"], "does not exist"),
        (["eval", "--model", MODEL, "--clip-model", tmp_path, "--inception-weights",
          tmp_path / "pt_inception.pth"], "does not exist"),
        (["eval", "--model", MODEL, "--clip-model", tmp_path], "needs both"),
        (["compare", "--model", MODEL, "--schemes", "fp,w3a3"], "unknown recipe"),
        (["compare", "--model", MODEL, "--schemes", ","], "names no scheme"),
        (["compare", "--model", MODEL, "--num-prompts", "0"], "--num-prompts"),
        (["eval", "--model", MODEL, "--batch-size", "0"], "--batch-size"),
        (["calibrate", "--model", MODEL, "--batch-size", "0"], "--batch-size"),
        (["calibrate", "--model", MODEL, "--height", "0"], "--height"),
        (["eval", "--model", MODEL, "--width", "-8"], "--width"),
        (["calibrate", "--model", MODEL, "--recipe", no_t5], "'text_encoder_3', which this pipeline lacks"),
        (["bench", "--model", tmp_path / "nope"], "not a pipeline folder nor a bench row"),
        (["bench", "--model", tmp_path], "has no unet"),
        (["bench", "--model", "tiny-sd,sd99"], "unknown bench rows sd99"),
        (["bench", "--schemes", "w9a9"], "unknown recipe 'w9a9'"),
        (["bench", "--batch", "0"], "--batch"),
        (["bench", "--lora", tmp_path], "no pytorch_lora_weights.safetensors"),
        (["bench", "--model", "bert", "--lora", LORA], "--lora applies to denoiser rows"),
        (["bench", "--repeats", "0"], "--repeats"),
        (["bench", "--threads", "0"], "--threads"),
    ]
    before = snapshot(tmp_path)
    for args, needle in cases:
        err = _one_line_exit_2(capsys, *args, "--out", out)
        assert needle in err, (args, err)
        assert snapshot(tmp_path) == before  # no output, cache or partial folder either
    out.mkdir()
    assert "exists" in _one_line_exit_2(capsys, "calibrate", "--model", MODEL, "--out", out)


def test_quantized_dir_of_another_model(capsys, tmp_path):
    import diffq
    from tests.conftest import ToyUNet

    other = tmp_path / "other"
    diffq.save(diffq.quantize(ToyUNet(), "w8"), other)
    err = _one_line_exit_2(capsys, "eval", "--model", MODEL, "--quantized", other,
                           "--out", tmp_path / "o", *FAST)
    assert "another architecture" in err or "shape" in err
    assert not (tmp_path / "o").exists()


def test_interrupted_calibration_resumes_to_the_same_statistics(tmp_path, monkeypatch, capsys):
    out = tmp_path / "w8a8"
    real = calibrate_mod.sample_latents  # one call per prompt batch of the statistics pass
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    args = ["calibrate", "--model", MODEL, "--num-prompts", "2", *FAST, "--batch-size", "1"]
    assert run(*args, "--out", tmp_path / "whole") == 0
    monkeypatch.setattr(calibrate_mod, "sample_latents", flaky)
    args += ["--out", out]
    capsys.readouterr()
    assert run(*args) == 130
    assert not out.exists() and (tmp_path / ".w8a8.calib-cache").is_dir()
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("diffq calibrate: 1 finished prompts are cached in")
    assert "--resume" in err[-1]
    assert run(*args, "--resume") == 0
    assert calls["n"] == 3  # the second batch ran again, the first did not
    resumed = load_file(str(out / "stats.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "stats.safetensors"))
    assert resumed.keys() == whole.keys()
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k


def test_compare_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    impossible = tmp_path / "impossible.yaml"  # a width budget this model cannot meet
    impossible.write_text("name: impossible\nmixed:\n  candidates:\n"
                          "    - {format: int4, granularity: per_group, group_size: 32}\n"
                          "    - {format: int8, granularity: per_channel}\n"
                          "  target_bits: 4.5\n  min_bits:\n    - {match: ['*'], bits: 8}\n")
    assert run("compare", "--model", MODEL, "--schemes", f"fp,naive-w8a8,{impossible},w8a8",
               "--num-images", "2", "--num-prompts", "2", "--out", out, *FAST) == 0
    table = capsys.readouterr().out
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["scheme"] for r in rows] == ["fp", "naive-w8a8", str(impossible), "w8a8"]
    assert rows[0]["psnr_db"] == "inf" and rows[3]["psnr_db"] > 15
    assert rows[0]["psnr_db_per_image"] == ["inf", "inf"]  # JSON has no infinity
    w8a8 = rows[3]
    assert min(w8a8["psnr_db_per_image"]) == w8a8["psnr_db_per_image"][w8a8["worst_image"]]
    assert f"{w8a8['psnr_db_min']:.2f} (seed {w8a8['worst_image']})" in table  # seeds start at 0
    assert "cannot be met" in rows[2]["error"] and "not run: " in table  # the others still ran
    assert "| w8a8 |" in table and (out / "grid.png").is_file()


def test_resume_refuses_a_cache_from_other_settings(capsys, tmp_path):
    out = tmp_path / "w8a8"
    cache = tmp_path / ".w8a8.calib-cache"
    cache.mkdir()
    meta = {k: str(v) for k, v in vars(calibrate_mod.CalibrateSettings(
        model=MODEL, num_prompts=2, steps=50, batch_size=2)).items()
            if k not in ("overwrite", "resume", "out")}
    (cache / "progress.json").write_text(json.dumps({"meta": {**meta, "recipe": "w8a8"}, "done": 1}))
    err = _one_line_exit_2(capsys, "calibrate", "--model", MODEL, "--num-prompts", "2", "--out", out,
                           "--resume", *FAST)
    assert "other settings (steps '50' -> '4')" in err and not out.exists()


def test_plain_rerun_says_what_it_discards(capsys, tmp_path):
    out = tmp_path / "w8a8"
    cache = tmp_path / ".w8a8.calib-cache"
    cache.mkdir()
    (cache / "progress.json").write_text(json.dumps({"meta": {"steps": "50"}, "done": 3}))
    assert run("calibrate", "--model", MODEL, "--num-prompts", "2", "--out", out, *FAST) == 0
    err = capsys.readouterr().err
    assert f"note: discarding 3 finished prompts cached in {cache}" in err and "--resume" in err
    assert not cache.exists() and (out / "report.md").is_file()


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_bench_table_and_json(kind, tmp_path, capsys):
    model = MODEL
    if kind == "dit":  # a tiny random PixArt saved as a user's folder
        model = tmp_path / "pixart"
        build("pixart")[0].save_pretrained(model)
    out = tmp_path / "bench.json"
    memory = [] if kind == "dit" else ["--no-memory"]  # one process per variant: measured once
    assert run("bench", "--model", model, "--repeats", "1", "--warmup", "0", "--layers", "1",
               "--out", out, *memory) == 0
    (row,) = json.loads(out.read_text())["rows"]
    if kind == "dit":
        peak = row["peak_mib"]
        assert set(peak) == {"fp32", "bf16", "w8a8"}
        assert all(p["peak_mib"] >= p["resident_mib"] > p["imports_mib"] > 50 for p in peak.values())
    else:
        assert "peak_mib" not in row
    assert set(row["seconds_per_unit"]) == {"fp32", "bf16", "w8a8"}
    assert all(0 < t < 60 for t in row["seconds_per_unit"].values())
    assert row["speedup_vs_bf16"]["bf16"] == 1.0
    secs, faster = row["seconds_per_unit"], row["faster_float"]
    assert secs[faster] == min(secs["fp32"], secs["bf16"]) and row["speedup_vs_faster_float"][faster] == 1.0
    # the random tiny PixArt keeps relatively more in float (scale-shift tables, embedders)
    wb = row["weight_bytes"]
    assert wb["w8a8"] < (0.6 if kind == "unet" else 0.8) * wb["bf16"] and wb["fp32"] == 2 * wb["bf16"]
    assert len(row["layers"]) == 1 and set(row["layers"][0]["seconds"]) == {"fp32", "bf16", "w8a8"}
    printed = capsys.readouterr().out
    assert "| row | variant |" in printed and "largest layers alone" in printed
    assert f"1.00x ({faster})" in printed
    assert bool(re.search(r"\| [\d,]+ \(\+[\d,]+\) \|", printed)) == (kind == "dit")  # peak (over imports)


def test_mixed_precision_calibrate_writes_allocation_and_figures(tmp_path):
    from diffq.checkpoint import load as load_checkpoint

    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(
        "name: mixed-test\n"
        "weights: {format: int8, clip: mse}\n"
        "activations: {timestep_groups: 2, split_skip: true}\n"
        "skip: [time_embedding.*, conv_in, conv_out]\n"
        "mixed:\n"
        "  candidates: [{format: int4, granularity: per_group, group_size: 64}, {format: int8}]\n"
        "  target_bits: 5.0\n"
        "  min_bits: [{match: ['*attn*.to_*'], bits: 8}]\n"
        "  prompts: 1\n"
        "  timesteps: 1\n")
    out = tmp_path / "q"
    assert run("calibrate", "--model", MODEL, "--recipe", recipe, "--num-prompts", "2", "--out", out,
               *FAST) == 0
    report = json.loads((out / "report.json").read_text())
    mixed = report["mixed"]
    assert mixed["average_bits"] <= 5.0 and set(mixed["bits"]) <= {"4", "8", "16"}
    assert all(b >= 8 for n, b in mixed["layers"].items() if ".attn" in n and ".to_" in n)
    assert mixed["measured_error"] > 0 and mixed["predicted_error"] > 0
    for f in ("sensitivity.png", "bits.png", "proxy.png"):
        assert (out / f).stat().st_size > 1000
    assert "## Mixed precision" in (out / "report.md").read_text()
    # the checkpoint holds the chosen per-layer widths as real storage
    from diffusers import UNet2DConditionModel

    unet = load_checkpoint(out / "unet", UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet"))
    fours = [n for n, b in mixed["layers"].items() if b == 4]
    assert fours
    q = unet.get_submodule(fours[0])
    assert q.qweight.dtype == torch.uint8  # two int4 codes per byte


def test_calibrate_publishes_the_model_when_figures_cannot_be_drawn(tmp_path, monkeypatch, capsys):
    """matplotlib unimportable: the quantized pipeline and statistics are still published, the
    command exits 0, and the missing figure is one warning line (and a line in report.md)."""
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "q"
    assert run("calibrate", "--model", MODEL, "--num-prompts", "2", "--out", out, *FAST) == 0
    assert (out / "unet" / "diffq.json").is_file() and (out / "stats.safetensors").is_file()
    assert not (out / "activation_ranges.png").exists()
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "activation_ranges.png not drawn" in warnings[0]
    assert "matplotlib" in warnings[0]
    report = (out / "report.md").read_text()
    assert "> warning: activation_ranges.png not drawn" in report
    assert "activation_ranges.png)" not in report  # no link to a figure that is not there
    assert json.loads((out / "report.json").read_text())["warnings"]
    assert not list(tmp_path.glob(".*"))


def test_global_switches_are_restored():
    """Thread count and the libraries' progress bars are process-wide: set only while needed."""
    from diffusers.utils import logging as dlog

    from diffq.commands.bench import torch_threads
    from diffq.integrations.pipeline import library_progress_bars

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    was = dlog.is_progress_bar_enabled()
    with library_progress_bars(not was):
        assert dlog.is_progress_bar_enabled() == (not was)
    assert dlog.is_progress_bar_enabled() == was


def test_bench_memory_failure_is_one_line_and_no_number(capsys):
    """A variant whose memory process fails (here: a row it cannot build) leaves the column
    empty for it and says why in one line, instead of failing the bench or printing a number."""
    from diffq.commands.bench import BenchSettings, _mib, _peak_mib

    assert _peak_mib("sd99", "bf16", 2, BenchSettings()) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: peak memory of sd99 bf16 not measured: ")
    assert err[0].endswith("error: --model 'sd99': not a pipeline folder nor a bench row "
                           "(tiny-sd, sd15, sd3, bert, llm-decode, all)")
    assert _mib(None) == "-" and _mib({"peak_mib": 700.0, "imports_mib": 400.0}) == "700 (+300)"


def test_bench_repeats_are_interleaved():
    from diffq.commands.bench import interleaved

    order = []
    secs = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                       repeats=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3  # warm-up each, then one call of each per round
    assert set(secs) == {"a", "b"} and all(v >= 0 for v in secs.values())


@pytest.mark.slow
def test_bench_encoder_and_decode_rows(tmp_path):
    out = tmp_path / "bench.json"
    assert run("bench", "--model", "bert,llm-decode", "--repeats", "1", "--warmup", "0",
               "--out", out) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows["bert"]["seconds_per_unit"]) == {"fp32", "bf16", "llm-w8a8-smoothquant"}
    decode = rows["llm-decode"]
    assert decode["unit"] == "token"
    assert {"llm-w8a8-smoothquant", "llm-w4a16-gptq"} <= set(decode["weight_bytes"])
    assert decode["weight_bytes"]["llm-w4a16-gptq"] < 0.4 * decode["weight_bytes"]["bf16"]


@pytest.mark.slow
def test_bench_with_a_lora_adapter(tmp_path):
    out = tmp_path / "bench.json"
    assert run("bench", "--lora", LORA, "--repeats", "1", "--warmup", "0", "--layers", "1", "--out", out) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert set(row["seconds_per_unit"]) == {"fp32 +lora", "bf16 +lora", "w8a8 +lora"}
    assert row["speedup_vs_bf16"]["bf16 +lora"] == 1.0 and len(row["layers"]) == 1


@pytest.mark.parametrize("native", [True, False])
def test_bench_keeps_float_ops_in_the_cpus_fast_float(native, monkeypatch):
    """Quantized variants keep their float ops in bf16 only where the CPU has bf16 in hardware
    (elsewhere bf16 ran 7x slower than fp32); the bf16 and fp32 variants stay what they say."""
    from diffq.commands import bench
    from diffq.ops import onednn
    from tests.conftest import ToyUNet, toy_calibration

    monkeypatch.setattr(onednn, "native_bf16", lambda: native)
    fp, calls = ToyUNet(), toy_calibration(4)
    want = torch.bfloat16 if native else torch.float32
    m, dtype = bench.variant(fp, "w8a8", calls)
    assert dtype == want and {p.dtype for p in m.parameters() if p.is_floating_point()} == {want}
    assert bench.variant(fp, "bf16", calls)[1] == torch.bfloat16
    assert bench.variant(fp, "fp32", calls)[1] == torch.float32


def test_faster_float_is_the_fastest_float_variant_compiled_or_not():
    secs = {"fp32": 3.0, "bf16": 2.0, "w8a8": 0.5, "fp32 +compile": 1.5, "bf16 +compile": 1.8,
            "w8a8 +compile": 0.4}
    assert faster_float(secs) == "fp32 +compile"
    assert faster_float({"fp32 +lora": 1.0, "bf16 +lora": 2.0, "w8a8 +lora": 0.1}) == "fp32 +lora"
