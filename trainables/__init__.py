"""How one trial trains: code that runs inside Ray Train workers or a Tune trial."""

from __future__ import annotations

from typing import Any

from spaces import Recipe, validate_recipe
from trainables.classification import CHECKPOINT_FILE, load_checkpoint, train_classifier
from trainables.session import LocalSession, Session, TrainSession, TuneSession

__all__ = [
    "CHECKPOINT_FILE",
    "LocalSession",
    "Session",
    "TrainSession",
    "TuneSession",
    "load_checkpoint",
    "train_classifier",
    "train_recipe",
]


def train_recipe(recipe: Recipe | dict[str, Any], session: Session) -> dict[str, float]:
    """Train a recipe with the loop of its task; report to ``session``; return the last metrics."""
    recipe = validate_recipe(recipe)
    if recipe.task == "detection":
        from trainables.detection import train_detector  # torchvision detection + pycocotools only when needed

        return train_detector(recipe, session)
    return train_classifier(recipe, session)
