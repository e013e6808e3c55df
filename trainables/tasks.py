"""One entry point for every task: the recipe's ``task`` picks its training loop."""

from __future__ import annotations

import importlib
from typing import Any

from spaces import Recipe, validate_recipe
from trainables.report import TrialReport
from trainables.session import Session

__all__ = ["TRAINERS", "train_recipe"]

# task -> module:function. Detection (torchvision detection, pycocotools) loads only when a recipe needs it.
TRAINERS = {"classification": "trainables.classification:train_classifier", "detection": "trainables.detection:train_detector"}


def train_recipe(recipe: Recipe | dict[str, Any], session: Session) -> TrialReport:
    """Train a recipe with the loop of its task; report to ``session``; return the last report."""
    recipe = validate_recipe(recipe)
    module, function = TRAINERS[recipe.task].split(":")
    return getattr(importlib.import_module(module), function)(recipe, session)
