"""Print the weight SQNR table of the README: every format x granularity on a Gaussian matrix
(int4_i8, whose groups are integer multiples of a row scale, through its storage format)."""
import torch

from diffq.core import PerChannel, PerGroup, PerTensor, choose_qparams, fake_quantize, get_format, sqnr_db
from diffq.core.clip import mse_clip_qparams
from diffq.core.recipe import WeightSpec
from diffq.core.weights import quantize_weight

GRANULARITIES = {"per_tensor": PerTensor(), "per_channel": PerChannel(0), "per_group32": PerGroup(32),
                 "per_group64": PerGroup(64), "per_group128": PerGroup(128)}


def main() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    print("| format | " + " | ".join(GRANULARITIES) + " |")
    print("|---" * (len(GRANULARITIES) + 1) + "|")
    for name in ["int8", "int4", "fp8_e4m3", "fp8_e5m2", "nf4"]:
        fmt, row = get_format(name), []
        for g in GRANULARITIES.values():
            if name == "nf4" and not isinstance(g, PerGroup):
                row.append("-")
                continue
            cell = f"{sqnr_db(w, fake_quantize(w, choose_qparams(w, fmt, g), fmt, g)):.1f}"
            if fmt.kind == "int":  # plain range / with MSE clipping
                cell += f" / {sqnr_db(w, fake_quantize(w, mse_clip_qparams(w, fmt, g), fmt, g)):.1f}"
            row.append(cell)
        print(f"| {name} | " + " | ".join(row) + " |")
    def int4_i8(g: PerGroup, clip: str) -> str:
        spec = WeightSpec("int4_i8", "per_group", g.group_size, clip=clip)
        return f"{sqnr_db(w, quantize_weight(w, spec).dequantize()):.1f}"

    row = [f"{int4_i8(g, 'none')} / {int4_i8(g, 'mse')}" if isinstance(g, PerGroup) else "-"
           for g in GRANULARITIES.values()]
    print("| int4_i8 | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
