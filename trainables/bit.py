"""BiT models through timm: a tiny GroupNorm + Weight-Standardized ResNet-v2, and checks and loaders for the family.

Importing this module registers ``resnetv2_bit_tiny`` in timm's model registry, so
``timm.create_model("resnetv2_bit_tiny", num_classes=10, drop_path_rate=0.1)``
works like ``resnetv2_50x1_bit``: the same timm ``ResNetV2`` with pre-activation
bottlenecks, the fixed BiT stem, ``StdConv2d`` everywhere and GroupNorm instead
of BatchNorm, only one block per stage and narrower, so it trains on a CPU.

BiT (https://arxiv.org/abs/1912.11370) zero-initializes the new head
(``zero_head=True`` in bit_pytorch/train.py); timm's BiT models draw it from
N(0, 0.01) instead. The tiny model follows BiT; ``zero_init_head`` does the same
for any other timm model.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch.nn as nn
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import GroupNormAct, StdConv2d, StdConv2dSame
from timm.models import build_model_with_cfg, generate_default_cfgs, is_model, model_entrypoint, register_model
from timm.models.resnetv2 import ResNetV2

from spaces import DataError, RecipeError

__all__ = [
    "TINY_MODEL",
    "gn_ws_violations",
    "is_gn_ws",
    "load_bit_npz",
    "resnetv2_bit_tiny",
    "zero_init_head",
]

TINY_MODEL = "resnetv2_bit_tiny"
# BiT uses 32 groups; a bottleneck's mid width is a quarter of its output, so 32
# groups everywhere would need stages of 128..1024 channels (millions of weights).
# 8 groups keep at least 2 channels per group in every norm of the tiny model.
TINY_GROUPS = 8
TINY_CHANNELS = (64, 128, 256, 512)  # bottleneck mid widths 16, 32, 64, 128
TINY_STEM = 32

# What timm's BiT models declare, so timm.data.resolve_data_config works alike.
default_cfgs = generate_default_cfgs({
    f"{TINY_MODEL}.untrained": {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_INCEPTION_MEAN,  # BiT scales pixels to [-1, 1]
        "std": IMAGENET_INCEPTION_STD,
        "first_conv": "stem.conv",
        "classifier": "head.fc",
    },
})


def zero_init_head(model: nn.Module) -> nn.Module:
    """Zero the classifier's weight and bias, as BiT does for a new head; return ``model``."""
    head = model.get_classifier()
    if not hasattr(head, "weight"):
        raise RecipeError(f"model {type(model).__name__} has no classifier to zero-initialize (num_classes=0?)")
    nn.init.zeros_(head.weight)
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    return model


def resnetv2_bit_tiny(pretrained: bool = False, **kwargs: Any) -> ResNetV2:
    """A ResNet-v2 with GroupNorm and Weight Standardization, one bottleneck per stage (0.51M weights)."""
    model_args: dict[str, Any] = dict(
        layers=[1, 1, 1, 1],
        channels=TINY_CHANNELS,
        stem_chs=TINY_STEM,
        stem_type="fixed",
        conv_layer=partial(StdConv2d, eps=1e-8),  # as timm's _create_resnetv2_bit
        norm_layer=partial(GroupNormAct, num_groups=TINY_GROUPS),
    )
    model = build_model_with_cfg(
        ResNetV2, TINY_MODEL, pretrained, feature_cfg=dict(flatten_sequential=True), **{**model_args, **kwargs}
    )
    if model.num_classes:
        zero_init_head(model)
    return model


def _register() -> None:
    # A second import under another name, or importlib.reload, must not warn about
    # overwriting: keep the entry this module registered.
    if is_model(TINY_MODEL) and model_entrypoint(TINY_MODEL).__module__ == __name__:
        return
    register_model(resnetv2_bit_tiny)


_register()


def gn_ws_violations(model: nn.Module) -> list[str]:
    """Names of modules that break BiT's normalization: a plain conv, or a norm other than GroupNorm.

    The classifier is left out: BiT's head is a plain 1x1 convolution. A model with
    no GroupNorm at all is reported too.
    """
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    in_head = {id(m) for m in classifier.modules()} if isinstance(classifier, nn.Module) else set()
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm)
    violations = []
    for name, module in model.named_modules():
        if id(module) in in_head:
            continue
        if isinstance(module, nn.Conv2d) and not isinstance(module, (StdConv2d, StdConv2dSame)):
            violations.append(f"{name}: {type(module).__name__} is not weight-standardized")
        elif isinstance(module, norms) and not isinstance(module, nn.GroupNorm):
            violations.append(f"{name}: {type(module).__name__} is not GroupNorm")
    if not any(isinstance(m, nn.GroupNorm) for m in model.modules()):
        violations.append(f"{type(model).__name__}: has no GroupNorm")
    return violations


def is_gn_ws(model: nn.Module) -> bool:
    """True when every conv outside the head is a ``StdConv2d`` and every norm a GroupNorm."""
    return not gn_ws_violations(model)


def load_bit_npz(model: nn.Module, path: str | os.PathLike, prefix: str = "resnet/") -> None:
    """Load an original BiT ``.npz`` checkpoint (e.g. BiT-M-R50x1.npz) into a timm ResNetV2, in place.

    This goes through timm's own loader (``ResNetV2.load_pretrained``), which copies
    the head only when its class count matches the checkpoint's: a new head keeps
    its initialization (zero in the tiny model; ``zero_init_head`` does it for
    timm's BiT models, as BiT's ``zero_head=True`` does).

    Raises:
        RecipeError: ``model`` is not a timm ResNetV2.
        DataError: the file is missing, is not a BiT npz, or does not fit the model
            (then the model may be partly overwritten: build a new one).
    """
    if not isinstance(model, ResNetV2):
        raise RecipeError(f"load_bit_npz needs a timm ResNetV2 (resnetv2_*_bit), but got {type(model).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"BiT checkpoint {path!r} does not exist")
    try:
        model.load_pretrained(path, prefix=prefix)
    except ValueError as error:  # timm: not an npz, or no f"{prefix}root_block/..." weights
        raise DataError(f"BiT checkpoint {path!r} is not a BiT .npz archive with weights under {prefix!r}") from error
    except (KeyError, RuntimeError) as error:  # a weight the model needs is missing, or has another shape
        detail = str(error.args[0] if error.args else type(error).__name__).splitlines()[0]
        raise DataError(f"BiT checkpoint {path!r} does not fit the model: {detail}") from error
