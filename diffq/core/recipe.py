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
from diffq.core.storage import Layout, storage_format
from diffq.errors import RecipeError

WeightFormat = Literal["int8", "int7", "int4", "int4_i8", "fp8_e4m3", "fp8_e5m2", "nf4", "q8_0"]
# what a layer does in the network, found by tracing one call (see diffq.calib.structure)
Role = Literal["input", "output", "embedding", "modulation", "context", "skip"]


@dataclass(frozen=True)
class GPTQOptions:
    """Settings of `weights.method: gptq` (see `diffq.algos.gptq`): columns per lazy-update
    block, quantization order by decreasing input energy, all group scales chosen up front,
    and the diagonal damping as a fraction of mean(diag H)."""

    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01

    def validate(self) -> None:
        if self.block_size < 1:
            raise RecipeError(f"weights.gptq.block_size must be >= 1, got {self.block_size}")
        if not 0.0 <= self.damp < 1.0:
            raise RecipeError(f"weights.gptq.damp must be in [0, 1), got {self.damp}")


@dataclass(frozen=True)
class WeightSpec:
    """How a layer's weight is stored. The weight is viewed as [out, in * kh * kw];
    per-group scales run along that reduction dimension. `q8_0` is GGUF's block-32 layout.

    method: how the codes are chosen: round-to-nearest, GPTQ (error feedback through the input
    Hessian) or AWQ (activation-aware input-channel scaling); the last two need calibration.
    """

    format: WeightFormat = "int8"
    granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel"
    group_size: int = 128
    symmetric: bool = True
    clip: Literal["none", "mse"] = "none"
    scale_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    method: Literal["rtn", "gptq", "awq"] = "rtn"
    gptq: GPTQOptions | None = None  # None: the defaults

    def validate(self) -> None:
        if self.gptq is not None and self.method != "gptq":
            raise RecipeError(f"weights.gptq is set but weights.method is {self.method!r}")
        if self.group_size <= 0 or self.group_size % 2:
            raise RecipeError(f"weights.group_size must be a positive even number, got {self.group_size}")
        storage_format(self.format).check(self)

    def layout(self) -> Layout:
        """How weights under this spec are stored (the format may pin some fields)."""
        return storage_format(self.format).layout(self)

    @property
    def bits(self) -> int:
        return self.layout().bits

    def gptq_options(self) -> GPTQOptions:
        return self.gptq or GPTQOptions()

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
    cat(h, skip) in a UNet's up path get one scale per half. smoothing: SmoothQuant on Linear
    layers (dynamic mode only): inputs divided per channel by s, weights multiplied; s from
    `smooth_alpha`, or with α searched on calibration samples when it is null.
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
    smoothing: Literal["none", "smoothquant"] = "none"
    smooth_alpha: float | None = None
    # LLM.int8(): input channels whose calibrated max |x| reaches this stay in 16-bit (at most
    # max_outliers per layer, a fixed count so that checkpoints have static shapes)
    outlier_threshold: float | None = None
    max_outliers: int = 64
    # tokens at the start of a [B, L, C] input that stay out of the calibrated range and are
    # multiplied with float activations: the BOS row of CLIP text states entering
    # cross-attention K/V is the same for every prompt and, in SD-class models, an outlier
    # tens of times larger than the other tokens, which would set the whole tensor's scale
    float_prefix: int = 0

    def validate(self) -> None:
        if self.smoothing != "none" and self.mode != "dynamic":
            # static scales would have to be calibrated on the smoothed inputs
            raise RecipeError("activations.smoothing needs mode 'dynamic'")
        if self.smooth_alpha is not None and (self.smoothing == "none" or not 0 <= self.smooth_alpha <= 1):
            raise RecipeError(f"activations.smooth_alpha must be in [0, 1] with smoothing set, "
                              f"got {self.smooth_alpha}")
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
        if self.outlier_threshold is not None and (self.mode != "dynamic" or self.smoothing != "none"):
            raise RecipeError("activations.outlier_threshold needs mode 'dynamic' without smoothing")
        if self.float_prefix < 0:
            raise RecipeError(f"activations.float_prefix must be >= 0, got {self.float_prefix}")
        if self.outlier_threshold is not None and (self.outlier_threshold <= 0 or self.max_outliers < 1):
            raise RecipeError("activations.outlier_threshold must be > 0 and max_outliers >= 1")

    def granularity_obj(self, feature_axis: int) -> Granularity:
        return PerToken(feature_axis) if self.granularity == "per_token" else PerTensor()


@dataclass(frozen=True)
class Override:
    """Layers whose name matches any `match` glob, or that play any of `roles`, get these specs
    (complete specs, not patches)."""

    match: list[str] = field(default_factory=list)
    weights: WeightSpec | None = None
    activations: ActivationSpec | None = None
    keep_float: bool = False
    roles: list[Role] = field(default_factory=list)

    def validate(self) -> None:
        if not self.match and not self.roles:
            raise RecipeError("an override needs 'match' (name globs) or 'roles'")

    def applies(self, layer_name: str, roles: frozenset[str]) -> bool:
        return (any(fnmatch.fnmatchcase(layer_name, p) for p in self.match)
                or bool(roles & set(self.roles)))


@dataclass(frozen=True)
class MinBits:
    """Policy: layers matching `match` never get fewer than `bits` weight bits (16 = float)."""

    match: list[str]
    bits: int


@dataclass(frozen=True)
class MixedSpec:
    """Sensitivity-driven mixed precision: each quantized layer gets one of `candidates` (or
    float when allow_float) so that the summed measured sensitivity is minimal under the budget:
    `target_bits` (average nominal weight width over those layers), `max_bytes` (their real
    storage, scales included) or `max_ratio` (the whole model's weight bytes, counted as
    `diffq.weight_bytes` does, over its bf16 bytes). Sensitivity is measured on `prompts`
    calibration prompts at `timesteps` denoising steps each (or that many calibration items for
    plain models)."""

    candidates: list[WeightSpec]
    target_bits: float | None = None
    max_bytes: int | None = None
    max_ratio: float | None = None
    allow_float: bool = True
    min_bits: list[MinBits] = field(default_factory=list)
    prompts: int = 8
    timesteps: int = 5

    def validate(self) -> None:
        widths = [c.bits for c in self.candidates] + ([16] if self.allow_float else [])
        if not self.candidates or len(set(widths)) != len(widths):
            raise RecipeError("mixed.candidates: give one weight spec per distinct width")
        if sum(b is not None for b in (self.target_bits, self.max_bytes, self.max_ratio)) != 1:
            raise RecipeError("mixed: set exactly one of target_bits, max_bytes and max_ratio")
        if self.max_ratio is not None and not 0 < self.max_ratio <= 1:
            raise RecipeError(f"mixed.max_ratio must be in (0, 1], got {self.max_ratio}")
        if self.target_bits is not None and not min(widths) <= self.target_bits <= max(widths):
            raise RecipeError(f"mixed.target_bits {self.target_bits} is outside the candidate "
                              f"widths {min(widths)}..{max(widths)}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise RecipeError("mixed.max_bytes must be positive")
        if self.prompts < 1 or self.timesteps < 1:
            raise RecipeError("mixed.prompts and mixed.timesteps must be >= 1")
        for rule in self.min_bits:
            if rule.bits not in (4, 8, 16):
                raise RecipeError(f"mixed.min_bits: bits must be 4, 8 or 16, got {rule.bits}")

    def min_bits_for(self, layer_name: str) -> int:
        return max((r.bits for r in self.min_bits
                    if any(fnmatch.fnmatchcase(layer_name, p) for p in r.match)), default=0)


@dataclass(frozen=True)
class KVCacheSpec:
    """Key/value cache of a causal LM stored as symmetric int8 codes with one scale per
    (batch, head, token), so new tokens append without re-quantizing the old ones."""

    format: Literal["int8"] = "int8"
    scale_dtype: Literal["float32", "float16", "bfloat16"] = "float32"


@dataclass(frozen=True)
class AttentionSpec:
    """softmax(Q K^T) V with Q and K as int8 (SageAttention: K minus its mean over the tokens,
    one scale per block of rows), V and the softmax in float. Applies wherever a diffusers
    attention processor calls scaled_dot_product_attention without a mask; masked calls
    (padded text in cross-attention) stay on float SDPA."""

    format: Literal["int8"] = "int8"
    block_q: int = 128
    block_k: int = 64

    def validate(self) -> None:
        for key in ("block_q", "block_k"):
            if getattr(self, key) < 1:
                raise RecipeError(f"attention.{key} must be at least 1, got {getattr(self, key)}")


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
    # roles kept in float whatever their names (e.g. [input, output, embedding])
    keep_float: list[Role] = field(default_factory=list)
    overrides: list[Override] = field(default_factory=list)
    # pipeline components `diffq calibrate` quantizes ("denoiser": the UNet or the DiT, whichever
    # the pipeline has); text encoders get timestep_groups 1
    components: list[Literal["denoiser", "unet", "transformer", "text_encoder", "text_encoder_2",
                             "text_encoder_3"]] = field(default_factory=lambda: ["denoiser"])
    # per-layer widths chosen by measured sensitivity (resolved into overrides before quantizing)
    mixed: MixedSpec | None = None
    # causal LMs: key/value cache format at generation time (None: float)
    kv_cache: KVCacheSpec | None = None
    # int8 Q K^T in the model's attention (None: float attention)
    attention: AttentionSpec | None = None
    # calibrate one decoder block at a time on the quantized previous block's outputs
    # (None: yes for causal LMs whose recipe needs layer inputs)
    sequential: bool | None = None
    # static int8 activations: hold calibration calls back, measure every layer and the whole
    # model on them, fall back (observer, dynamic) where static scales fall out of line
    verify: bool = True

    def validate(self) -> None:
        if not self.components:
            raise RecipeError("recipe key 'components' must name at least one component")

    def for_text_encoder(self) -> Recipe:
        """This recipe for a component without timesteps: one activation group, no skip split."""
        def flat(a):
            return None if a is None else replace(a, timestep_groups=1, split_skip=False)

        return replace(self, activations=flat(self.activations), keep_float=[],
                       overrides=[replace(o, activations=flat(o.activations)) for o in self.without_roles()])

    def without_roles(self) -> list[Override]:
        """The overrides that match by name (role rules dropped), for models no call traces."""
        return [replace(o, roles=[]) for o in self.overrides if o.match]

    def plan_for(self, layer_name: str, roles: frozenset[str] = frozenset()) -> LayerPlan | None:
        """The scheme for `layer_name` playing `roles`, or None when it stays float. Later
        overrides win."""
        if any(fnmatch.fnmatchcase(layer_name, p) for p in self.skip) or roles & set(self.keep_float):
            return None
        plan = LayerPlan(self.weights, self.activations)
        for ov in self.overrides:
            if ov.applies(layer_name, roles):
                if ov.keep_float:
                    return None
                plan = LayerPlan(ov.weights or plan.weights, ov.activations or plan.activations)
        return plan

    def uses_roles(self) -> bool:
        """Whether resolving this recipe needs the layers' roles (one traced call)."""
        return bool(self.keep_float) or any(ov.roles for ov in self.overrides)

    def patterns(self) -> list[str]:
        mixed = [p for r in self.mixed.min_bits for p in r.match] if self.mixed else []
        return [*self.skip, *(p for ov in self.overrides for p in ov.match), *mixed]

    def resolve_mixed(self, widths: dict[str, WeightSpec | None]) -> Recipe:
        """This recipe with the chosen per-layer weight specs (None: float) as exact-name
        overrides appended last, and no `mixed` section left to resolve."""
        extra = [Override(match=[n], weights=w, keep_float=w is None) for n, w in widths.items()]
        return replace(self, mixed=None, overrides=[*self.overrides, *extra])

    def needs_calibration(self) -> bool:
        specs = [self.activations, *(ov.activations for ov in self.overrides)]
        weights = [self.weights, *(ov.weights for ov in self.overrides)]
        return (any(s is not None and (s.mode == "static" or s.smoothing != "none"
                                       or s.outlier_threshold is not None) for s in specs)
                or any(w is not None and w.method != "rtn" for w in weights))

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


def _read_yaml(text: str, origin: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(getattr(e, "problem", None) or str(e).splitlines()[0] or "syntax error")
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"{origin}: not valid YAML{where} ({first})") from None
    if data is None:
        raise RecipeError(f"{origin}: the recipe is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping of keys, got {type(data).__name__}")
    return data


def _source(recipe: str | Path, relative_to: Path | None = None) -> tuple[str, str, Path | None]:
    """(YAML text, name for messages, folder a relative `extends` resolves in) of a built-in
    name or a YAML path (relative paths from `relative_to` when given)."""
    text_name = str(recipe)
    builtin = resources.files("diffq.recipes") / f"{text_name}.yaml"
    if "/" not in text_name and not text_name.endswith((".yaml", ".yml")) and builtin.is_file():
        return builtin.read_text(encoding="utf-8"), f"recipe {text_name!r}", None
    path = Path(recipe)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if not path.is_file():
        raise RecipeError(
            f"unknown recipe {text_name!r}: not a built-in ({', '.join(builtin_recipes())}) "
            "and no such YAML file"
        )
    try:
        return path.read_text(encoding="utf-8"), str(path), path.parent
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: recipe file is not UTF-8 text") from None


def _merge(base: dict, patch: dict) -> dict:
    """`patch` over `base`: mappings merge key by key, `overrides` append to the base's (later
    overrides win), any other value replaces."""
    out = dict(base)
    for k, v in patch.items():
        if k == "overrides" and isinstance(v, list) and isinstance(base.get(k), list):
            out[k] = base[k] + v
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            out[k] = _merge(base[k], v)
        else:
            out[k] = v
    return out


def _resolve(data: dict, origin: str, folder: Path | None, seen: tuple[str, ...] = ()) -> dict:
    """A recipe's keys with `extends: <built-in or YAML path>` applied (the base's name and
    description are not inherited)."""
    base_ref = data.get("extends")
    if base_ref is None:
        return data
    if not isinstance(base_ref, str):
        raise RecipeError(f"{origin}: 'extends' names one recipe (a built-in name or a YAML path), "
                          f"got {base_ref!r}")
    text, base_origin, base_folder = _source(base_ref, folder)
    if base_origin in seen:
        raise RecipeError(f"{origin}: 'extends' goes round in a circle "
                          f"({' -> '.join((*seen, base_origin))})")
    base = _resolve(_read_yaml(text, base_origin), base_origin, base_folder, (*seen, base_origin))
    base = {k: v for k, v in base.items() if k not in ("name", "description")}
    return _merge(base, {k: v for k, v in data.items() if k != "extends"})


def _parse(text: str, origin: str, folder: Path | None) -> Recipe:
    data = _resolve(_read_yaml(text, origin), origin, folder, (origin,))
    try:
        return Recipe.from_dict(data)
    except RecipeError as e:
        raise RecipeError(f"{origin}: {e}") from None


def load_recipe(recipe: str | Path | Recipe) -> Recipe:
    """A Recipe object, a built-in name ("w8a8", "w8", "w4g64", ...) or a path to a YAML file.
    A recipe may start from another with `extends: <name or path>` and change what differs."""
    if isinstance(recipe, Recipe):
        return recipe
    text, origin, folder = _source(recipe)
    return _parse(text, origin, folder)
