"""Recipes: what to quantize and how, as small frozen dataclasses loaded from strict YAML."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from diffq.core.config import from_dict, to_dict
from diffq.core.granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken
from diffq.errors import RecipeError

WeightFormat = Literal["int8", "int4", "fp8_e4m3", "fp8_e5m2", "nf4", "q8_0"]


@dataclass(frozen=True)
class WeightSpec:
    """How a layer's weight is stored. The weight is viewed as [out, in * kh * kw];
    per-group scales run along that reduction dimension. `q8_0` is GGUF's block-32 layout."""

    format: WeightFormat = "int8"
    granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel"
    group_size: int = 128
    symmetric: bool = True
    clip: Literal["none", "mse"] = "none"
    scale_dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def validate(self) -> None:
        if self.format == "q8_0" and (
            self.granularity != "per_group" or self.group_size != 32 or not self.symmetric
        ):
            raise RecipeError("weights.format 'q8_0' is per_group with group_size 32, symmetric")
        if not self.symmetric and self.format.startswith(("fp8", "nf4")):
            raise RecipeError(f"weights.format {self.format!r} cannot be asymmetric")
        if self.group_size <= 0 or self.group_size % 2:
            raise RecipeError(f"weights.group_size must be a positive even number, got {self.group_size}")
        if self.format == "nf4" and self.granularity != "per_group":
            raise RecipeError("weights.format 'nf4' needs granularity 'per_group'")

    @property
    def bits(self) -> int:
        return 4 if self.format in ("int4", "nf4") else 8

    def granularity_obj(self) -> Granularity:
        if self.granularity == "per_tensor":
            return PerTensor()
        if self.granularity == "per_channel":
            return PerChannel(0)
        return PerGroup(self.group_size)


@dataclass(frozen=True)
class ActivationSpec:
    """How a layer's input activation is quantized at run time.

    static: scales from calibration, one table entry per timestep group (K = timestep_groups,
    split where layer ranges change most, or into equal counts with "uniform"); dynamic:
    per-token scales computed on the fly (no calibration). split_skip: layers consuming
    cat(h, skip) in a UNet's up path get one scale per half.
    """

    format: Literal["int8", "fp8_e4m3"] = "int8"
    mode: Literal["static", "dynamic"] = "static"
    granularity: Literal["per_tensor", "per_token"] = "per_tensor"
    symmetric: bool = True
    observer: Literal["minmax", "percentile", "mse", "kl"] = "minmax"
    percentile: float = 99.99
    timestep_groups: int = 1
    timestep_grouping: Literal["range", "uniform"] = "range"
    split_skip: bool = False

    def validate(self) -> None:
        if self.mode == "static" and self.granularity != "per_tensor":
            raise RecipeError("activations: static mode needs granularity 'per_tensor'")
        if self.mode == "dynamic" and self.granularity != "per_token":
            raise RecipeError("activations: dynamic mode needs granularity 'per_token'")
        if self.timestep_groups < 1:
            raise RecipeError(f"activations.timestep_groups must be >= 1, got {self.timestep_groups}")
        if not 50.0 < self.percentile <= 100.0:
            raise RecipeError(f"activations.percentile must be in (50, 100], got {self.percentile}")
        if not self.symmetric and (self.format != "int8" or self.observer != "minmax"):
            raise RecipeError("activations: asymmetric quantization needs format int8 and "
                              "observer minmax")
        if self.observer in ("mse", "kl") and self.format != "int8":
            raise RecipeError(f"activations.observer {self.observer!r} needs format int8")

    def granularity_obj(self, feature_axis: int) -> Granularity:
        return PerToken(feature_axis) if self.granularity == "per_token" else PerTensor()


@dataclass(frozen=True)
class Override:
    """Layers whose name matches any `match` glob get these specs (complete specs, not patches)."""

    match: list[str]
    weights: WeightSpec | None = None
    activations: ActivationSpec | None = None
    keep_float: bool = False


@dataclass(frozen=True)
class LayerPlan:
    """The resolved scheme of one layer."""

    weights: WeightSpec
    activations: ActivationSpec | None


@dataclass(frozen=True)
class Recipe:
    """A quantization recipe. `skip` globs name layers kept in float (e.g. "conv_in")."""

    name: str = "custom"
    description: str = ""
    weights: WeightSpec = field(default_factory=WeightSpec)
    activations: ActivationSpec | None = None
    skip: list[str] = field(default_factory=list)
    overrides: list[Override] = field(default_factory=list)
    # pipeline components `diffq calibrate` quantizes; text encoders get timestep_groups 1
    components: list[Literal["unet", "transformer", "text_encoder", "text_encoder_2"]] = field(
        default_factory=lambda: ["unet"])

    def validate(self) -> None:
        if not self.components:
            raise RecipeError("recipe key 'components' must name at least one component")

    def for_text_encoder(self) -> Recipe:
        """This recipe for a component without timesteps: one activation group, no skip split."""
        def flat(a):
            return None if a is None else replace(a, timestep_groups=1, split_skip=False)

        return replace(self, activations=flat(self.activations),
                       overrides=[replace(o, activations=flat(o.activations)) for o in self.overrides])

    def plan_for(self, layer_name: str) -> LayerPlan | None:
        """The scheme for `layer_name`, or None when it stays float. Later overrides win."""
        if any(fnmatch.fnmatchcase(layer_name, p) for p in self.skip):
            return None
        plan = LayerPlan(self.weights, self.activations)
        for ov in self.overrides:
            if any(fnmatch.fnmatchcase(layer_name, p) for p in ov.match):
                if ov.keep_float:
                    return None
                plan = LayerPlan(ov.weights or plan.weights, ov.activations or plan.activations)
        return plan

    def patterns(self) -> list[str]:
        return [*self.skip, *(p for ov in self.overrides for p in ov.match)]

    def needs_calibration(self) -> bool:
        specs = [self.activations, *(ov.activations for ov in self.overrides)]
        return any(s is not None and s.mode == "static" for s in specs)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        return from_dict(cls, data)

    def with_name(self, name: str) -> Recipe:
        return replace(self, name=name)


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in `recipes/`."""
    root = resources.files("diffq.recipes")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _parse_yaml(text: str, origin: str) -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "syntax error"
        raise RecipeError(f"{origin}: not valid YAML ({first})") from None
    if data is None:
        raise RecipeError(f"{origin}: the recipe is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping of keys, got {type(data).__name__}")
    try:
        return Recipe.from_dict(data)
    except RecipeError as e:
        raise RecipeError(f"{origin}: {e}") from None


def load_recipe(recipe: str | Path | Recipe) -> Recipe:
    """A Recipe object, a built-in name ("w8a8", "w8", "w4g64", ...) or a path to a YAML file."""
    if isinstance(recipe, Recipe):
        return recipe
    text_name = str(recipe)
    builtin = resources.files("diffq.recipes") / f"{text_name}.yaml"
    if "/" not in text_name and not text_name.endswith((".yaml", ".yml")) and builtin.is_file():
        return _parse_yaml(builtin.read_text(encoding="utf-8"), f"recipe {text_name!r}")
    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(
            f"unknown recipe {text_name!r}: not a built-in ({', '.join(builtin_recipes())}) "
            "and no such YAML file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: recipe file is not UTF-8 text") from None
    return _parse_yaml(text, str(path))
