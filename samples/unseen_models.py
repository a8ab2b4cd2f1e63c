"""#19's table: built-in recipes on a denoiser nobody here trained (tests/unseen_models.py: an
EDM-style plain nn.Module UNet, sigma as second argument, class conditioning, InstanceNorm,
planted outlier channels and layer inputs over seven orders of magnitude; calibrated on 5 noise
levels x 2 samples, measured on other samples at the same noise levels), plus the
verification each default run reports. Output SQNR of D(x; sigma) vs fp32.

    python samples/unseen_models.py          # from the repository root
"""
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffq  # noqa: E402
from diffq.core import sqnr_db  # noqa: E402
from tests.unseen_models import edm_calls, edm_net  # noqa: E402


def main() -> None:
    net = edm_net()
    held_out = edm_calls(100)
    with torch.no_grad():
        ref = torch.cat([net(*a) for a, _ in held_out])
    print("| recipe | SQNR dB | layers quantized | kept float (role) |")
    print("|---|---|---|---|")
    for recipe in ("w8", "w8a8-dynamic", "naive-w8a8", "w8a8-static", "w8a8"):
        m = diffq.quantize(copy.deepcopy(net), recipe, calibration=edm_calls(0),
                           timestep_of=lambda a, k: a[1])  # sigma, the second argument
        with torch.no_grad():
            db = sqnr_db(ref, torch.cat([m(*a) for a, _ in held_out]))
        rep = m.diffq.report
        print(f"| {recipe} | {db:.2f} | {len(rep.quantized)} | {', '.join(rep.skipped) or '-'} |")
        if rep.verification:
            v = rep.verification
            choices = {}
            for d in v["layers"].values():
                choices[d["choice"]] = choices.get(d["choice"], 0) + 1
            print(f"|  verification | {v['sqnr_db']:.2f} on {v['calls']} held-back calls "
                  f"(all-dynamic {v['dynamic_sqnr_db']:.2f}) | {choices} | |")


if __name__ == "__main__":
    main()
