import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _start(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, str(ROOT / "samples" / script), "--smoke", "--out", str(out), *extra],
        check=False, capture_output=True, text=True, env=env, timeout=300,
    )


def _run(script: str, out: Path) -> str:
    proc = _start(script, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_tiny_clip_smoke_training(tmp_path):
    stdout = _run("train_tiny_clip.py", tmp_path / "clip")
    assert "top-1" in stdout
    assert (tmp_path / "clip" / "model.safetensors").is_file()
    assert (tmp_path / "clip" / "vocab.json").is_file()


def test_tiny_sd_smoke_training(tmp_path):
    stdout = _run("train_tiny_sd.py", tmp_path / "sd")
    assert "evaluator top-1" in stdout
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "sd" / sub).is_dir()
    assert (tmp_path / "sd" / "model_index.json").is_file()


def test_tiny_sd_stops_after_a_vae_below_the_gate(tmp_path):
    # Two VAE steps reconstruct nothing: the evaluator cannot be near 0.99 on them.
    proc = _start("train_tiny_sd.py", tmp_path / "sd", "--vae-gate", "0.99")
    assert proc.returncode != 0
    assert "VAE below the gate" in proc.stderr
    assert not (tmp_path / "sd").exists()


def test_tiny_sd_rejects_bad_heads_and_threads(tmp_path):
    for extra in (("--heads", "3"), ("--heads", "0"), ("--vae-threads", "0")):
        proc = _start("train_tiny_sd.py", tmp_path / "sd", *extra)
        assert proc.returncode == 2, extra
        assert proc.stderr.strip().splitlines()[-1].startswith("train_tiny_sd.py: error: --"), proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "sd").exists()


def test_tiny_dit_smoke_training(tmp_path):
    stdout = _run("train_tiny_dit.py", tmp_path / "dit")
    assert "[dit] step 1" in stdout
    index = (tmp_path / "dit" / "model_index.json").read_text()
    assert "PixArtAlphaPipeline" in index
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "dit" / sub).is_dir()
