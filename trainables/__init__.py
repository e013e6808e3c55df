"""How one trial trains: code that runs inside Ray Train workers or a Tune trial.

``trainables.report`` (the ``TrialReport`` a trainer hands the sweep) imports no
torch; everything else here is imported on first use, so the driver and the CLI
can read reports without loading PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

from trainables.report import CHECKPOINT_FILE, Outcome, Progress, TrialReport, Unit

__all__ = [
    "CHECKPOINT_FILE",
    "LocalSession",
    "Outcome",
    "Progress",
    "Session",
    "TrainSession",
    "TrialReport",
    "TuneSession",
    "Unit",
    "load_checkpoint",
    "train_classifier",
    "train_recipe",
]

_LAZY = {
    "LocalSession": "trainables.session",
    "Session": "trainables.session",
    "TrainSession": "trainables.session",
    "TuneSession": "trainables.session",
    "load_checkpoint": "trainables.engine",
    "train_classifier": "trainables.classification",
    "train_recipe": "trainables.tasks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainables' has no attribute {name!r}")
