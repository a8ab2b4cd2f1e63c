"""Triton kernel tests (`-m triton`). Without a CUDA GPU they run in Triton's CPU interpreter,
which must be switched on before triton is first imported (tests/conftest.py does so too, since
collecting other test modules imports diffusers, which imports triton); each test module skips
itself when triton is not installed."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> str:
    """Where the kernels run: the GPU when there is one, else the interpreter's CPU tensors."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (on CPU)."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return float((out - ref).norm() / ref.norm())
