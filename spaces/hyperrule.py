"""The BiT-HyperRule: fine-tuning hyperparameters as a function of the dataset.

Big Transfer (Kolesnikov et al., https://arxiv.org/abs/1912.11370) replaces a
per-task search with one rule that reads only the number of training examples
and the image size. The numbers follow ``reference/RECIPES.md`` and the released
``bit_hyperrule.py`` of google-research/big_transfer, except where noted.

Example::

    >>> hyperrule(50_000, 32).as_dict()["steps"]
    10000
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from spaces.errors import RecipeError

__all__ = ["BASE_BATCH_SIZE", "BASE_LR", "HyperRule", "hyperrule"]

BASE_LR = 0.003  # SGD, at the paper's batch of 512
BASE_BATCH_SIZE = 512
MOMENTUM = 0.9
SMALL_DATA = 20_000  # fewer examples: short schedule, no MixUp
LARGE_DATA = 500_000  # this many or more: the long schedule
SMALL_IMAGE_AREA = 96 * 96

# (warmup end, LR drop, LR drop, LR drop, end) in steps, exactly as get_schedule in
# bit_hyperrule.py. Medium and large drop the LR by 10 at 30%, 60% and 90% of the
# steps; the 500-step schedule warms up for 100 steps and drops at 40/60/80%.
_SMALL_SCHEDULE = (100, 200, 300, 400, 500)
_MEDIUM_SCHEDULE = (500, 3000, 6000, 9000, 10_000)
_LARGE_SCHEDULE = (500, 6000, 12_000, 18_000, 20_000)

# The paper's resolutions. bit_hyperrule.get_resolution returns (512, 480) for
# large images instead of (448, 384); small images agree.
_SMALL_IMAGE_RESOLUTION = (160, 128)
_LARGE_IMAGE_RESOLUTION = (448, 384)


@dataclass(frozen=True)
class HyperRule:
    """BiT fine-tuning hyperparameters for one dataset (steps count SGD updates)."""

    steps: int
    warmup_steps: int
    lr_drops: tuple[int, ...]  # steps after which the LR is divided by 10
    resize: int  # train images are resized to resize x resize, then randomly cropped
    crop: int  # and evaluated at crop x crop
    mixup_alpha: float
    lr: float
    batch_size: int
    momentum: float
    weight_decay: float

    def as_dict(self) -> dict[str, Any]:
        """Plain values, ``lr_drops`` as a list, for YAML and recipe overrides."""
        values = asdict(self)
        values["lr_drops"] = list(self.lr_drops)
        return values


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise RecipeError(f"hyperrule {name} must be >= 1, but got {value}")


def hyperrule(examples: int, image_size: int, batch_size: int = BASE_BATCH_SIZE) -> HyperRule:
    """The BiT-HyperRule for ``examples`` training images of ``image_size`` x ``image_size`` pixels.

    The schedule length is fixed in steps, whatever the batch size; the LR scales
    linearly with the batch (0.003 at 512), which is this project's extension:
    BiT itself always fine-tunes at batch 512.

    Args:
        examples: number of training examples (the whole training set, all classes).
        image_size: side of the (square) original images in pixels.
        batch_size: images per SGD step.

    Raises:
        RecipeError: an argument is smaller than 1.
    """
    _check_positive("examples", examples)
    _check_positive("image_size", image_size)
    _check_positive("batch_size", batch_size)
    if examples < SMALL_DATA:
        schedule = _SMALL_SCHEDULE
    elif examples < LARGE_DATA:
        schedule = _MEDIUM_SCHEDULE
    else:
        schedule = _LARGE_SCHEDULE
    resize, crop = _SMALL_IMAGE_RESOLUTION if image_size * image_size < SMALL_IMAGE_AREA else _LARGE_IMAGE_RESOLUTION
    return HyperRule(
        steps=schedule[-1],
        warmup_steps=schedule[0],
        lr_drops=schedule[1:-1],
        resize=resize,
        crop=crop,
        mixup_alpha=0.0 if examples < SMALL_DATA else 0.1,
        lr=BASE_LR * batch_size / BASE_BATCH_SIZE,  # linear scaling rule
        batch_size=batch_size,
        momentum=MOMENTUM,
        weight_decay=0.0,  # BiT fine-tunes without weight decay
    )


def hyperrule_keys(rule: HyperRule, resolution: bool = True) -> dict[str, Any]:
    """The rule as dotted recipe keys (a step schedule evaluated 5 times).

    BiT trains on random ``crop`` x ``crop`` crops of images squashed to ``resize`` x ``resize``
    and tests on images squashed to ``crop`` x ``crop`` (``data.crop=bit``, ``data.precrop`` = resize / crop).
    """
    keys: dict[str, Any] = {
        "optim.name": "momentum",
        "optim.lr": rule.lr,
        "optim.momentum": rule.momentum,
        "optim.weight_decay": rule.weight_decay,
        "schedule.iterations": rule.steps,
        "schedule.steps": list(rule.lr_drops),
        "schedule.warmup_iters": rule.warmup_steps,
        "schedule.warmup_factor": 1.0 / rule.warmup_steps,  # BiT: lr * step / warmup, from the first step
        "schedule.eval_period": rule.steps // 5,
        "reg.mixup_alpha": rule.mixup_alpha,
    }
    if resolution:
        keys.update(
            {
                "data.crop": "bit",
                "data.precrop": round(rule.resize / rule.crop, 4),
                "data.train_size": rule.crop,
                "data.test_size": rule.crop,
            }
        )
    return keys
