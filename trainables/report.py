"""What a trainer hands the sweep each period, and how the sweep reads it back.

A ``TrialReport`` is the one contract between the training loops and the sweep:
the metrics of the period, the progress (done / total, in epochs or iterations)
and the outcome (running, completed, failed with its error). Trainers build it;
the Tune trial function, the searcher, the monitor and the MLflow callback read
it with ``TrialReport.from_result`` from the flat result Tune hands around. The
result keys it adds are spelled here only.

Example::

    >>> report = TrialReport({"val/top1": 0.9, "lr": 0.1}, Progress(3, 20, Unit.EPOCH))
    >>> back = TrialReport.from_result({**report.to_result(), "training_iteration": 3})
    >>> back.metrics == report.metrics, back.progress.done, back.outcome.value
    (True, 3, 'running')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping, Optional

__all__ = ["CHECKPOINT_FILE", "Unit", "Outcome", "Progress", "TrialReport", "PLAIN_METRICS"]

# The file a report's checkpoint directory holds (model, optimizer, scheduler, EMA, position, recipe, RNG).
CHECKPOINT_FILE = "checkpoint.pt"


class Unit(str, Enum):
    """What a trial's progress counts: epochs, or iterations (detection, step schedules)."""

    EPOCH = "epoch"
    ITERATION = "iteration"


class Outcome(str, Enum):
    """Where a trial stands after a report: still running, done with its schedule, or failed."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of the trial's schedule."""

    done: int
    total: int
    unit: Unit

    @property
    def complete(self) -> bool:
        return self.done >= self.total

    def as_dict(self) -> dict[str, Any]:
        return {"done": self.done, "total": self.total, "unit": self.unit.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Progress":
        return cls(int(data["done"]), int(data["total"]), Unit(data["unit"]))

    @classmethod
    def of_record(cls, record: Mapping[str, Any]) -> Optional["Progress"]:
        """A trial record's progress; records written before the typed report held epoch/epochs/unit."""
        if record.get("progress"):
            return cls.from_dict(record["progress"])
        if record.get("epochs"):
            return cls(int(record.get("epoch") or 0), int(record["epochs"]), Unit(record.get("unit", "epoch")))
        return None


# Metric names hold a "/" (val/top1, train/loss, data/skipped), except these.
PLAIN_METRICS = frozenset({"lr", "images_per_s", "epoch_s", "period_s"})
# The keys a report adds to Tune's result beside its metrics.
_DONE, _TOTAL, _UNIT = "report.done", "report.total", "report.unit"
_OUTCOME, _ERROR = "report.outcome", "report.error"


def _is_metric(key: str, value: Any) -> bool:
    named = ("/" in key and not key.startswith("config/")) or key in PLAIN_METRICS
    return named and isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrialReport:
    """One period of a trial: its metrics, its progress, and its outcome.

    Args:
        metrics: numbers named ``section/name`` (or one of ``PLAIN_METRICS``).
        progress: done / total of the schedule; None for a failure before any period ended.
        outcome: RUNNING each period; COMPLETED on the schedule's last; FAILED with ``error``.
        error: what went wrong, one line (``TrainingError: loss became non-finite ...``).
    """

    metrics: dict[str, float]
    progress: Optional[Progress] = None
    outcome: Outcome = Outcome.RUNNING
    error: Optional[str] = None

    def __post_init__(self) -> None:
        wrong = [k for k, v in self.metrics.items() if not _is_metric(k, v)]
        if wrong:
            raise ValueError(f"report metrics must be numbers named section/name or one of {sorted(PLAIN_METRICS)}, but got {wrong}")

    @classmethod
    def period(cls, metrics: dict[str, float], done: int, total: int, unit: Unit) -> "TrialReport":
        """The report of a period that ended: COMPLETED when it was the schedule's last."""
        progress = Progress(done, total, unit)
        return cls(metrics, progress, Outcome.COMPLETED if progress.complete else Outcome.RUNNING)

    @classmethod
    def failure(cls, objective: str, err: BaseException) -> "TrialReport":
        """A trial that failed for good (its recipe diverged or is invalid): the objective is NaN."""
        return cls({objective: math.nan}, None, Outcome.FAILED, f"{type(err).__name__}: {err}")

    @property
    def failed(self) -> bool:
        return self.outcome is Outcome.FAILED

    @property
    def completed(self) -> bool:
        return self.outcome is Outcome.COMPLETED

    def step(self) -> int:
        """The period's position on its trial's axis (epoch or iteration), for metric histories."""
        return self.progress.done if self.progress else 0

    def to_result(self) -> dict[str, Any]:
        """The flat dict handed to ``tune.report`` / ``ray.train.report``."""
        result: dict[str, Any] = dict(self.metrics)
        if self.progress is not None:
            result.update({_DONE: self.progress.done, _TOTAL: self.progress.total, _UNIT: self.progress.unit.value})
        result[_OUTCOME] = self.outcome.value
        if self.error is not None:
            result[_ERROR] = self.error
        return result

    @classmethod
    def from_result(cls, result: Optional[Mapping[str, Any]]) -> Optional["TrialReport"]:
        """The report inside a Tune result (None when the result holds none, e.g. Tune's own)."""
        if not result or _OUTCOME not in result:
            return None
        progress = None
        if _DONE in result:
            progress = Progress(int(result[_DONE]), int(result[_TOTAL]), Unit(result[_UNIT]))
        metrics = {k: float(v) for k, v in result.items() if _is_metric(k, v)}
        return cls(metrics, progress, Outcome(result[_OUTCOME]), result.get(_ERROR))
