import json

import pytest
import torch
from torch import nn

import diffq
from diffq import checkpoint
from diffq.errors import CheckpointError
from tests.conftest import ToyUNet, assert_same_state, toy_calibration


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    m = diffq.quantize(ToyUNet(), "w4g64")
    return m, diffq.save(m, tmp_path / "ck")


@pytest.mark.parametrize("recipe", ["w8", "w4g64", "nf4", "q8_0", "fp8-weights", "w8a8-dynamic"])
def test_round_trip_is_bit_exact(recipe, tmp_path):
    torch.manual_seed(0)
    m = diffq.quantize(ToyUNet(), recipe, calibration=toy_calibration(1))  # q8_0's roles: one call
    x, t = toy_calibration(1)[0]
    with torch.no_grad():
        y = m(x, t)
    diffq.save(m, tmp_path / "ck")
    m2 = diffq.load(tmp_path / "ck", ToyUNet())
    assert_same_state(m, m2)
    with torch.no_grad():
        assert torch.equal(m2(x, t), y)
    assert m2.diffq.recipe.name == recipe


def test_tied_weights_round_trip(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 32)
            self.proj = nn.Linear(32, 32)
            self.head = nn.Linear(32, 16, bias=False)
            self.head2 = nn.Embedding(16, 32)
            self.head2.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.proj(self.emb(ids)))

    m = diffq.quantize(Tied(), "w8")
    diffq.save(m, tmp_path / "ck")
    m2 = diffq.load(tmp_path / "ck", Tied())
    ids = torch.arange(8)
    assert torch.equal(m(ids), m2(ids))


def test_missing_and_corrupt_directories(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match="does not exist"):
        diffq.load(tmp_path / "nope", ToyUNet())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffq checkpoint"):
        diffq.load(tmp_path / "empty", ToyUNet())
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        diffq.load(path, ToyUNet())
    (path / "diffq.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        diffq.load(path, ToyUNet())


def test_truncated_tensor_file(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        diffq.load(path, ToyUNet())


def test_newer_format_version(saved):
    _, path = saved
    meta = json.loads((path / "diffq.json").read_text())
    meta["format_version"] = checkpoint.FORMAT_VERSION + 1
    (path / "diffq.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="newer than this diffq"):
        diffq.load(path, ToyUNet())


def test_wrong_model(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="shape"):
        diffq.load(path, ToyUNet(c=32))
    with pytest.raises(CheckpointError, match="does not exist in the model"):
        diffq.load(path, nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(CheckpointError, match="already quantized"):
        diffq.load(path, diffq.quantize(ToyUNet(), "w4g64"))


def test_save_refuses_existing_and_unquantized(saved, tmp_path):
    m, path = saved
    with pytest.raises(CheckpointError, match="exists; pass --overwrite"):
        diffq.save(m, path)
    diffq.save(m, path, overwrite=True)
    with pytest.raises(CheckpointError, match="no quantized layers"):
        diffq.save(ToyUNet(), tmp_path / "x")


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    m = diffq.quantize(ToyUNet(), "w8")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        diffq.save(m, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_static_activation_tables_survive(tmp_path):
    torch.manual_seed(0)
    m = diffq.quantize(ToyUNet(), "w8a8", calibration=toy_calibration(8))
    diffq.save(m, tmp_path / "ck")
    m2 = diffq.load(tmp_path / "ck", ToyUNet())
    assert torch.equal(m.mid.input_quant.scale, m2.mid.input_quant.scale)
    assert m2.mid.input_quant.scale.shape[0] == 4
    x, t = toy_calibration(1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(m(x, t * 0.3), m2(x, t * 0.3))


def _edit_tensors(path, edit):
    """Rewrite model.safetensors with `edit(tensors)` applied, keeping its header metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    file = path / checkpoint.TENSOR_FILE
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata=meta)


def _first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


@pytest.mark.parametrize("case", ["flipped int bytes", "swapped tensors", "flipped float weight"])
def test_tampered_tensors_are_refused_by_name(saved, case):
    m, path = saved

    def edit(t):
        if case == "flipped int bytes":
            k = _first(t, "qweight")
            t[k].view(-1)[:7] ^= 0x5A
        elif case == "swapped tensors":
            same = [k for k in sorted(t) if k.endswith("weight_scale")]
            a, b = next((a, b) for a in same for b in same
                        if a < b and t[a].shape == t[b].shape and not torch.equal(t[a], t[b]))
            t[a], t[b] = t[b].clone(), t[a].clone()
        else:
            k = _first(t, "conv_in.weight")
            t[k].view(-1)[0] += 1e-3

    _edit_tensors(path, edit)
    with pytest.raises(CheckpointError, match=r"tensor '.+' differs from the digest recorded"):
        diffq.load(path, ToyUNet())
    diffq.load(path, ToyUNet(), verify_hashes=False)  # the documented escape hatch


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_scales_are_refused_even_without_hashes(saved, bad):
    m, path = saved

    def edit(t):
        t[_first(t, "weight_scale")].view(-1)[3] = bad

    _edit_tensors(path, edit)
    for hashes in (True, False):
        with pytest.raises(CheckpointError, match=r"weight_scale' holds NaN or Inf"):
            diffq.load(path, ToyUNet(), verify_hashes=hashes)


def test_digest_of_every_saved_tensor_is_recorded(saved):
    m, path = saved
    meta = json.loads((path / checkpoint.META_FILE).read_text())
    assert set(meta["tensors"]) == set(m.state_dict())
    assert all(v.split(":")[1].isalnum() and len(v.split(":")[1]) == 64 for v in meta["tensors"].values())


def test_verified_digests_are_reused_not_recomputed(saved, monkeypatch):
    m, path = saved
    loaded = diffq.load(path, ToyUNet())
    meta = json.loads((path / checkpoint.META_FILE).read_text())
    known = checkpoint.verify(loaded, meta["tensors"], "here")
    assert known == meta["tensors"]  # every tensor kept its dtype, so every one was checked
    calls = []
    real = checkpoint.tensor_digest
    monkeypatch.setattr(checkpoint, "tensor_digest", lambda t: calls.append(1) or real(t))
    assert checkpoint.tensor_digests(loaded, known) == meta["tensors"] and not calls
