"""Slow: the issue's quality targets on the reference pipeline (python -m pytest -m slow)."""
import json

import pytest

from diffq import cli


@pytest.mark.slow
def test_default_compare_meets_the_w8a8_targets(tmp_path):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--out", str(out), "--no-progress"]) == 0
    rows = {r["scheme"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    fp, w8a8 = rows["fp"], rows["w8a8"]
    assert w8a8["psnr_db"] >= 37.5  # #19: the batch never below the 37.5 dB of earlier tables
    assert w8a8["psnr_db_min"] >= 30  # ... and no image leaves the FP trajectory
    assert w8a8["psnr_db"] > rows["naive-w8a8"]["psnr_db"]
    assert w8a8["psnr_db"] > rows["w8a8-static"]["psnr_db"]
    assert abs(w8a8["clip_score"] / fp["clip_score"] - 1) <= 0.005
    assert abs(w8a8["fid"] / fp["fid"] - 1) <= 0.03
    assert w8a8["weight_bytes"] <= rows["q8_0"]["weight_bytes"]
