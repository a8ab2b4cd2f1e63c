"""Report figures: one line per distinct layer input; figures never cost the model."""
import torch

from diffq.calib.collector import LayerStats
from diffq.eval.plots import activation_range_plot, distinct_inputs, draw_optional, verification_plot


def _stats(scale: float) -> LayerStats:
    t = torch.tensor([1.0, 500.0, 999.0])
    minmax = torch.stack([-scale * t / 999, scale * t / 999], 1).unsqueeze(-1) + 0.01  # [T, 2, 1]
    return LayerStats(t, minmax, torch.zeros(3, 1, 8, dtype=torch.int64), torch.zeros(3, 1))


def test_layers_reading_one_input_are_one_line(tmp_path):
    stats = {f"up.{i}.time_emb_proj": _stats(2.0) for i in range(6)} | {"conv": _stats(5.0)}
    groups = distinct_inputs(stats)
    assert groups == {"up.0.time_emb_proj": [f"up.{i}.time_emb_proj" for i in range(6)],
                      "conv": ["conv"]}
    drawn = activation_range_plot(stats, torch.tensor([250.0, 500.0]), tmp_path / "a.png")
    assert sorted(drawn) == ["conv", "up.0.time_emb_proj"]
    assert (tmp_path / "a.png").stat().st_size > 1000 and not list(tmp_path.glob(".*"))


def test_a_failing_figure_is_one_warning():
    def broken():
        raise ValueError("no data")

    assert draw_optional("x.png", broken) == ([], "x.png not drawn: ValueError: no data")
    assert draw_optional("y.png", lambda: ["y.png"]) == (["y.png"], None)


def test_verification_figure_draws_every_choice_the_verifier_makes(tmp_path):
    """Widened layers are recorded as "dynamic (widened)" / "weight-only (widened)" (a Conv2d
    falls back to int8 weights with float inputs): the figure draws them, it does not fail."""
    sqnr = {"static": 30.0, "dynamic": 40.0, "percentile": 35.0}
    choices = ["static", "percentile", "dynamic", "dynamic (widened)", "weight-only (widened)", "float"]
    v = {"calls": 8, "sqnr_db": 33.0, "dynamic_sqnr_db": 36.0,
         "layers": {f"l{i}": {"sqnr_db": sqnr, "choice": c} for i, c in enumerate(choices)}}
    assert verification_plot(v, tmp_path) == ["verification.png"]
    assert (tmp_path / "verification.png").stat().st_size > 0
