"""Recipe presets: the procedures of the studies, each a base plus overrides.

Values come from ``reference/RECIPES.md`` (ResNet strikes back, Table 1, and the
timm hparams it names). A derived preset states only what differs from its base,
with the arithmetic in a comment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from spaces.errors import RecipeError
from spaces.recipe import Recipe, apply_overrides, check_keys, flatten, validate_recipe

__all__ = ["RECIPE_PRESETS", "recipe_names", "preset_overrides", "load_recipe", "load_recipe_file", "resolve_recipe"]

# ResNet strikes back, procedure A1 (ResNet-50, ImageNet-1k ImageFolder, 4 V100s).
RSB_A1: dict[str, Any] = {
    "model.name": "resnet50",
    "model.drop_path_rate": 0.05,
    "data.name": "imagenet",  # an ImageFolder root with train/ and val/: set with --data
    "data.train_size": 224,
    "data.test_size": 224,
    "data.crop_pct": 0.95,
    "data.scale": [0.08, 1.0],
    "data.interpolation": "bicubic",
    "data.hflip": 0.5,
    "data.rand_augment": "rand-m7-mstd0.5-inc1",
    "data.repeated_aug": 3,
    "data.random_erasing": 0.0,
    "data.color_jitter": None,
    "optim.name": "lamb",
    "optim.lr": 5e-3,
    "optim.weight_decay": 0.01,
    "optim.batch_size": 2048,
    "optim.grad_clip": None,
    "schedule.name": "cosine",
    "schedule.epochs": 600,
    "schedule.warmup_epochs": 5,
    "schedule.warmup_lr": 1e-6,
    "schedule.min_lr": 1e-6,
    "reg.mixup_alpha": 0.2,
    "reg.cutmix_alpha": 1.0,
    "reg.label_smoothing": 0.1,
    "reg.ema_decay": None,
    "loss.name": "bce",
    "loss.target_threshold": 0.2,  # timm hparams: --bce-target-thresh 0.2
    "runtime.amp": True,
    "runtime.workers": 4,  # 4 V100s in the paper
    "runtime.cpus_per_worker": 8,
    "runtime.gpus_per_worker": 1,
}

RSB_A2 = {
    "schedule.epochs": 300,
    "optim.weight_decay": 0.02,
    "reg.label_smoothing": 0.0,
    "reg.mixup_alpha": 0.1,
}

RSB_A3 = {
    **RSB_A2,
    "schedule.epochs": 100,
    "optim.lr": 8e-3,
    "data.train_size": 160,  # train at 160, test at 224
    "data.rand_augment": "rand-m6-mstd0.5-inc1",
    "data.repeated_aug": 0,
    "model.drop_path_rate": 0.0,
}

_DIGITS_BATCH = 64
RSB_DIGITS = {
    "model.name": "test_resnet",  # a small timm ResNet: ~0.37M params, ~2 s an epoch on one CPU
    "data.name": "digits",
    "data.train_size": 32,
    "data.test_size": 32,
    "data.scale": [0.35, 1.0],  # 8x8 digits lose their identity in 8%-area crops
    "optim.batch_size": _DIGITS_BATCH,
    # Linear scaling rule: lr = base_lr * batch / base_batch = 8e-3 * 64 / 2048 = 2.5e-4.
    "optim.lr": 8e-3 * _DIGITS_BATCH / 2048,
    "schedule.epochs": 20,  # 100 -> 20: 1,437 images, ~3 s an epoch on one CPU
    "schedule.warmup_epochs": 1,  # 5 of 100 epochs -> 1 of 20
    "runtime.workers": 1,
    "runtime.cpus_per_worker": 1,
    "runtime.gpus_per_worker": 0,
}

# A run of seconds on 2 CPUs, for smoke tests and benchmarks of the machinery.
DIGITS_SMOKE = {
    "data.fraction": 0.5,
    "data.rand_augment": None,
    "optim.name": "sgd",
    "optim.batch_size": 32,
    "optim.lr": 0.1,
    "loss.name": "ce",
    "reg.mixup_alpha": 0.0,
    "reg.cutmix_alpha": 0.0,
    "schedule.epochs": 3,
    "schedule.warmup_epochs": 0,
}

# name -> (base preset or None, overrides, one-line description)
RECIPE_PRESETS: dict[str, tuple[str | None, dict[str, Any], str]] = {
    "rsb-a1": (None, RSB_A1, "ResNet strikes back A1: ResNet-50, 600 epochs, LAMB, BCE (80.4 top-1)"),
    "rsb-a2": ("rsb-a1", RSB_A2, "ResNet strikes back A2: ResNet-50, 300 epochs (79.8 top-1)"),
    "rsb-a3": ("rsb-a2", RSB_A3, "ResNet strikes back A3: ResNet-50, 100 epochs at 160 px (78.1 top-1)"),
    "rsb-digits": ("rsb-a3", RSB_DIGITS, "A3 sized for the embedded digits: small timm ResNet, 32 px, 20 epochs"),
    "digits-smoke": ("rsb-digits", DIGITS_SMOKE, "seconds on 2 CPUs: SGD on half the digits, light augmentation (smoke tests)"),
}


def recipe_names() -> list[str]:
    return sorted(RECIPE_PRESETS)


def preset_overrides(name: str) -> dict[str, Any]:
    """The full flat key set of a preset, its bases applied in order."""
    if name not in RECIPE_PRESETS:
        raise RecipeError(f"unknown recipe {name!r}; available: {', '.join(recipe_names())} (or a .yaml file)")
    base, overrides, _ = RECIPE_PRESETS[name]
    flat = preset_overrides(base) if base else {}
    flat.update(overrides)
    return flat


def load_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML (nested, or flat dotted keys) with a safe loader."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe file {str(path)!r} does not exist") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"recipe file {str(path)!r} cannot be read: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {str(path)!r} must hold a mapping of recipe keys")
    flat = flatten(data)
    check_keys(flat, where=str(path))
    return flat


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A preset name or a YAML file -> flat recipe keys (not yet validated)."""
    if name_or_path in RECIPE_PRESETS:
        return preset_overrides(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return load_recipe_file(name_or_path)
    return preset_overrides(name_or_path)  # raises, listing presets


def resolve_recipe(base: str | dict[str, Any], *layers: dict[str, Any]) -> Recipe:
    """Base recipe (preset name, file or flat keys) + dotted override layers -> a valid ``Recipe``."""
    flat = load_recipe(base) if isinstance(base, str) else dict(base)
    for layer in layers:
        check_keys(layer, where="overrides")
        flat.update(layer)
    return validate_recipe(apply_overrides(Recipe(), flat))
