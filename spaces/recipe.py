"""The recipe schema: everything besides the architecture that decides accuracy.

A recipe is a nested pydantic model whose dotted keys (``optim.lr``,
``reg.mixup_alpha``) are the contract for ``--set``, search spaces, MLflow params
and JSON output. Field names follow the factory arguments they feed in timm
(``create_optimizer_v2``, ``create_scheduler_v2``, ``Mixup``, ``create_transform``).

There is one recipe per task, a discriminated union on ``task``: shared sections
(optimizer, runtime, the step-schedule fields) are common models, and each task
holds only the keys it uses. A key that applies only under a condition
(``optim.momentum`` for optimizers with momentum, ``loss.target_threshold`` for
BCE, the epoch or the step fields of a classification schedule) is dropped when
it does not apply, so dumps, MLflow params and ``best -o`` show what a run used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from spaces.errors import RecipeError, short
from spaces.optimizers import optimizer_names, takes_momentum

_RAND_AUGMENT = re.compile(r"rand-m\d+(\.\d+)?(-(mstd|mmax|inc|m|n|p|w)\d+(\.\d+)?)*")  # timm's RandAugment config

__all__ = [
    "TASKS",
    "SCHEDULES",
    "DETECTORS",
    "DETECTION_BACKBONES",
    "PRETRAINED",
    "ClassificationRecipe",
    "DetectionRecipe",
    "Recipe",
    "CONDITIONS",
    "check_applies",
    "detection_schedule",
    "step_schedule",
    "init_checkpoint",
    "flatten",
    "unflatten",
    "parse_value",
    "parse_overrides",
    "apply_overrides",
    "task_keys",
    "known_keys",
    "check_keys",
    "drop_legacy_keys",
    "validate_recipe",
    "recipe_to_yaml",
]

TASKS = ("classification", "detection")


@dataclass(frozen=True)
class ScheduleSpec:
    """One LR schedule of timm's ``create_scheduler_v2`` that recipes may name."""

    name: str
    description: str
    takes_decay_rate: bool = False  # step/multistep: LR factor; poly: the power


# timm's create_scheduler_v2 returns None for a name it does not know: this registry is the check.
SCHEDULES: dict[str, ScheduleSpec] = {
    spec.name: spec
    for spec in (
        ScheduleSpec("cosine", "cosine decay to min_lr after a linear warmup"),
        ScheduleSpec("step", "LR times decay_rate every decay_epochs", takes_decay_rate=True),
        ScheduleSpec("multistep", "LR times decay_rate at each milestone", takes_decay_rate=True),
        ScheduleSpec("poly", "polynomial decay, power decay_rate", takes_decay_rate=True),
        ScheduleSpec("tanh", "tanh decay"),
    )
}

UNKNOWN_NAME = "unknown {what} {name!r}; available: {available}"
OTHER_TASK_KEY = "{key} is a {owner} key; {recipe} is {task}"


def _check_optimizer(name: str) -> str:
    available = optimizer_names()
    if name not in available:
        raise ValueError(UNKNOWN_NAME.format(what="optimizer", name=name, available=", ".join(available)))
    return name


def _known(what: str, registry: dict[str, Any], name: str) -> str:
    if name not in registry:
        raise ValueError(UNKNOWN_NAME.format(what=what, name=name, available=", ".join(sorted(registry))))
    return name


class _Section(BaseModel):
    """A recipe section. Fields in ``conditional`` are left out of dumps when they do not apply (None)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    conditional: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_inapplicable(self, handler: Any) -> Any:
        data = handler(self)
        for key in self.conditional:
            if data.get(key, 0) is None:
                del data[key]
        return data


def _not_applying(data: Any, fields: tuple[str, ...]) -> Any:
    """Before-validation: the fields that do not apply become None (and leave the dumps)."""
    if isinstance(data, dict):
        data = {**data, **{f: None for f in fields}}
    return data


def _defaults(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Before-validation: the fields that apply get their defaults where unset."""
    return {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}


# -- model ---------------------------------------------------------------------------------
DETECTORS = ("mask_rcnn", "faster_rcnn")
DETECTION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
# model.init=pretrained loads model.pretrained: a space can then search scratch vs pretrained.
PRETRAINED = "pretrained"
Norm = Literal["bn", "gn", "syncbn", "frozen_bn"]


def norm_family(norm: str) -> str:
    """The pretrained backbone a norm loads: a GN one for gn, a BN one for bn, syncbn and frozen_bn."""
    return "gn" if norm == "gn" else "bn"


class ModelConfig(_Section):
    """What every task's model takes: name, normalization, initialization."""

    name: str = Field("resnet50", min_length=1, description="timm model name; detection: mask_rcnn or faster_rcnn")
    norm: Norm = "bn"
    init: str = Field("scratch", min_length=1, description="'scratch', 'pretrained' (= model.pretrained) or a local checkpoint path")
    pretrained: Optional[str] = Field(
        None, description="the checkpoint model.init=pretrained loads (lets a space search scratch vs pretrained); "
        "or one per backbone norm, {gn: ..., bn: ...}, each trial taking its norm's (bn serves bn, syncbn and frozen_bn)",
    )

    @model_validator(mode="before")
    @classmethod
    def _pretrained_of_the_norm(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("pretrained"), dict):
            by_norm = data["pretrained"]
            norm = data.get("norm", cls.model_fields["norm"].default)
            family = norm_family(norm)
            if family not in by_norm:
                raise ValueError(f"model.pretrained has checkpoints for {', '.join(sorted(by_norm))}, none for model.norm={norm}")
            data = {**data, "pretrained": by_norm[family]}
        return data


class ClassificationModel(ModelConfig):
    """A timm classifier."""

    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth")
    zero_head: bool = Field(False, description="zero-initialize the classifier (BiT fine-tuning)")


class DetectionModel(ModelConfig):
    """A torchvision Mask / Faster R-CNN on a ResNet + FPN."""

    name: Literal["mask_rcnn", "faster_rcnn"] = "mask_rcnn"
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = Field("resnet50", description="the torchvision ResNet under the FPN")
    fpn_channels: int = Field(256, ge=32, le=1024, description="FPN and head width (GN: a multiple of 32)")
    anchor_sizes: list[int] = Field([32, 64, 128, 256, 512], description="RPN anchor size per FPN level")
    roi_batch_size: int = Field(512, ge=16, description="sampled RoIs per image for the box head")
    proposals: int = Field(1000, ge=10, description="RPN proposals kept per image at test (twice at training)")
    detections_per_image: int = Field(100, ge=1, description="most detections kept per image (COCO's maxDets is 100)")
    freeze_at: int = Field(
        0, ge=0, le=5, description="detectron2's FREEZE_AT: backbone stages kept frozen (1 the stem, 2 the stem and res2, ... 5 all); "
        "0 trains every layer (from scratch)",
    )

    @field_validator("anchor_sizes")
    @classmethod
    def _five_levels(cls, value: list[int]) -> list[int]:
        if len(value) != 5 or any(v <= 0 for v in value):
            raise ValueError(f"must be 5 positive sizes, one per FPN level (P2..P6), but got {value}")
        return value

    @model_validator(mode="after")
    def _gn_groups(self) -> "DetectionModel":
        if self.norm == "gn" and self.fpn_channels % 32:
            raise ValueError(f"model.fpn_channels must be a multiple of 32 with GroupNorm(32), but got {self.fpn_channels}")
        if self.freeze_at and self.init == "scratch":
            raise ValueError(f"model.freeze_at={self.freeze_at} would freeze randomly initialized stages: from scratch it is 0")
        return self


def init_checkpoint(model: ModelConfig) -> Optional[str]:
    """The checkpoint a model starts from, or None for random initialization."""
    if model.init == "scratch":
        return None
    if model.init == PRETRAINED:
        if not model.pretrained:
            raise RecipeError("model.init=pretrained needs a checkpoint: --set model.pretrained=PATH (a ResNet file or a run's checkpoint)")
        return model.pretrained
    return model.init


# -- data ----------------------------------------------------------------------------------
class DataConfig(_Section):
    """What every task's data takes: the dataset, sizes, flips, a seeded subset."""

    name: str = Field("digits", min_length=1, description="'digits' or an ImageFolder root with train/ and val/; detection: 'digits-det' or a COCO root")
    train_size: int = Field(224, ge=8, le=4096, description="train resolution (detection: shorter side)")
    test_size: int = Field(224, ge=8, le=4096, description="test resolution (detection: shorter side)")
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="horizontal flip probability")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="seeded subset of the training set")


class ClassificationData(DataConfig):
    """Resolution and augmentation (timm ``create_transform`` arguments), class splits and shots."""

    crop: Literal["timm", "bit"] = Field(
        "timm", description="timm: random-resized crop (scale), test resize + center crop (crop_pct); "
        "bit: BiT's train squash to (train_size x precrop) squared + random train_size crop, test squash to test_size",
    )
    precrop: float = Field(
        1.25, ge=1.0, le=4.0, description="crop=bit: train images are squashed to round(train_size x precrop) square before "
        "the random crop (BiT: 160/128 = 1.25, 448/384 = 1.1667)",
    )
    crop_pct: Optional[float] = Field(None, gt=0.0, le=1.0, description="test crop ratio (crop=timm); null: the model's pretrained config (timm)")
    scale: tuple[float, float] = Field((0.08, 1.0), description="random resized crop area range (crop=timm)")
    interpolation: Optional[Literal["bicubic", "bilinear", "nearest", "random"]] = Field(
        None, description="resize interpolation; null: the model's pretrained config (timm)",
    )
    mean: Optional[tuple[float, float, float]] = Field(None, description="input normalization; null: the model's pretrained config (timm)")
    std: Optional[tuple[float, float, float]] = Field(None, description="input normalization; null: the model's pretrained config (timm)")
    rand_augment: Optional[str] = Field(None, description="timm RandAugment string, e.g. rand-m7-mstd0.5-inc1")
    repeated_aug: int = Field(0, ge=0, le=16, description="repeated augmentation count, 0 = off")
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="random erasing probability")
    color_jitter: Optional[float] = Field(None, ge=0.0, le=1.0, description="color jitter strength, null = off")
    classes: Optional[list[int]] = Field(None, description="keep these class indices, relabelled 0..k-1 in this order")
    shots_per_class: Optional[int] = Field(None, ge=1, description="exactly this many seeded training examples per class")

    @field_validator("name")
    @classmethod
    def _classification_data(cls, value: str) -> str:
        if value == "digits-det":
            raise ValueError("data.name=digits-det is a detection dataset: it needs task=detection (use data.name=digits)")
        return value

    @field_validator("rand_augment")
    @classmethod
    def _rand_augment_string(cls, value: Optional[str]) -> Optional[str]:
        # timm skips a section it cannot read ("rand-mgarbage" would be RandAugment at its defaults): refuse it here.
        if value is not None and not _RAND_AUGMENT.fullmatch(value):
            raise ValueError(
                "must be a timm RandAugment string such as 'rand-m7-mstd0.5-inc1' (sections m, n, mstd, mmax, inc, p, w "
                f"with a number) or null, but got {short(value)}"
            )
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


class DetectionData(DataConfig):
    """A COCO root, its seeded subsets and the detector's resizing."""

    name: str = Field("digits-det", min_length=1, description="'digits-det' or a COCO root (annotations/instances_train*.json, train*/, val*/)")
    max_images: Optional[int] = Field(None, ge=1, description="at most this many training images (after fraction)")
    train_size: Union[Annotated[int, Field(ge=8, le=4096)], Annotated[list[Annotated[int, Field(ge=8, le=4096)]], Field(min_length=1)]] = Field(
        224, description="train shorter side, or a list of them drawn per image (detectron2's multi-scale training, e.g. [640, 672, 704, 736, 768, 800])",
    )
    max_size: int = Field(1333, ge=8, le=8192, description="longest image side after resizing")
    scale_jitter: float = Field(0.0, ge=0.0, lt=1.0, description="train shorter side drawn from train_size * [1 - j, 1 + j]")

    @model_validator(mode="after")
    def _one_way_to_vary_the_size(self) -> "DetectionData":
        if isinstance(self.train_size, list) and self.scale_jitter:
            raise ValueError("data.scale_jitter varies a single data.train_size: with a list of train sizes set it to 0")
        return self

    @field_validator("name")
    @classmethod
    def _detection_data(cls, value: str) -> str:
        if value == "digits":
            raise ValueError("data.name=digits is a classification dataset; detection's embedded data is digits-det")
        return value


# -- optimizer -----------------------------------------------------------------------------
class OptimConfig(_Section):
    """Optimizer (timm ``create_optimizer_v2``) and batch; ``momentum`` only for optimizers that take it."""

    conditional: ClassVar[frozenset[str]] = frozenset({"momentum"})

    name: str = "lamb"
    lr: float = Field(5e-3, gt=0.0, le=100.0)
    weight_decay: float = Field(0.01, ge=0.0)
    momentum: Optional[float] = Field(None, ge=0.0, lt=1.0, description="optimizers with momentum only [default 0.9]")
    batch_size: int = Field(256, ge=1, description="global batch over all workers")
    grad_clip: Optional[float] = Field(None, gt=0.0, description="max gradient norm, null = off")

    @model_validator(mode="before")
    @classmethod
    def _momentum_applies(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("name", "lamb"), str):
            return data
        name = data.get("name", "lamb")
        if name not in optimizer_names():
            return data  # the name's own check says what is wrong
        if takes_momentum(name):
            return _defaults(data, {"momentum": 0.9})
        return _not_applying(data, ("momentum",))

    @field_validator("name")
    @classmethod
    def _optimizer_name(cls, value: str) -> str:
        return _check_optimizer(value)


# -- schedule ------------------------------------------------------------------------------
_STEP_DEFAULTS = {"warmup_iters": 0, "warmup_factor": 0.001, "multiplier": 1.0}
_EPOCH_DEFAULTS = {"name": "cosine", "epochs": 100, "warmup_epochs": 5, "warmup_lr": 1e-6, "min_lr": 1e-6}


class StepSchedule(_Section):
    """A schedule by iterations (detectron2's, the BiT-HyperRule's): warmup, then LR / 10 at each step."""

    iterations: Optional[int] = Field(None, ge=1, description="training length in iterations (SGD updates)")
    steps: Optional[list[int]] = Field(None, description="iterations at which the LR is divided by 10")
    warmup_iters: Optional[int] = Field(None, ge=0, description="linear warmup length [default 0]")
    warmup_factor: Optional[float] = Field(None, gt=0.0, le=1.0, description="warmup starts at lr * factor [default 0.001]")
    eval_period: Optional[int] = Field(None, ge=1, description="iterations per evaluation (= one Tune iteration)")
    multiplier: Optional[float] = Field(
        None, gt=0.0, le=100.0, description="length factor [default 1] (detection: LR drops keep their distance to the end)"
    )

    @model_validator(mode="after")
    def _steps_inside(self) -> "StepSchedule":
        if self.iterations is None:
            return self
        if self.eval_period is None:
            raise ValueError("a step schedule (schedule.iterations) needs schedule.eval_period")
        steps = self.steps or []
        if sorted(steps) != steps or any(not 0 < s < self.iterations for s in steps):
            raise ValueError(f"schedule.steps must increase within (0, {self.iterations}), but got {steps}")
        return self


class DetectionSchedule(StepSchedule):
    """Detectors train by iterations; Nx keeps the LR drops at their distance to the end."""

    iterations: int = Field(90_000, ge=1, description="training length in iterations at 1x")
    eval_period: int = Field(5_000, ge=1, description="iterations per COCO evaluation (= one Tune iteration)")
    warmup_iters: int = Field(0, ge=0, description="linear warmup length")
    warmup_factor: float = Field(0.001, gt=0.0, le=1.0, description="warmup starts at lr * factor")
    multiplier: float = Field(1.0, gt=0.0, le=100.0, description="Nx: the first phase grows, the LR drops keep their distance to the end")


class ClassificationSchedule(StepSchedule):
    """By epochs (timm ``create_scheduler_v2``, stepped every iteration) or, with ``iterations``, by steps."""

    _EPOCH_FIELDS: ClassVar[tuple[str, ...]] = ("name", "epochs", "warmup_epochs", "warmup_lr", "min_lr", "decay_rate", "decay_epochs", "decay_milestones")
    _STEP_FIELDS: ClassVar[tuple[str, ...]] = ("steps", "warmup_iters", "warmup_factor", "eval_period", "multiplier")
    conditional: ClassVar[frozenset[str]] = frozenset(_EPOCH_FIELDS + _STEP_FIELDS + ("iterations", "hyperrule"))

    name: Optional[str] = Field(None, description="epoch schedules: cosine, step, multistep, poly, tanh [default cosine]")
    epochs: Optional[int] = Field(None, ge=1, description="epoch schedules: training length [default 100]")
    warmup_epochs: Optional[int] = Field(None, ge=0, description="epoch schedules: linear warmup [default 5]")
    warmup_lr: Optional[float] = Field(None, ge=0.0, description="epoch schedules: LR at the start of warmup [default 1e-6]")
    min_lr: Optional[float] = Field(None, ge=0.0, description="epoch schedules: LR at the end [default 1e-6]")
    decay_rate: Optional[float] = Field(None, gt=0.0, le=1.0, description="step/multistep: LR factor at each decay; poly: the power [default 0.1]")
    decay_epochs: Optional[float] = Field(None, gt=0.0, description="step: epochs between decays")
    decay_milestones: Optional[list[int]] = Field(None, description="multistep: epochs at which the LR decays")
    hyperrule: Optional[Literal["full", "schedule"]] = Field(
        None, description="derive the recipe from the dataset at launch (BiT-HyperRule): full, or schedule (keep the resolution)"
    )

    @model_validator(mode="before")
    @classmethod
    def _mode_applies(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("iterations") is not None:
            return _defaults(_not_applying(data, cls._EPOCH_FIELDS), _STEP_DEFAULTS)
        data = _defaults(_not_applying(data, cls._STEP_FIELDS), _EPOCH_DEFAULTS)
        name = data["name"]
        if isinstance(name, str) and name in SCHEDULES:
            if SCHEDULES[name].takes_decay_rate:
                data = _defaults(data, {"decay_rate": 0.1})
            else:
                data = _not_applying(data, ("decay_rate",))
            if name != "step":
                data = _not_applying(data, ("decay_epochs",))
            if name != "multistep":
                data = _not_applying(data, ("decay_milestones",))
        return data

    @field_validator("name")
    @classmethod
    def _schedule_name(cls, value: Optional[str]) -> Optional[str]:
        return value if value is None else _known("schedule", SCHEDULES, value)

    @model_validator(mode="after")
    def _epochs_fit(self) -> "ClassificationSchedule":
        if self.iterations is not None:
            return self
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"schedule.warmup_epochs must be < schedule.epochs ({self.epochs}), but got {self.warmup_epochs}")
        if self.name == "multistep" and not self.decay_milestones:
            raise ValueError("schedule.decay_milestones is required by schedule.name=multistep (e.g. [30, 60, 90])")
        if self.name == "step" and self.decay_epochs is None:
            raise ValueError("schedule.decay_epochs is required by schedule.name=step")
        milestones = self.decay_milestones
        if milestones and (sorted(milestones) != milestones or milestones[0] <= 0 or milestones[-1] >= self.epochs):
            raise ValueError(f"schedule.decay_milestones must increase within (0, {self.epochs}), but got {milestones}")
        return self


# -- regularization, loss, runtime ---------------------------------------------------------
class RegConfig(_Section):
    """Regularization: mixup/cutmix/label smoothing (timm ``Mixup``) and EMA."""

    conditional: ClassVar[frozenset[str]] = frozenset({"ema_warmup"})

    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    ema_decay: Optional[float] = Field(None, gt=0.0, lt=1.0, description="EMA of weights, null = off")
    ema_warmup: Optional[bool] = Field(
        None, description="EMA only: timm's EMA warmup (decay 1-(1+step)^-2/3 up to ema_decay), so early EMA weights "
        "do not lag on their random init [default: true]",
    )

    @model_validator(mode="before")
    @classmethod
    def _ema_warmup_applies(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("ema_decay") is None:
            return _not_applying(data, ("ema_warmup",))
        return _defaults(data, {"ema_warmup": True}) if isinstance(data, dict) else data


class LossConfig(_Section):
    """Loss: timm ``BinaryCrossEntropy`` or soft-target cross-entropy."""

    conditional: ClassVar[frozenset[str]] = frozenset({"target_threshold"})

    name: Literal["bce", "ce"] = "ce"
    target_threshold: Optional[float] = Field(None, gt=0.0, lt=1.0, description="BCE only: soft targets above it become 1")

    @model_validator(mode="before")
    @classmethod
    def _threshold_applies(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name", "ce") == "ce":
            return _not_applying(data, ("target_threshold",))
        return data


class RuntimeConfig(_Section):
    """Where and how a trial runs."""

    amp: bool = Field(True, description="bf16 autocast on GPU; CPU runs in fp32")
    seed: int = Field(0, ge=0)
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP when > 1)")
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile the model")


# -- recipes -------------------------------------------------------------------------------
class _RecipeBase(_Section):
    optim: OptimConfig = Field(default_factory=OptimConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    _ORDER: ClassVar[tuple[str, ...]] = ("task", "model", "data", "optim", "schedule", "reg", "loss", "runtime")

    @model_serializer(mode="wrap")
    def _drop_inapplicable(self, handler: Any) -> Any:
        data = handler(self)  # sections in the order a reader goes through a recipe
        return {key: data[key] for key in self._ORDER if key in data}

    @model_validator(mode="after")
    def _resources(self) -> "_RecipeBase":
        model, runtime = getattr(self, "model"), self.runtime
        if model.norm == "syncbn" and (runtime.gpus_per_worker <= 0 or runtime.workers < 2):
            raise ValueError(
                "model.norm=syncbn needs several GPU workers (runtime.workers > 1 and "
                "runtime.gpus_per_worker > 0): SyncBatchNorm layers only work with GPU modules; "
                f"got workers={runtime.workers}, gpus_per_worker={runtime.gpus_per_worker}"
            )
        if self.optim.batch_size < runtime.workers:
            raise ValueError(f"optim.batch_size must be >= runtime.workers ({runtime.workers}), but got {self.optim.batch_size}")
        if getattr(self.schedule, "iterations", None) is not None:
            iterations, steps, warmup = step_schedule(self)
            if any(s <= warmup for s in steps) or warmup >= iterations:
                raise ValueError(
                    f"schedule.multiplier={self.schedule.multiplier:g} leaves {iterations} iterations with LR drops at {steps}: "
                    f"every drop must come after the {warmup} warmup iterations"
                )
        return self


class ClassificationRecipe(_RecipeBase):
    """A classification recipe: a timm model, timm's data pipeline, losses, mixup and EMA."""

    task: Literal["classification"] = "classification"
    model: ClassificationModel = Field(default_factory=ClassificationModel)
    data: ClassificationData = Field(default_factory=ClassificationData)
    schedule: ClassificationSchedule = Field(default_factory=ClassificationSchedule)
    reg: RegConfig = Field(default_factory=RegConfig)
    loss: LossConfig = Field(default_factory=LossConfig)


class DetectionRecipe(_RecipeBase):
    """A detection recipe: a torchvision R-CNN trained by iterations, scored by COCO AP."""

    task: Literal["detection"] = "detection"
    model: DetectionModel = Field(default_factory=DetectionModel)
    data: DetectionData = Field(default_factory=DetectionData)
    schedule: DetectionSchedule = Field(default_factory=DetectionSchedule)


Recipe = Union[ClassificationRecipe, DetectionRecipe]
_RECIPE_CLASSES = {"classification": ClassificationRecipe, "detection": DetectionRecipe}
_RECIPE = TypeAdapter(Annotated[Recipe, Field(discriminator="task")])


def step_schedule(recipe: Recipe) -> tuple[int, list[int], int]:
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


def detection_schedule(schedule: StepSchedule) -> tuple[int, list[int]]:
    """(iterations, LR-drop steps) of a detection schedule (see ``step_schedule``)."""
    iterations = round(schedule.iterations * schedule.multiplier)
    return iterations, [iterations - (schedule.iterations - s) for s in (schedule.steps or [])]


# -- dotted keys ---------------------------------------------------------------------------
# Keys whose value may itself be a mapping (one checkpoint per backbone norm): leaves, not sections.
MAPPING_KEYS = frozenset({"model.pretrained"})


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"optim.lr": ...}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in MAPPING_KEYS:
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


def _keys_of(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            keys |= _keys_of(kind, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


_TASK_KEYS = {task: frozenset(_keys_of(cls)) for task, cls in _RECIPE_CLASSES.items()}
_ALL_KEYS = frozenset().union(*_TASK_KEYS.values())

# The conditional keys, with what they need: a --set of one that does not apply is refused.
CONDITIONS: dict[str, tuple[str, str]] = {
    "optim.momentum": ("optim.name", "an optimizer with momentum (timm: sgd, momentum, lars, rmsproptf, ...)"),
    "loss.target_threshold": ("loss.name", "loss.name=bce"),
    "reg.ema_warmup": ("reg.ema_decay", "EMA (reg.ema_decay set)"),
    "schedule.decay_rate": ("schedule.name", "schedule.name step, multistep or poly"),
    "schedule.decay_epochs": ("schedule.name", "schedule.name=step"),
    "schedule.decay_milestones": ("schedule.name", "schedule.name=multistep"),
    **{f"schedule.{k}": ("schedule.iterations", "an epoch schedule (schedule.iterations unset)") for k in ClassificationSchedule._EPOCH_FIELDS if k not in ("decay_rate", "decay_epochs", "decay_milestones")},
    **{f"schedule.{k}": ("schedule.iterations", "a step schedule (schedule.iterations set)") for k in ClassificationSchedule._STEP_FIELDS},
}


def applies(recipe: Recipe, key: str) -> bool:
    """Whether a conditional key's condition holds in ``recipe`` (any other key applies where it exists)."""
    section, _, leaf = key.partition(".")
    if key == "optim.momentum":
        return takes_momentum(recipe.optim.name)
    if key == "loss.target_threshold":
        return recipe.loss.name == "bce"
    if key == "reg.ema_warmup":
        return recipe.reg.ema_decay is not None
    if section == "schedule" and key in CONDITIONS:
        schedule = recipe.schedule
        if getattr(schedule, "iterations", None) is not None:
            return leaf in ClassificationSchedule._STEP_FIELDS
        name = schedule.name
        return {"decay_rate": SCHEDULES[name].takes_decay_rate, "decay_epochs": name == "step", "decay_milestones": name == "multistep"}.get(
            leaf, leaf in ClassificationSchedule._EPOCH_FIELDS
        )
    return True


def check_applies(recipe: Recipe, keys: list[str], recipe_label: str, prefix: str = "") -> None:
    """Fail on a conditional key among ``keys`` that does not apply to ``recipe``, saying what it needs."""
    for key in keys:
        if key in CONDITIONS and not applies(recipe, key):
            condition, needs = CONDITIONS[key]
            value = flatten(recipe.model_dump()).get(condition)
            raise RecipeError(f"{prefix}{key} does not apply to {recipe_label} ({condition}={value}): it needs {needs}")


def task_keys(task: str) -> frozenset[str]:
    """Every dotted key a recipe of ``task`` may hold."""
    if not isinstance(task, str) or task not in _TASK_KEYS:
        raise RecipeError(f"task must be one of {', '.join(TASKS)}, but got {short(task)}")
    return _TASK_KEYS[task]


def known_keys() -> frozenset[str]:
    """Every dotted key of any task's recipe."""
    return _ALL_KEYS


def check_keys(flat: dict[str, Any], where: str = "--set", task: Optional[str] = None, recipe: Optional[str] = None) -> None:
    """Fail on dotted keys that no recipe (or, with ``task``, no recipe of that task) has, naming the key."""
    own = task_keys(task) if task else _ALL_KEYS
    for key in flat:
        if key in own:
            continue
        if key in _ALL_KEYS:
            owner = next(t for t, keys in _TASK_KEYS.items() if key in keys)
            raise RecipeError(OTHER_TASK_KEY.format(key=key, owner=owner, recipe=f"recipe {recipe}" if recipe else "this recipe", task=task))
        section = key.split(".")[0]
        siblings = sorted(k for k in own if k.startswith(section + "."))
        sections = sorted({k.split(".")[0] for k in own})
        hint = f"; keys of {section!r}: {', '.join(siblings)}" if siblings else f"; sections: {', '.join(sections)}"
        raise RecipeError(f"unknown recipe key {key!r} in {where}{hint}")


# Every key of the previous one-schema-for-all recipes at its default there (and the filler
# values its detection presets held): such keys of another task are dropped from old files.
_LEGACY_VALUES: dict[str, tuple[Any, ...]] = {
    "model.drop_path_rate": (0.0,),
    "model.zero_head": (False,),
    "model.backbone": (None,),
    "model.fpn_channels": (256,),
    "model.anchor_sizes": ([32, 64, 128, 256, 512],),
    "model.roi_batch_size": (512,),
    "model.proposals": (1000,),
    "model.detections_per_image": (100,),
    "data.crop_pct": (0.95,),
    "data.scale": ([0.08, 1.0],),
    "data.interpolation": ("bicubic",),
    "data.rand_augment": (None,),
    "data.repeated_aug": (0,),
    "data.random_erasing": (0.0,),
    "data.color_jitter": (None,),
    "data.classes": (None,),
    "data.shots_per_class": (None,),
    "data.max_images": (None,),
    "data.max_size": (1333,),
    "data.scale_jitter": (0.0,),
    "schedule.name": ("cosine", "multistep"),
    "schedule.epochs": (100, 2),
    "schedule.warmup_epochs": (5, 0),
    "schedule.warmup_lr": (1e-6,),
    "schedule.min_lr": (1e-6,),
    "schedule.decay_rate": (0.1,),
    "schedule.decay_epochs": (None,),
    "schedule.decay_milestones": (None, [1]),
    "schedule.hyperrule": (None,),
    "reg.mixup_alpha": (0.0,),
    "reg.cutmix_alpha": (0.0,),
    "reg.label_smoothing": (0.0,),
    "reg.ema_decay": (None,),
    "loss.name": ("ce",),
    "loss.target_threshold": (None,),
}


def drop_legacy_keys(flat: dict[str, Any], source: str) -> dict[str, Any]:
    """A recipe written when every recipe held every task's keys: other-task keys at their old defaults go.

    A non-default value of another task's key is an error naming it.
    """
    task = flat.get("task", "classification")
    own = task_keys(task) if isinstance(task, str) and task in _TASK_KEYS else _ALL_KEYS  # an unknown task fails in validation
    kept = {}
    for key, value in flat.items():
        if key not in own and key in _ALL_KEYS:
            if value in _LEGACY_VALUES.get(key, ()):
                continue
            check_keys({key: value}, where=source, task=task, recipe=source)
        kept[key] = value
    return kept


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
            raise RecipeError(f"--set takes KEY=VALUE, but got {short(pair)}")
        overrides[key] = parse_value(value)
    check_keys(overrides)
    return overrides


def apply_overrides(base: dict[str, Any] | Recipe, overrides: dict[str, Any]) -> dict[str, Any]:
    """Base recipe (nested, or a ``Recipe``) + dotted overrides -> nested dict (not yet validated)."""
    if not isinstance(base, dict):
        base = base.model_dump()
    flat = flatten(base)
    flat.update(overrides)
    return unflatten(flat)


# -- validation ----------------------------------------------------------------------------
def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"][1:] if not str(p).startswith("function-"))
        msg = item["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown recipe key {loc!r}")
            continue
        if item["type"].startswith(("literal_error", "enum")):
            parts.append(f"{loc}: {msg[0].lower()}{msg[1:]}, but got {short(item['input'])}")
            continue
        got = "" if "but got" in msg or "input" not in item or isinstance(item["input"], dict) else f", but got {short(item['input'])}"
        msg = msg[0].lower() + msg[1:]
        if not loc or msg.startswith((loc, "unknown", "model.", "data.", "optim.", "schedule.", "a step")):
            parts.append(msg)  # the message names the key itself (and the value where it matters)
        else:
            parts.append(f"{loc}: {msg}{got}")
    return "; ".join(parts)


def validate_recipe(data: dict[str, Any] | Recipe, name: Optional[str] = None) -> Recipe:
    """Build the ``Recipe`` of its task from nested data, raising ``RecipeError`` naming key and value.

    A key of another task fails naming the key and both tasks (``name``: the recipe, for the
    message), unless it holds the default every key had when each recipe held every task's
    keys: recipes written then still load.
    """
    if not isinstance(data, dict):
        data = data.model_dump()
    flat = drop_legacy_keys(flatten(data), name or "the recipe")
    task = flat.setdefault("task", "classification")
    check_keys(flat, where=name or "the recipe", task=task, recipe=name)
    try:
        return _RECIPE.validate_python(unflatten(flat))
    except ValidationError as err:
        raise RecipeError(f"invalid recipe: {_format_validation_error(err)}") from None


def recipe_to_yaml(recipe: Recipe) -> str:
    """A recipe as YAML that ``load_recipe_file`` reads back."""
    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False)
