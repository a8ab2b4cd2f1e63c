import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path


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


def test_a_checkout_shadows_no_installed_package():
    # `python -m pytest` and scripts put the checkout first on sys.path, so a folder there with an
    # __init__.py wins over an installed package of that name: kernels/__init__.py once hid Hugging
    # Face's `kernels`, which transformers imports (every CLIP model failed to load)
    root = Path(__file__).resolve().parents[1]
    packages = {p.parent.name for p in root.glob("*/__init__.py")} - {"diffq"}
    assert packages <= {"recipes", "tests"}  # kernels/gpu/ is diffq.kernels: no kernels/__init__.py
    assert not packages & set(packages_distributions())


def test_transformers_imports_beside_the_checkout():
    code = "import transformers.activations, diffq.kernels; print(diffq.kernels.interpreting())"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
