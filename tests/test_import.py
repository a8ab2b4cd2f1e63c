import subprocess
import sys


def test_import_diffq_stays_light():
    code = ("import sys, diffq; heavy = [m for m in ('diffusers', 'transformers', 'triton', "
            "'accelerate', 'torchmetrics') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_import_diffq_leaves_the_import_system_alone():
    code = ("import sys; before = list(sys.meta_path); import diffq; "
            "print(sys.meta_path == before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
