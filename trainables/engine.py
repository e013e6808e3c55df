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
    "check_finite",
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


def check_finite(loss: torch.Tensor, world_size: int, where: Callable[[], str]) -> None:
    """Raise ``TrainingError`` on every worker at the same step when the loss is NaN or infinite on any."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if world_size > 1:
        dist.all_reduce(bad)  # one float beside the gradient all-reduce; a lone stop would hang the others
    if bad.item():
        raise TrainingError(f"loss became non-finite at {where()}: the recipe diverged")


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
    """Every random stream the loop draws from, as tensors and plain data (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    generator = getattr(sampler, "generator", None)
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "sampler": generator.get_state() if generator is not None else None,
    }


def _set_rng_state(state: dict[str, Any], sampler: Any) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    generator = getattr(sampler, "generator", None)
    if generator is not None and state.get("sampler") is not None:
        generator.set_state(state["sampler"])


def save_checkpoint(state: TrainState, recipe: Recipe, position: int, unit: Unit, directory: str) -> None:
    """Model, optimizer, scheduler, EMA, the loop's position (``epoch`` or ``iteration``), recipe and RNG streams.

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
            "rng": _rng_state(state.sampler),
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
        _set_rng_state(ckpt["rng"], state.sampler)
    return int(ckpt[unit.value])


def report_period(session: Session, report: TrialReport, state: TrainState, recipe: Recipe, position: int, unit: Unit) -> None:
    """Report a period; rank 0 of a session that keeps checkpoints attaches one."""
    if session.keeps_checkpoints and session.rank == 0:
        with tempfile.TemporaryDirectory(prefix="recipe-search-ckpt-") as directory:
            save_checkpoint(state, recipe, position, unit, directory)
            session.report(report, directory)
    else:
        session.report(report, None)
