"""The recipe schema: everything besides the architecture that decides accuracy.

A recipe is a nested pydantic model whose dotted keys (``optim.lr``,
``reg.mixup_alpha``) are the contract for ``--set``, search spaces, MLflow params
and JSON output. Field names follow the factory arguments they feed in timm
(``create_optimizer_v2``, ``create_scheduler_v2``, ``Mixup``, ``create_transform``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spaces.errors import RecipeError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "Recipe",
    "flatten",
    "unflatten",
    "parse_value",
    "parse_overrides",
    "apply_overrides",
    "validate_recipe",
    "recipe_to_yaml",
]


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of timm's registry that recipes may name."""

    name: str
    description: str
    uses_momentum: bool = False


@dataclass(frozen=True)
class ScheduleSpec:
    """One LR schedule of timm's ``create_scheduler_v2`` that recipes may name."""

    name: str
    description: str


# Names are timm's (``timm.optim.list_optimizers()``); a test checks each one there.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("lamb", "LAMB, layer-wise adaptive (ResNet strikes back)"),
        OptimizerSpec("adamw", "AdamW, decoupled weight decay"),
        OptimizerSpec("sgd", "SGD with Nesterov momentum", uses_momentum=True),
        OptimizerSpec("momentum", "SGD with classic (heavy-ball) momentum", uses_momentum=True),
        OptimizerSpec("lars", "LARS, layer-wise trust ratio on SGD", uses_momentum=True),
        OptimizerSpec("adam", "Adam"),
        OptimizerSpec("rmsproptf", "RMSProp, TensorFlow flavour", uses_momentum=True),
        OptimizerSpec("lion", "Lion, sign momentum"),
    )
}

SCHEDULES: dict[str, ScheduleSpec] = {
    spec.name: spec
    for spec in (
        ScheduleSpec("cosine", "cosine decay to min_lr after a linear warmup"),
        ScheduleSpec("step", "LR times decay_rate every decay_epochs"),
        ScheduleSpec("multistep", "LR times decay_rate at each milestone"),
        ScheduleSpec("poly", "polynomial decay"),
        ScheduleSpec("tanh", "tanh decay"),
    )
}

UNKNOWN_NAME = "unknown {what} {name!r}; available: {available}"


def _known(what: str, registry: dict[str, Any], name: str) -> str:
    if name not in registry:
        raise ValueError(UNKNOWN_NAME.format(what=what, name=name, available=", ".join(sorted(registry))))
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelConfig(_Section):
    """Architecture knobs a recipe may set (the architecture itself is ``name``)."""

    name: str = Field("resnet50", min_length=1, description="timm model name")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth")
    norm: Literal["bn", "gn", "syncbn", "frozen_bn"] = "bn"
    init: str = Field("scratch", min_length=1, description="'scratch' or a local checkpoint path")


class DataConfig(_Section):
    """Dataset, resolution and augmentation (timm ``create_transform`` arguments)."""

    name: str = Field("digits", min_length=1, description="'digits' or an ImageFolder root with train/ and val/")
    train_size: int = Field(224, ge=8, le=4096)
    test_size: int = Field(224, ge=8, le=4096)
    crop_pct: float = Field(0.95, gt=0.0, le=1.0, description="test crop ratio")
    scale: tuple[float, float] = Field((0.08, 1.0), description="random resized crop area range")
    interpolation: Literal["bicubic", "bilinear", "nearest", "random"] = "bicubic"
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="horizontal flip probability")
    rand_augment: Optional[str] = Field(None, description="timm RandAugment string, e.g. rand-m7-mstd0.5-inc1")
    repeated_aug: int = Field(0, ge=0, le=16, description="repeated augmentation count, 0 = off")
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="random erasing probability")
    color_jitter: Optional[float] = Field(None, ge=0.0, le=1.0, description="color jitter strength, null = off")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="seeded stratified subset of the training set")

    @field_validator("rand_augment")
    @classmethod
    def _rand_augment_string(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.startswith("rand-m"):
            raise ValueError(f"must be a timm RandAugment string such as 'rand-m7-mstd0.5-inc1' or null, but got {value!r}")
        return value

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"must be [low, high] with 0 < low <= high <= 1, but got {list(value)}")
        return value

    @field_validator("repeated_aug")
    @classmethod
    def _repeat_count(cls, value: int) -> int:
        if value == 1:
            raise ValueError("must be 0 (off) or a repeat count of at least 2, but got 1")
        return value


class OptimConfig(_Section):
    """Optimizer (timm ``create_optimizer_v2``) and batch."""

    name: str = "lamb"
    lr: float = Field(5e-3, gt=0.0, le=100.0)
    weight_decay: float = Field(0.01, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    batch_size: int = Field(256, ge=1, description="global batch over all workers")
    grad_clip: Optional[float] = Field(None, gt=0.0, description="max gradient norm, null = off")

    @field_validator("name")
    @classmethod
    def _optimizer_name(cls, value: str) -> str:
        return _known("optimizer", OPTIMIZERS, value)


class ScheduleConfig(_Section):
    """LR schedule (timm ``create_scheduler_v2``), stepped every iteration."""

    name: str = "cosine"
    epochs: int = Field(100, ge=1)
    warmup_epochs: int = Field(5, ge=0)
    warmup_lr: float = Field(1e-6, ge=0.0)
    min_lr: float = Field(1e-6, ge=0.0)
    decay_rate: float = Field(0.1, gt=0.0, le=1.0, description="step/multistep: LR factor at each decay")
    decay_epochs: Optional[float] = Field(None, gt=0.0, description="step: epochs between decays")
    decay_milestones: Optional[list[int]] = Field(None, description="multistep: epochs at which the LR decays")

    @field_validator("name")
    @classmethod
    def _schedule_name(cls, value: str) -> str:
        return _known("schedule", SCHEDULES, value)

    @model_validator(mode="after")
    def _warmup_fits(self) -> "ScheduleConfig":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"schedule.warmup_epochs must be < schedule.epochs ({self.epochs}), but got {self.warmup_epochs}"
            )
        if self.name == "multistep" and not self.decay_milestones:
            raise ValueError("schedule.decay_milestones is required by schedule.name=multistep (e.g. [30, 60, 90])")
        if self.name == "step" and self.decay_epochs is None:
            raise ValueError("schedule.decay_epochs is required by schedule.name=step")
        if self.decay_milestones and (sorted(self.decay_milestones) != self.decay_milestones or not 0 < self.decay_milestones[0] or self.decay_milestones[-1] >= self.epochs):
            raise ValueError(
                f"schedule.decay_milestones must increase within (0, {self.epochs}), but got {self.decay_milestones}"
            )
        return self


class RegConfig(_Section):
    """Regularization: mixup/cutmix/label smoothing (timm ``Mixup``) and EMA."""

    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    ema_decay: Optional[float] = Field(None, gt=0.0, lt=1.0, description="EMA of weights, null = off")


class LossConfig(_Section):
    """Loss: timm ``BinaryCrossEntropy`` or soft-target cross-entropy."""

    name: Literal["bce", "ce"] = "ce"
    target_threshold: Optional[float] = Field(
        None, gt=0.0, lt=1.0, description="BCE only: soft targets above it become 1 (ignored for ce)"
    )


class RuntimeConfig(_Section):
    """Where and how a trial runs."""

    amp: bool = Field(True, description="bf16 autocast on GPU; CPU runs in fp32")
    seed: int = Field(0, ge=0)
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP when > 1)")
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile the model")


class Recipe(_Section):
    """A full training recipe."""

    task: Literal["classification"] = "classification"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    reg: RegConfig = Field(default_factory=RegConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        if self.model.norm == "syncbn" and (self.runtime.gpus_per_worker <= 0 or self.runtime.workers < 2):
            raise ValueError(
                "model.norm=syncbn needs several GPU workers (runtime.workers > 1 and "
                "runtime.gpus_per_worker > 0): SyncBatchNorm layers only work with GPU modules; "
                f"got workers={self.runtime.workers}, gpus_per_worker={self.runtime.gpus_per_worker}"
            )
        if self.optim.batch_size < self.runtime.workers:
            raise ValueError(
                f"optim.batch_size must be >= runtime.workers ({self.runtime.workers}), but got {self.optim.batch_size}"
            )
        return self


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-after"))
        msg = item["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown recipe key {loc!r}")
            continue
        if item["type"].startswith(("literal_error", "enum")):
            parts.append(f"{loc}: {msg[0].lower()}{msg[1:]}, but got {item['input']!r}")
            continue
        if "but got" in msg or "input" not in item or isinstance(item["input"], dict):
            got = ""
        else:
            got = f", but got {item['input']!r}"
        msg = msg[0].lower() + msg[1:]
        if not loc or msg.startswith((loc, "unknown", "model.", "data.", "optim.", "schedule.")):
            parts.append(f"{msg}{got}" if not msg.startswith("unknown") else msg)
        else:
            parts.append(f"{loc}: {msg}{got}")
    return "; ".join(parts)


def validate_recipe(data: dict[str, Any] | Recipe) -> Recipe:
    """Build a ``Recipe`` from nested data, raising ``RecipeError`` naming key and value."""
    if isinstance(data, Recipe):
        data = data.model_dump()
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"invalid recipe: {_format_validation_error(err)}") from None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"optim.lr": ...}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = list(value) if isinstance(value, tuple) else value
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": ...}`` -> nested dict."""
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


_KNOWN_KEYS = frozenset(flatten(Recipe().model_dump()))


def known_keys() -> frozenset[str]:
    """Every dotted recipe key."""
    return _KNOWN_KEYS


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as a YAML scalar or list (``0.1``, ``null``, ``[0.2, 1.0]``)."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["optim.lr=0.1"]`` -> ``{"optim.lr": 0.1}``; keys are checked against the schema."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"--set takes KEY=VALUE, but got {pair!r}")
        overrides[key] = parse_value(value)
    check_keys(overrides)
    return overrides


def check_keys(flat: dict[str, Any], where: str = "--set") -> None:
    """Fail on dotted keys that are not recipe fields, listing the section's keys."""
    for key in flat:
        if key not in _KNOWN_KEYS:
            section = key.split(".")[0]
            siblings = sorted(k for k in _KNOWN_KEYS if k.startswith(section + "."))
            hint = f"; keys of {section!r}: {', '.join(siblings)}" if siblings else f"; sections: {', '.join(sorted({k.split('.')[0] for k in _KNOWN_KEYS}))}"
            raise RecipeError(f"unknown recipe key {key!r} in {where}{hint}")


def apply_overrides(base: dict[str, Any] | Recipe, overrides: dict[str, Any]) -> dict[str, Any]:
    """Base recipe (nested) + dotted overrides -> nested dict (not yet validated)."""
    if isinstance(base, Recipe):
        base = base.model_dump()
    flat = flatten(base)
    flat.update(overrides)
    return unflatten(flat)


def recipe_to_yaml(recipe: Recipe) -> str:
    """A recipe as YAML that ``load_recipe_file`` reads back."""
    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False)
