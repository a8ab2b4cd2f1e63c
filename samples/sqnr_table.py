"""Print the weight SQNR table of the README: every format x granularity on a Gaussian matrix."""
import torch
from diffq.core import *
from diffq.core.granularity import PerGroup
from diffq.core.clip import mse_clip_qparams
torch.manual_seed(0)
w = torch.randn(256, 512)
grans = {"per_tensor": PerTensor(), "per_channel": PerChannel(0), "per_group32": PerGroup(32), "per_group64": PerGroup(64), "per_group128": PerGroup(128)}
print("| format | " + " | ".join(grans) + " |")
for f in ["int8", "int4", "fp8_e4m3", "fp8_e5m2", "nf4"]:
    fmt = get_format(f); row=[]
    for g in grans.values():
        if f=="nf4" and not isinstance(g, PerGroup): row.append("-"); continue
        qp = choose_qparams(w, fmt, g); row.append(f"{sqnr_db(w, fake_quantize(w, qp, fmt, g)):.1f}")
        if f in ("int4","int8"):
            qp = mse_clip_qparams(w, fmt, g); row[-1] += f" / {sqnr_db(w, fake_quantize(w, qp, fmt, g)):.1f}"
    print(f"| {f} | " + " | ".join(row) + " |")
