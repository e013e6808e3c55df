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
    "DETECTORS",
    "DETECTION_BACKBONES",
    "Recipe",
    "detection_schedule",
    "step_schedule",
    "init_checkpoint",
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


# Detection architectures (torchvision) and the ResNets they take as backbone.
DETECTORS = ("mask_rcnn", "faster_rcnn")
DETECTION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
# model.init=pretrained loads model.pretrained: a space can then search scratch vs pretrained.
PRETRAINED = "pretrained"


def init_checkpoint(model: "ModelConfig") -> Optional[str]:
    """The checkpoint a model starts from, or None for random initialization."""
    if model.init == "scratch":
        return None
    if model.init == PRETRAINED:
        if not model.pretrained:
            raise RecipeError("model.init=pretrained needs a checkpoint: --set model.pretrained=PATH (a ResNet file or a run's checkpoint)")
        return model.pretrained
    return model.init


class ModelConfig(_Section):
    """Architecture knobs a recipe may set (the architecture itself is ``name``)."""

    name: str = Field("resnet50", min_length=1, description="timm model name; detection: mask_rcnn or faster_rcnn")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth")
    norm: Literal["bn", "gn", "syncbn", "frozen_bn"] = "bn"
    init: str = Field("scratch", min_length=1, description="'scratch', 'pretrained' (= model.pretrained) or a local checkpoint path")
    pretrained: Optional[str] = Field(None, description="the checkpoint model.init=pretrained loads (lets a space search scratch vs pretrained)")
    zero_head: bool = Field(False, description="zero-initialize the classifier (BiT fine-tuning)")
    backbone: Optional[str] = Field(None, description="detection: the torchvision ResNet under the FPN")
    fpn_channels: int = Field(256, ge=32, le=1024, description="detection: FPN and head width (GN: a multiple of 32)")
    anchor_sizes: list[int] = Field([32, 64, 128, 256, 512], description="detection: RPN anchor size per FPN level")
    roi_batch_size: int = Field(512, ge=16, description="detection: sampled RoIs per image for the box head")
    proposals: int = Field(1000, ge=10, description="detection: RPN proposals kept per image at test (twice at training)")
    detections_per_image: int = Field(100, ge=1, description="detection: most detections kept per image (COCO's maxDets is 100)")

    @field_validator("anchor_sizes")
    @classmethod
    def _five_levels(cls, value: list[int]) -> list[int]:
        if len(value) != 5 or any(v <= 0 for v in value):
            raise ValueError(f"must be 5 positive sizes, one per FPN level (P2..P6), but got {value}")
        return value


class DataConfig(_Section):
    """Dataset, resolution and augmentation (timm ``create_transform`` arguments)."""

    name: str = Field("digits", min_length=1, description="'digits' or an ImageFolder root with train/ and val/; detection: 'digits-det' or a COCO root")
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
    max_images: Optional[int] = Field(None, ge=1, description="detection: at most this many training images (after fraction)")
    classes: Optional[list[int]] = Field(None, description="classification: keep these class indices, relabelled 0..k-1 in this order")
    shots_per_class: Optional[int] = Field(None, ge=1, description="classification: exactly this many seeded training examples per class")
    max_size: int = Field(1333, ge=8, le=8192, description="detection: longest image side after resizing")
    scale_jitter: float = Field(
        0.0, ge=0.0, lt=1.0, description="detection: train shorter side drawn from train_size * [1 - j, 1 + j]"
    )

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

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        if value is not None and (not value or len(set(value)) != len(value) or min(value) < 0):
            raise ValueError(f"must be distinct class indices >= 0, but got {value}")
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
    # Detection trains by iterations (detectron2 style): warmup, then LR / 10 at each step.
    iterations: Optional[int] = Field(None, ge=1, description="detection: training length in iterations")
    steps: Optional[list[int]] = Field(None, description="detection: iterations at which the LR is divided by 10")
    warmup_iters: int = Field(0, ge=0, description="detection: linear warmup length")
    warmup_factor: float = Field(0.001, gt=0.0, le=1.0, description="detection: warmup starts at lr * factor")
    eval_period: Optional[int] = Field(None, ge=1, description="detection: iterations per evaluation (= one Tune iteration)")
    multiplier: float = Field(
        1.0, gt=0.0, le=100.0, description="step schedules: length factor (detection: LR drops keep their distance to the end)"
    )
    hyperrule: Optional[Literal["full", "schedule"]] = Field(
        None, description="derive the recipe from the dataset at launch (BiT-HyperRule): full, or schedule (keep the resolution)"
    )

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

    task: Literal["classification", "detection"] = "classification"
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
        if self.task == "detection":
            _check_detection(self)
        elif self.data.name == "digits-det":
            raise ValueError("data.name=digits-det is a detection dataset: it needs task=detection (use data.name=digits)")
        elif self.schedule.iterations is not None:
            if self.schedule.eval_period is None:
                raise ValueError("a step schedule (schedule.iterations) needs schedule.eval_period")
            _check_steps(self)
        elif self.schedule.multiplier != 1.0:
            raise ValueError("schedule.multiplier scales step schedules (schedule.iterations); for epochs set schedule.epochs")
        return self


def _check_detection(recipe: "Recipe") -> None:
    model, schedule = recipe.model, recipe.schedule
    if model.name not in DETECTORS:
        raise ValueError(f"model.name must be one of {', '.join(DETECTORS)} for task=detection, but got {model.name!r}")
    if model.backbone not in DETECTION_BACKBONES:
        raise ValueError(
            f"model.backbone must be one of {', '.join(DETECTION_BACKBONES)} for task=detection, but got {model.backbone!r}"
        )
    if model.norm == "gn" and model.fpn_channels % 32:
        raise ValueError(f"model.fpn_channels must be a multiple of 32 with GroupNorm(32), but got {model.fpn_channels}")
    if recipe.data.name == "digits":
        raise ValueError("data.name=digits is a classification dataset; detection's embedded data is digits-det")
    if schedule.iterations is None or schedule.eval_period is None:
        raise ValueError("task=detection needs schedule.iterations and schedule.eval_period")
    _check_steps(recipe)
    unused = {
        "reg.mixup_alpha": recipe.reg.mixup_alpha,
        "reg.cutmix_alpha": recipe.reg.cutmix_alpha,
        "reg.label_smoothing": recipe.reg.label_smoothing,
        "reg.ema_decay": recipe.reg.ema_decay,
        "data.repeated_aug": recipe.data.repeated_aug,
        "data.rand_augment": recipe.data.rand_augment,
    }
    for key, value in unused.items():
        if value:
            raise ValueError(f"{key} is a classification setting; task=detection takes 0 or null, but got {value!r}")


def _check_steps(recipe: "Recipe") -> None:
    schedule = recipe.schedule
    steps = schedule.steps or []
    if sorted(steps) != steps or any(not 0 < s < schedule.iterations for s in steps):
        raise ValueError(f"schedule.steps must increase within (0, {schedule.iterations}), but got {steps}")
    iterations, steps, warmup = step_schedule(recipe)
    if any(s <= warmup for s in steps) or warmup >= iterations:
        raise ValueError(
            f"schedule.multiplier={schedule.multiplier:g} leaves {iterations} iterations with LR drops at {steps}: "
            f"every drop must come after the {warmup} warmup iterations"
        )


def step_schedule(recipe: "Recipe") -> tuple[int, list[int], int]:
    """(iterations, LR-drop steps, warmup iterations) of a step schedule after ``schedule.multiplier``.

    Detection, as in *Rethinking ImageNet Pre-training*: a longer schedule keeps
    the LR drops at the same distance from the end (1x = 90k with drops in the
    last 60k and 20k; 3x = 270k with drops at 210k and 250k), only the first
    phase grows. Classification, as the BiT-HyperRule: drops and warmup sit at
    fixed fractions of the schedule, so all of them scale.
    """
    schedule = recipe.schedule
    if recipe.task == "detection":
        return (*detection_schedule(schedule), schedule.warmup_iters)
    scale = schedule.multiplier
    return round(schedule.iterations * scale), [round(s * scale) for s in (schedule.steps or [])], round(schedule.warmup_iters * scale)


def detection_schedule(schedule: "ScheduleConfig") -> tuple[int, list[int]]:
    """(iterations, LR-drop steps) of a detection schedule (see ``step_schedule``)."""
    iterations = round(schedule.iterations * schedule.multiplier)
    return iterations, [iterations - (schedule.iterations - s) for s in (schedule.steps or [])]


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
