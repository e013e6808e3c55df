"""Where a training loop reports to: Ray Train workers, a Tune trial, or a plain list.

The same loop runs as a Ray Train worker function (several workers, DDP) and
directly inside a Tune trial (one worker: no worker group to start, which saves
most of the per-trial overhead), and bare for benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Optional, Protocol

import torch

from trainables.report import TrialReport

__all__ = ["Session", "TrainSession", "TuneSession", "LocalSession", "local_device"]


def local_device() -> torch.device:
    """The first visible GPU if any (Ray sets CUDA_VISIBLE_DEVICES per actor), else CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


class Session(Protocol):
    world_size: int
    rank: int
    device: torch.device
    keeps_checkpoints: bool

    def report(self, report: TrialReport, checkpoint_dir: Optional[str]) -> None: ...

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Optional[str]]: ...

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...


class TrainSession:
    """A Ray Train worker: device and DDP from Ray Train, reports via ``ray.train.report``."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.world_size = context.get_world_size()
        self.rank = context.get_world_rank()
        self.device = ray.train.torch.get_device()
        self.keeps_checkpoints = True

    def report(self, report: TrialReport, checkpoint_dir: Optional[str]) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(report.to_result(), checkpoint=checkpoint)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Optional[str]]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield path

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)


class TuneSession:
    """A Tune function trial running the loop itself, on the trial's own resources."""

    world_size = 1
    rank = 0
    keeps_checkpoints = True

    def __init__(self) -> None:
        self.device = local_device()

    def report(self, report: TrialReport, checkpoint_dir: Optional[str]) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(report.to_result(), checkpoint=checkpoint)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Optional[str]]:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield path

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)


class LocalSession:
    """No Ray: keeps the reports in memory; checkpoints optional (for benchmarks and tests)."""

    world_size = 1
    rank = 0

    def __init__(self, keep_checkpoints: bool = False, resume_from: Optional[str] = None) -> None:
        self.device = local_device()
        self.reports: list[TrialReport] = []
        self.checkpoints: list[str] = []
        self.keeps_checkpoints = keep_checkpoints
        self.resume_from = resume_from
        self._root = tempfile.mkdtemp(prefix="recipe-search-local-") if keep_checkpoints else None

    def report(self, report: TrialReport, checkpoint_dir: Optional[str]) -> None:
        self.reports.append(report)
        if checkpoint_dir and self._root:
            kept = os.path.join(self._root, f"epoch_{len(self.reports):04d}")
            shutil.copytree(checkpoint_dir, kept)
            self.checkpoints.append(kept)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Optional[str]]:
        yield self.resume_from

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

