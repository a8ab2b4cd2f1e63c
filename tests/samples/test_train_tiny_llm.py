import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_llm_smoke_training(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "llm"
    proc = subprocess.run([sys.executable, str(ROOT / "samples" / "train_tiny_llm.py"), "--smoke",
                           "--out", str(out)], check=False, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "train.json").read_text())
    assert meta["steps"] == 5 and meta["heldout_tokens"] > 1000
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "corpus-heldout.txt").read_text() and json.loads((out / "config.json").read_text())[
        "architectures"] == ["LlamaForCausalLM"]
