"""Recipe presets: the procedures of the studies, each a base plus overrides.

Values come from ``reference/RECIPES.md`` (ResNet strikes back, Table 1, and the
timm hparams it names). A derived preset states only what differs from its base,
with the arithmetic in a comment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from spaces.errors import RecipeError
from spaces.yamlfile import read_yaml
from spaces.recipe import Recipe, check_keys, drop_legacy_keys, flatten, unflatten, validate_recipe

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

# A1 and A2 by the same rules (study rsb): the paper's LR scaled to batch 64, epochs x 20/100 (600 -> 120,
# 300 -> 60), warmup 1 epoch; repeated augmentation off (one worker: timm refuses it, see _check_repeats).
RSB_A1_DIGITS = {**RSB_DIGITS, "optim.lr": RSB_A1["optim.lr"] * _DIGITS_BATCH / 2048, "schedule.epochs": 120, "data.repeated_aug": 0}
RSB_A2_DIGITS = {**RSB_A1_DIGITS, "schedule.epochs": 60}

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

# The upstream of the embedded detection study: a classifier on digits whose ResNet (timm's
# resnet18 has torchvision's layer names) becomes the detector's pretrained backbone.
DIGITS_BACKBONE = {
    "model.name": "resnet18",
    "model.norm": "gn",  # the scratch detector's norm: the study compares initializations, not norms
    "data.hflip": 0.0,  # a mirrored digit is another symbol
    "data.rand_augment": None,
    "optim.name": "sgd",
    "optim.lr": 0.05,
    "optim.momentum": 0.9,
    "optim.weight_decay": 5e-4,
    "loss.name": "ce",
    "reg.mixup_alpha": 0.0,
    "reg.cutmix_alpha": 0.0,
    "schedule.epochs": 5,  # top-1 0.95 on digits
    "schedule.warmup_epochs": 1,
    "runtime.cpus_per_worker": 2,  # it runs alone, before the study's trials
}

# Big Transfer (BiT): fine-tuning by the BiT-HyperRule. The schedule, resolution, mixup and LR
# come from the dataset at launch (schedule.hyperrule); the values below are the rule for
# fewer than 20k small images, so that the preset is a valid recipe on its own.
BIT_HYPERRULE = {
    "model.name": "resnetv2_50x1_bit",  # ResNet-v2 with GroupNorm + Weight Standardization
    "model.norm": "bn",  # the architecture's own normalization (GN+WS for the BiT models)
    "model.zero_head": True,
    "model.drop_path_rate": 0.0,
    "data.name": "imagenet",  # an ImageFolder root: set with --data
    "data.hflip": 0.5,
    "data.crop": "bit",  # squash to 160 x 160, random 128 crop; test: squash to 128 (the rule's small images)
    "data.precrop": 1.25,
    "data.train_size": 128,
    "data.test_size": 128,
    "data.rand_augment": None,
    "data.repeated_aug": 0,
    "data.interpolation": "bilinear",
    "optim.name": "momentum",
    "optim.momentum": 0.9,
    "optim.weight_decay": 0.0,
    "optim.batch_size": 512,
    "optim.lr": 0.003,
    "loss.name": "ce",
    "reg.mixup_alpha": 0.0,
    "reg.cutmix_alpha": 0.0,
    "reg.label_smoothing": 0.0,
    "reg.ema_decay": None,
    "schedule.hyperrule": "full",
    "schedule.iterations": 500,
    "schedule.steps": [200, 300, 400],
    "schedule.warmup_iters": 100,
    "schedule.warmup_factor": 0.01,
    "schedule.eval_period": 100,
    "runtime.workers": 8,
    "runtime.cpus_per_worker": 4,
    "runtime.gpus_per_worker": 1,
}

# The embedded transfer demo: a tiny GN+WS ResNet-v2 pretrained on digits 0-4 ...
BIT_UPSTREAM_DIGITS = {
    "model.name": "resnetv2_bit_tiny",
    "model.norm": "bn",  # the architecture's own: GN+WS
    "data.classes": [0, 1, 2, 3, 4],
    "schedule.epochs": 10,
}
# ... then transferred few-shot to digits 5-9. The HyperRule gives the schedule, LR and mixup; the
# resolution stays at 32 px on CPU (the rule's 160 -> 128 for images under 96 x 96 is 16x the pixels).
BIT_DIGITS = {
    "model.name": "resnetv2_bit_tiny",
    "data.name": "digits",
    "data.classes": [5, 6, 7, 8, 9],
    "data.shots_per_class": 5,
    "data.crop": "bit",  # BiT's 128 crops of 160, scaled to 32 of 40
    "data.train_size": 32,
    "data.test_size": 32,
    "data.hflip": 0.0,  # a mirrored digit is another symbol
    "optim.batch_size": 16,
    "schedule.hyperrule": "schedule",
    "runtime.workers": 1,
    "runtime.cpus_per_worker": 1,
    "runtime.gpus_per_worker": 0,
}

# Rethinking ImageNet Pre-training (He, Girshick, Dollar 2019; detectron2's Misc configs).
COCO_1X_ITERATIONS = 90_000  # at 16 images a batch
COCO_1X_BATCH = 16
COCO_1X_LR = 0.02
COCO_DROPS_FROM_END = (60_000, 20_000)  # the LR drops sit in the last 60k and the last 20k iterations
COCO_TRAIN_IMAGES = 118_287  # 1x = 90k x 16 / 118,287 = 12.2 epochs of COCO train2017


def coco_equivalent_1x(train_images: int, batch_size: int) -> int:
    """Iterations of a 1x schedule on a dataset of ``train_images``: as many epochs as COCO's 1x (12.2)."""
    return max(1, round(COCO_1X_ITERATIONS * COCO_1X_BATCH / COCO_TRAIN_IMAGES * train_images / batch_size))


def rethinking_schedule(
    multiple: float, batch_size: int = COCO_1X_BATCH, iterations_1x: int | None = None, warmup_iters: int = 1000, evals_1x: int = 18
) -> dict[str, Any]:
    """The paper's Nx schedule as recipe keys.

    1x is 90k iterations at batch 16 with the LR divided by 10 in the last 60k
    and the last 20k (2/3 and 2/9 of 1x); Nx multiplies the first phase only,
    so the drops keep their distance to the end. Another batch size keeps the
    images seen (1x = 90k x 16 / batch iterations) and scales the LR linearly
    (0.02 x batch / 16). A smaller dataset keeps the epochs: ``iterations_1x``
    from ``coco_equivalent_1x``. Evaluation ``evals_1x`` times per 1x.
    """
    unit = iterations_1x or round(COCO_1X_ITERATIONS * COCO_1X_BATCH / batch_size)
    iterations = round(multiple * unit)
    return {
        "schedule.iterations": iterations,
        "schedule.steps": [iterations - round(unit * d / COCO_1X_ITERATIONS) for d in COCO_DROPS_FROM_END],
        "schedule.warmup_iters": warmup_iters,
        "schedule.warmup_factor": 0.001,
        "schedule.eval_period": max(1, round(unit / evals_1x)),
        "optim.batch_size": batch_size,
        "optim.lr": COCO_1X_LR * batch_size / COCO_1X_BATCH,
    }


SCRATCH_MASKRCNN_R50_GN = {
    "task": "detection",
    "model.name": "mask_rcnn",
    "model.backbone": "resnet50",
    "model.norm": "gn",  # GN in backbone, FPN, 4conv1fc box head and 4-conv mask head
    "model.init": "scratch",
    "data.name": "coco",  # a COCO root (annotations/instances_train*.json, train*/): set with --data
    "data.train_size": 800,  # shorter side
    "data.test_size": 800,
    "data.max_size": 1333,
    "data.hflip": 0.5,  # horizontal flip is the only augmentation
    "optim.name": "momentum",  # SGD, heavy-ball momentum as in detectron2
    "optim.momentum": 0.9,
    "optim.weight_decay": 1e-4,
    "optim.grad_clip": None,
    "runtime.workers": 8,  # 2 images on each of 8 GPUs
    "runtime.cpus_per_worker": 4,
    "runtime.gpus_per_worker": 1,
    **rethinking_schedule(3),  # 270k iterations, drops at 210k and 250k
}

# Digits-det: 600 train canvases of 64 px with 1-4 digits. ResNet-18-FPN-GN, 64 channels,
# few RoIs and proposals (at most 4 objects an image). COCO's 12.2 epochs would be
# coco_equivalent_1x(600, 4) = 1,827 iterations: too long for minutes on 2 CPUs, so the
# preset's 1x is 200 iterations (1.3 epochs) with the same shape (drops in the last 2/3 and 2/9).
DIGITS_DET_IMAGES = 600
DIGITS_DET_1X = 200
SCRATCH_DET_DIGITS = {
    "model.backbone": "resnet18",
    "model.fpn_channels": 64,
    "model.anchor_sizes": [8, 16, 32, 64, 128],
    "model.roi_batch_size": 32,
    "model.proposals": 50,
    "model.detections_per_image": 10,  # at most 4 digits a canvas; scoring 100 a canvas tripled the evaluation time
    "data.name": "digits-det",
    "data.train_size": 64,
    "data.test_size": 64,
    "data.max_size": 64,
    "data.hflip": 0.0,  # a mirrored digit is another symbol
    "runtime.workers": 1,
    "runtime.cpus_per_worker": 1,
    "runtime.gpus_per_worker": 0,
    **rethinking_schedule(1, batch_size=4, iterations_1x=DIGITS_DET_1X, warmup_iters=20, evals_1x=4),
    # The paper's 0.02, not 0.02 x 4 / 16: at 0.005 a 200-iteration schedule barely moves (box AP 0.005
    # at 150 iterations from scratch, 0.008 pretrained, vs 0.014 / 0.029 at 0.02). Space det searches it.
    "optim.lr": 0.02,
}

# name -> (base preset or None, overrides, one-line description)
RECIPE_PRESETS: dict[str, tuple[str | None, dict[str, Any], str]] = {
    "rsb-a1": (None, RSB_A1, "ResNet strikes back A1: ResNet-50, 600 epochs, LAMB, BCE (80.4 top-1)"),
    "rsb-a2": ("rsb-a1", RSB_A2, "ResNet strikes back A2: ResNet-50, 300 epochs (79.8 top-1)"),
    "rsb-a3": ("rsb-a2", RSB_A3, "ResNet strikes back A3: ResNet-50, 100 epochs at 160 px (78.1 top-1)"),
    "rsb-digits": ("rsb-a3", RSB_DIGITS, "A3 sized for the embedded digits: small timm ResNet, 32 px, 20 epochs"),
    "rsb-a1-digits": ("rsb-a1", RSB_A1_DIGITS, "A1 sized for the embedded digits by rsb-digits' rules: 120 epochs (600 x 20/100)"),
    "rsb-a2-digits": ("rsb-a2", RSB_A2_DIGITS, "A2 sized for the embedded digits by rsb-digits' rules: 60 epochs (300 x 20/100)"),
    "digits-smoke": ("rsb-digits", DIGITS_SMOKE, "seconds on 2 CPUs: SGD on half the digits, light augmentation (smoke tests)"),
    "bit-hyperrule": (None, BIT_HYPERRULE, "BiT-HyperRule fine-tuning of ResNet-v2 50x1 (GN+WS): schedule, resolution, mixup, LR from the data"),
    "bit-upstream-digits": ("digits-backbone", BIT_UPSTREAM_DIGITS, "tiny GN+WS ResNet-v2 trained on digits 0-4: the upstream of the transfer demo"),
    "bit-digits": ("bit-hyperrule", BIT_DIGITS, "BiT-HyperRule few-shot transfer to digits 5-9 (5 shots), tiny GN+WS ResNet-v2 at 32 px"),
    "digits-backbone": ("rsb-digits", DIGITS_BACKBONE, "ResNet-18-GN classifier on digits: the pretrained backbone of the embedded detection study"),
    "scratch-maskrcnn-r50-gn-3x": (None, SCRATCH_MASKRCNN_R50_GN, "Rethinking ImageNet Pre-training: Mask R-CNN R50-FPN-GN from scratch, 3x (39.5 box AP)"),
    "scratch-maskrcnn-r50-gn-6x": ("scratch-maskrcnn-r50-gn-3x", rethinking_schedule(6), "as -3x, 6x = 540k iterations (41.3 box AP)"),
    "scratch-maskrcnn-r50-gn-9x": (
        "scratch-maskrcnn-r50-gn-3x",
        rethinking_schedule(9, batch_size=64),  # detectron2: batch 64, LR 0.08, 202.5k, drops at 187.5k and 197.5k
        "as -3x, detectron2's 9x: batch 64, LR 0.08, 202.5k iterations",
    ),
    "pretrained-maskrcnn-r50-gn-3x": (
        "scratch-maskrcnn-r50-gn-3x",
        # needs --set model.pretrained=PATH (an ImageNet R50-GN checkpoint); the stem and res2 frozen, as detectron2's FREEZE_AT=2
        {"model.init": "pretrained", "model.freeze_at": 2},
        "as scratch -3x, backbone from an ImageNet-trained ResNet-50-GN (40.8 box AP)",
    ),
    "scratch-maskrcnn-r50-syncbn-3x": ("scratch-maskrcnn-r50-gn-3x", {"model.norm": "syncbn"}, "as -gn-3x with SyncBN in backbone, FPN and heads"),
    "pretrained-maskrcnn-r50-syncbn-3x": ("pretrained-maskrcnn-r50-gn-3x", {"model.norm": "syncbn"}, "as pretrained -gn-3x with SyncBN"),
    "scratch-det-digits": ("scratch-maskrcnn-r50-gn-3x", SCRATCH_DET_DIGITS, "ResNet-18-FPN-GN Mask R-CNN on the embedded digits-det, minutes on 2 CPUs"),
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
    data = read_yaml(path, "recipe", RecipeError)
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {str(path)!r} must hold a mapping of recipe keys")
    return drop_legacy_keys(flatten(data), str(path))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A preset name or a YAML file -> flat recipe keys (not yet validated)."""
    if name_or_path in RECIPE_PRESETS:
        return preset_overrides(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or (Path(name_or_path).exists() and not Path(name_or_path).is_dir()):
        return load_recipe_file(name_or_path)
    return preset_overrides(name_or_path)  # raises, listing presets


def resolve_recipe(base: str | dict[str, Any], *layers: dict[str, Any]) -> Recipe:
    """Base recipe (preset name, file or flat keys) + dotted override layers -> a valid ``Recipe``.

    A layer naming another task's key fails naming the key, the recipe and its task.
    """
    flat = load_recipe(base) if isinstance(base, str) else dict(base)
    name = base if isinstance(base, str) else None
    for layer in layers:
        flat.update(layer)
        check_keys(layer, where="overrides", task=flat.get("task", "classification"), recipe=name)
    return validate_recipe(unflatten(flat), name=name)
