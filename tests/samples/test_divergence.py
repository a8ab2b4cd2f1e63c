import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "samples" / "divergence.py"


def test_missing_quantized_directory_is_one_line_exit_2(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--quantized", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("divergence.py: error: ") and "nope" in last
    assert "Traceback" not in out.stderr
