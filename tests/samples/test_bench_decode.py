import subprocess
import sys
from pathlib import Path

import pytest

from diffq.ops import onednn

SCRIPT = Path(__file__).resolve().parents[2] / "samples" / "bench_decode.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--in-features", "256", "--out-features", "128",
                           "--threads", "1", *args], capture_output=True, text=True)


@pytest.mark.skipif(not onednn.available(), reason="oneDNN int8 kernels not in this torch build")
def test_dynamic_recipe_row_is_timed_on_the_int8_kernel():
    out = _run("--recipe", "llm-w7a8-smoothquant")
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("1x256x128, 1 threads: fp32 ") and "llm-w7a8-smoothquant" in line
    assert "onednn::qlinear_pointwise" in line.split("most time in:")[1]


def test_static_recipe_is_refused_in_one_line():
    out = _run("--recipe", "w8a8")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: recipe 'w8a8' has static activations")
    assert "Traceback" not in out.stderr


def test_unknown_recipe_is_refused_in_one_line():
    out = _run("--recipe", "no-such-recipe")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown recipe 'no-such-recipe'")
    assert "Traceback" not in out.stderr
