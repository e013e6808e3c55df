"""How one trial trains: code that runs inside Ray Train workers or a Tune trial."""

from __future__ import annotations

from trainables.classification import CHECKPOINT_FILE, load_checkpoint, train_classifier
from trainables.session import LocalSession, Session, TrainSession, TuneSession

__all__ = ["CHECKPOINT_FILE", "LocalSession", "Session", "TrainSession", "TuneSession", "load_checkpoint", "train_classifier"]
