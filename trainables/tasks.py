"""One entry point for every task: the recipe's ``task`` picks its training loop."""

from __future__ import annotations

import importlib
from typing import Any

from spaces import Recipe, validate_recipe
from trainables.data import DatasetSummary, summarize_classification_data
from trainables.report import TrialReport
from trainables.session import Session

__all__ = ["TRAINERS", "summarize_data", "train_recipe"]

# task -> module:function. Detection (torchvision detection, pycocotools) loads only when a recipe needs it.
TRAINERS = {"classification": "trainables.classification:train_classifier", "detection": "trainables.detection:train_detector"}


def train_recipe(recipe: Recipe | dict[str, Any], session: Session) -> TrialReport:
    """Train a recipe with the loop of its task; report to ``session``; return the last report."""
    recipe = validate_recipe(recipe)
    module, function = TRAINERS[recipe.task].split(":")
    return getattr(importlib.import_module(module), function)(recipe, session)


def summarize_data(recipe: Recipe) -> DatasetSummary:
    """Name, source, digest and number of the training examples a recipe selects (for MLflow's dataset inputs)."""
    if recipe.task == "detection":
        from trainables.coco import summarize_detection_data  # pycocotools only when a recipe needs it

        return summarize_detection_data(recipe.data.name, recipe.data.fraction, recipe.data.max_images, recipe.runtime.seed)
    return summarize_classification_data(recipe.data, recipe.runtime.seed)
