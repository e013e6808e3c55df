"""What every training loop shares: process set-up, the optimizer and step schedule, the
update step, the divergence check, and checkpoints that resume to the same numbers.

``train_classifier`` and ``train_detector`` are built from these stages; neither
reaches into the other.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import MultiStepLRScheduler

from spaces import Recipe, TrainingError
from spaces.recipe import step_schedule
from trainables.report import CHECKPOINT_FILE
from trainables.report import TrialReport, Unit
from trainables.session import Session

__all__ = [
    "TrainState",
    "autocast",
    "build_optimizer",
    "build_step_scheduler",
    "CHECK_EVERY",
    "DivergenceCheck",
    "distributed",
    "load_checkpoint",
    "optimizer_step",
    "prepare_process",
    "report_period",
    "restore",
    "save_checkpoint",
    "seed_everything",
    "unwrap",
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_process(recipe: Recipe, session: Session) -> None:
    """CPU threads as the recipe reserves them, and every RNG seeded (per rank)."""
    if session.device.type == "cpu":
        torch.set_num_threads(max(1, int(recipe.runtime.cpus_per_worker)))
    seed_everything(recipe.runtime.seed + session.rank)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP and ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def autocast(recipe: Recipe, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU when the recipe asks for mixed precision; CPU runs fp32."""
    if recipe.runtime.amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory; biases and norm parameters get no weight decay."""
    cfg = recipe.optim
    kwargs: dict[str, Any] = {}
    if cfg.momentum is not None:  # the recipe holds a momentum only for optimizers that take one
        kwargs["momentum"] = cfg.momentum
    return create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def build_step_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer) -> MultiStepLRScheduler:
    """A step schedule (``schedule.iterations``) through timm: linear warmup from lr * factor, LR / 10 at each step.

    detectron2's WarmupMultiStepLR and the BiT-HyperRule's schedule are both this shape.
    """
    _, steps, warmup = step_schedule(recipe)
    return MultiStepLRScheduler(
        optimizer,
        decay_t=[s + 1 for s in steps],  # timm applies milestone m at t = m - 1; the papers drop at iteration m
        decay_rate=0.1,
        warmup_t=warmup,
        warmup_lr_init=recipe.optim.lr * recipe.schedule.warmup_factor,
        warmup_prefix=False,  # steps count from iteration 0, warmup included
        t_in_epochs=False,
    )


CHECK_EVERY = 20  # training steps between checks of the loss: one host sync (one all-reduce under DDP) each


class DivergenceCheck:
    """Whether the loss stayed finite, checked without making each training step wait for the device.

    ``record`` keeps on the device the first update whose loss was NaN or infinite (no host sync);
    ``due`` says when to ``check``: every ``CHECK_EVERY`` steps of the loader and at the end of a period,
    the same steps on every rank. ``check`` is one host sync (and under DDP one all-reduce of one number,
    so every rank stops at the same step) and raises ``TrainingError`` naming the update. A diverged
    recipe trains at most ``CHECK_EVERY`` steps more before it stops.
    """

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.world_size = world_size
        self.updates = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def record(self, loss: torch.Tensor) -> None:
        self.updates += 1
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), self.updates, self.first_bad)

    @staticmethod
    def due(step: int) -> bool:
        return (step + 1) % CHECK_EVERY == 0

    def check(self, where: Callable[[int], str]) -> None:
        """``where(k)`` describes the k-th update (from 1) recorded by this check's owner."""
        bad = (self.first_bad >= 0).float().reshape(1)
        if self.world_size > 1:
            dist.all_reduce(bad)  # a lone stop would leave the other ranks waiting in the gradient all-reduce
        if bad.item():
            first = int(self.first_bad.item())
            place = where(first) if first > 0 else "another worker's step"
            raise TrainingError(f"loss became non-finite at {place}: the recipe diverged")


def optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: Optional[float]) -> None:
    """Backward, optional gradient-norm clipping, update."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


@dataclass
class TrainState:
    """Everything a checkpoint holds besides the recipe: the training can go on from it exactly."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Optional[nn.Module] = None
    sampler: Any = None


def _rng_state(sampler: Any) -> dict[str, Any]:
    """Every random stream this process's loop draws from, as tensors and plain data (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    generator = getattr(sampler, "generator", None)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "sampler": generator.get_state() if generator is not None else None,
    }


def _rng_states(sampler: Any) -> list[dict[str, Any]]:
    """Every rank's random streams, in rank order (a collective under DDP: every rank calls it)."""
    mine = _rng_state(sampler)
    if not distributed():
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def _set_rng_state(saved: list[dict[str, Any]] | dict[str, Any], sampler: Any, rank: int) -> None:
    """This rank's streams as saved; a rank the checkpoint has no streams for keeps its seeded ones."""
    if isinstance(saved, dict):  # written before checkpoints held every rank's streams: rank 0's
        saved = [saved]
    if rank >= len(saved):
        return
    state = saved[rank]
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    generator = getattr(sampler, "generator", None)
    if generator is not None and state.get("sampler") is not None:
        generator.set_state(state["sampler"])


def save_checkpoint(state: TrainState, recipe: Recipe, position: int, unit: Unit, directory: str, rng: list[dict[str, Any]]) -> None:
    """Model, optimizer, scheduler, EMA, the loop's position (``epoch`` or ``iteration``), recipe and every rank's RNG streams.

    ``delivers`` names the weights the trial's metrics (``val/*``) were measured on: ``ema`` when
    the recipe keeps an EMA (``model`` holds the raw weights then), else ``model``.
    """
    torch.save(
        {
            "model": unwrap(state.model).state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "ema": state.ema.state_dict() if state.ema is not None else None,
            "delivers": "ema" if state.ema is not None else "model",
            unit.value: position,
            "recipe": recipe.model_dump(mode="json"),
            "rng": rng,
        },
        os.path.join(directory, CHECKPOINT_FILE),
    )


def load_checkpoint(directory: str) -> dict[str, Any]:
    """A checkpoint written by a training loop of this project (tensors and plain data only)."""
    return torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def restore(state: TrainState, session: Session, unit: Unit) -> int:
    """Load the session's checkpoint into ``state``, if it has one; the position to go on from (0 if none)."""
    with session.restored_checkpoint() as path:
        if not path:
            return 0
        ckpt = load_checkpoint(path)
    unwrap(state.model).load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if state.ema is not None and ckpt.get("ema") is not None:
        state.ema.load_state_dict(ckpt["ema"])
    if ckpt.get("rng") is not None:
        _set_rng_state(ckpt["rng"], state.sampler, session.rank)
    return int(ckpt[unit.value])


def report_period(session: Session, report: TrialReport, state: TrainState, recipe: Recipe, position: int, unit: Unit) -> None:
    """Report a period; rank 0 of a session that keeps checkpoints attaches one, with every rank's RNG streams."""
    rng = _rng_states(state.sampler) if session.keeps_checkpoints else None
    if session.keeps_checkpoints and session.rank == 0:
        with tempfile.TemporaryDirectory(prefix="recipe-search-ckpt-") as directory:
            save_checkpoint(state, recipe, position, unit, directory, rng)
            session.report(report, directory)
    else:
        session.report(report, None)
