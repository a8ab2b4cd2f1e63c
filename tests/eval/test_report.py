"""The eval grid: FP, quantized and their difference, the worst images first, with captions."""
import torch
from PIL import Image

from diffq.eval.grid import image_grid
from diffq.eval.report import eval_grid


def _image(value: int) -> Image.Image:
    return Image.new("RGB", (16, 16), (value, value, value))


def test_eval_grid_puts_the_worst_images_first(gen):
    fp = [_image(100) for _ in range(6)]
    noise = torch.randint(0, 3, (6,), generator=gen).tolist()
    q = [_image(100 + n) for n in noise]
    q[4] = _image(160)  # by far the worst pair
    grid = eval_grid(fp, q, "w8a8", [f"prompt {i}" for i in range(6)], max_cols=4)
    assert grid.size[0] == 4 * (16 * 2 + 2) + 2  # 4 columns at scale 2, 2 px padding

    def cell_top(row: int) -> int:  # padding, rows of (label 14 + cell 32 + padding 2)
        return 2 + row * (14 + 32 + 2) + 14

    assert grid.getpixel((7, cell_top(1) + 5)) == (160, 160, 160)  # quantized, first column
    assert grid.getpixel((7, cell_top(2) + 5)) == (240, 240, 240)  # |160 - 100| x4


def test_captions_make_the_grid_taller_and_wrap():
    rows = [[_image(0), _image(255)]]
    plain = image_grid(rows, ["a"])
    captioned = image_grid(rows, ["a"], captions=["a long prompt that needs wrapping", "x"])
    assert captioned.size[0] == plain.size[0] and captioned.size[1] > plain.size[1] + 11
