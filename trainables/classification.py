"""Image classification from a ``Recipe``, built from timm's factories.

``train_classifier(recipe, session)`` is the whole trial: it runs as a Ray Train
worker function (DDP when several workers), directly inside a Tune trial, or
bare. Every epoch it evaluates and reports metrics plus a checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

import timm
import timm.layers
from timm.data import Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2
from timm.layers import freeze_batch_norm_2d
from timm.utils import ModelEmaV3

from spaces import OPTIMIZERS, DataError, Recipe, RecipeError, TrainingError, validate_recipe
from spaces.recipe import init_checkpoint, step_schedule
from trainables.checkpoints import CHECKPOINT_FILE, load_weights
from trainables.data import MAX_UNREADABLE_FRACTION, build_datasets, collate_readable, shard
from trainables.session import Session

__all__ = [
    "CHECKPOINT_FILE",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "build_step_scheduler",
    "build_mixup",
    "build_loss",
    "build_transforms",
    "seed_everything",
    "evaluate",
    "train_classifier",
    "load_checkpoint",
]



logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """A timm model with the recipe's stochastic depth, normalization and initialization."""
    cfg = recipe.model
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": cfg.drop_path_rate}
    if cfg.norm == "gn":
        kwargs["norm_layer"] = timm.layers.GroupNorm  # 32 groups
    if cfg.name.startswith("resnetv2_bit"):
        importlib.import_module("trainables.bit")  # registers the tiny GN+WS ResNet-v2 with timm
    try:
        model = timm.create_model(cfg.name, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise RecipeError(f"model.name: unknown timm model {cfg.name!r} (see timm.list_models())") from None
        raise
    checkpoint = init_checkpoint(cfg)
    if checkpoint is not None:
        # A new task gets a new classifier: the checkpoint's is left out (timm names it in pretrained_cfg).
        head = model.pretrained_cfg.get("classifier", "fc")
        heads = head if isinstance(head, (list, tuple)) else (head,)
        missing = load_weights(model, checkpoint, skip=tuple(f"{h}." for h in heads))
        if missing:
            logger.warning("model.init %s: %d tensors not in the checkpoint keep their initialization (e.g. %s)", checkpoint, len(missing), missing[0])
    if cfg.zero_head:
        from trainables.bit import zero_init_head

        zero_init_head(model)
    if cfg.norm == "frozen_bn":
        model = freeze_batch_norm_2d(model)
    elif cfg.norm == "syncbn":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory; biases and norm parameters get no weight decay."""
    cfg = recipe.optim
    kwargs: dict[str, Any] = {}
    if OPTIMIZERS[cfg.name].uses_momentum:
        kwargs["momentum"] = cfg.momentum
    return create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """timm's scheduler factory, stepped every iteration (warmup then decay)."""
    cfg = recipe.schedule
    decay: dict[str, Any] = {}
    if cfg.decay_epochs is not None:
        decay["decay_epochs"] = cfg.decay_epochs
    if cfg.decay_milestones:
        decay["decay_milestones"] = list(cfg.decay_milestones)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.name,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        decay_rate=cfg.decay_rate,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
        **decay,
    )
    if scheduler is None:  # timm returns None for names it does not know
        raise RecipeError(f"schedule.name {cfg.name!r} is not a timm scheduler")
    return scheduler


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


def build_mixup(recipe: Recipe, num_classes: int) -> Optional[Mixup]:
    """timm ``Mixup`` (mixup, cutmix and label smoothing as soft targets), or None when off."""
    reg = recipe.reg
    if reg.mixup_alpha <= 0 and reg.cutmix_alpha <= 0:
        return None
    return Mixup(
        mixup_alpha=reg.mixup_alpha,
        cutmix_alpha=reg.cutmix_alpha,
        label_smoothing=reg.label_smoothing,
        num_classes=num_classes,
    )


def build_loss(recipe: Recipe, mixup_active: bool) -> nn.Module:
    """The training loss, as timm's train.py picks it."""
    smoothing = recipe.reg.label_smoothing
    if recipe.loss.name == "bce":
        # With mixup the smoothing is already in the soft targets.
        return BinaryCrossEntropy(
            smoothing=0.0 if mixup_active else smoothing, target_threshold=recipe.loss.target_threshold
        )
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def build_transforms(recipe: Recipe):
    """timm train (random resized crop, flip, RandAugment, erasing) and eval (resize + center crop) transforms."""
    data = recipe.data
    train = create_transform(
        input_size=data.train_size,
        is_training=True,
        scale=tuple(data.scale),
        hflip=data.hflip,
        color_jitter=data.color_jitter,
        auto_augment=data.rand_augment,
        interpolation=data.interpolation,
        re_prob=data.random_erasing,
    )
    evaluation = create_transform(
        input_size=data.test_size,
        is_training=False,
        interpolation="bicubic" if data.interpolation == "random" else data.interpolation,
        crop_pct=data.crop_pct,
    )
    return train, evaluation


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _autocast(recipe: Recipe, device: torch.device):
    if recipe.runtime.amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, recipe: Recipe) -> dict[str, float]:
    """Top-1, top-5 and cross-entropy over the loader, summed across workers."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # correct1, correct5, loss, count, skipped
    for images, targets, skipped in loader:
        sums[4] += skipped
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if recipe.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(recipe, device):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk.eq(targets[:, None])
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(dim=1).sum()
        sums[2] += nn.functional.cross_entropy(logits, targets, reduction="sum")
        sums[3] += targets.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    count = max(sums[3].item(), 1.0)
    return {
        "top1": sums[0].item() / count,
        "top5": sums[1].item() / count,
        "loss": sums[2].item() / count,
        "skipped": sums[4].item(),
    }


def _diverged(loss: torch.Tensor, world_size: int) -> bool:
    """Whether the loss is NaN or infinite on any worker: all workers stop at the same step."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if world_size > 1:
        dist.all_reduce(bad)  # one float beside the gradient all-reduce; a lone stop would hang the others
    return bool(bad.item())


def optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: Optional[float]) -> None:
    """Backward, optional gradient-norm clipping, update."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


@dataclass
class _State:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Optional[ModelEmaV3]
    sampler: Any


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


def _save_checkpoint(state: _State, epoch: int, recipe: Recipe, directory: str) -> None:
    torch.save(
        {
            "model": _unwrap(state.model).state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "ema": state.ema.state_dict() if state.ema is not None else None,
            "epoch": epoch,
            "recipe": recipe.model_dump(mode="json"),
            "rng": _rng_state(state.sampler),
        },
        os.path.join(directory, CHECKPOINT_FILE),
    )


def load_checkpoint(directory: str) -> dict[str, Any]:
    """A checkpoint written by ``train_classifier`` (tensors and plain data only)."""
    return torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def _restore(state: _State, directory: str) -> int:
    ckpt = load_checkpoint(directory)
    _unwrap(state.model).load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if state.ema is not None and ckpt.get("ema") is not None:
        state.ema.load_state_dict(ckpt["ema"])
    if ckpt.get("rng") is not None:
        _set_rng_state(ckpt["rng"], state.sampler)
    return int(ckpt["epoch"])


def _train_sampler(recipe: Recipe, dataset, session: Session, seed: int):
    if recipe.data.repeated_aug:
        return RepeatAugSampler(
            dataset, num_replicas=session.world_size, rank=session.rank, num_repeats=recipe.data.repeated_aug
        )
    if session.world_size > 1:
        return DistributedSampler(dataset, num_replicas=session.world_size, rank=session.rank, shuffle=True, seed=seed)
    return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))


def train_classifier(recipe: Recipe | dict[str, Any], session: Session) -> dict[str, float]:
    """Train and evaluate one recipe; report every epoch to ``session``. Returns the last metrics."""
    recipe = validate_recipe(recipe)
    runtime = recipe.runtime
    device = session.device
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(runtime.cpus_per_worker)))
    seed = runtime.seed
    seed_everything(seed + session.rank)

    train_tf, eval_tf = build_transforms(recipe)
    data = build_datasets(recipe.data, seed, train_tf, eval_tf)
    per_worker_batch = recipe.optim.batch_size // session.world_size
    step_mode = recipe.schedule.iterations is not None
    total_updates, num_epochs = 0, recipe.schedule.epochs
    if step_mode:
        # A step schedule (BiT): one loop "epoch" is one evaluation period of updates over the
        # training set repeated as often as it takes (few-shot sets are smaller than a batch).
        total_updates = step_schedule(recipe)[0]
        period = recipe.schedule.eval_period
        num_epochs = math.ceil(total_updates / period)
        size = len(data.train)
        data.train = Subset(data.train, [i % size for i in range(period * recipe.optim.batch_size)])
    if per_worker_batch > len(data.train):
        raise RecipeError(
            f"optim.batch_size {recipe.optim.batch_size} exceeds the {len(data.train)} training images "
            f"of {recipe.data.name!r} (per worker {per_worker_batch})"
        )
    sampler = _train_sampler(recipe, data.train, session, seed)
    loader_workers = 0 if recipe.data.name == "digits" else max(0, int(runtime.cpus_per_worker) - 1)
    train_loader = DataLoader(
        data.train,
        batch_size=per_worker_batch,
        sampler=sampler,
        drop_last=True,  # Mixup needs even, full batches
        collate_fn=collate_readable,
        num_workers=loader_workers,
        persistent_workers=loader_workers > 0,
        pin_memory=device.type == "cuda",
    )
    val_loader = DataLoader(
        shard(data.val, session.rank, session.world_size),
        batch_size=max(per_worker_batch, 64),
        collate_fn=collate_readable,
        num_workers=loader_workers,
        pin_memory=device.type == "cuda",
    )

    model = build_model(recipe, data.num_classes)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = session.prepare_model(model)
    ema = ModelEmaV3(_unwrap(model), decay=recipe.reg.ema_decay) if recipe.reg.ema_decay else None
    optimizer = build_optimizer(recipe, model)
    updates_per_epoch = len(train_loader)
    scheduler = build_step_scheduler(recipe, optimizer) if step_mode else build_scheduler(recipe, optimizer, updates_per_epoch)
    state = _State(model, optimizer, scheduler, ema, sampler)
    mixup = build_mixup(recipe, data.num_classes)
    loss_fn = build_loss(recipe, mixup is not None).to(device)
    if runtime.compile:
        model = torch.compile(model)

    start_epoch = 0
    with session.restored_checkpoint() as path:
        if path:
            start_epoch = _restore(state, path)

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, num_epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
        seen = 0
        loss_sum = torch.zeros((), device=device)
        skipped = 0
        num_updates = epoch * updates_per_epoch
        first_update = num_updates
        for step, (images, targets, batch_skipped) in enumerate(train_loader):
            skipped += batch_skipped
            if images is None:
                continue
            if mixup is not None and images.shape[0] % 2:
                images, targets = images[:-1], targets[:-1]  # Mixup pairs samples: an even batch
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, targets)
            if runtime.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(recipe, device):
                loss = loss_fn(model(images), targets)
            if _diverged(loss, session.world_size):
                raise TrainingError(
                    f"loss became {'non-finite' if torch.isfinite(loss) else loss.item()} at epoch {epoch + 1}, step {step + 1}: "
                    f"the recipe diverged (optim.name={recipe.optim.name}, optim.lr={recipe.optim.lr:g})"
                )
            optimizer_step(loss, model, optimizer, recipe.optim.grad_clip)
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(_unwrap(model), step=num_updates)
            loss_sum += loss.detach()
            seen += images.shape[0]
            if step_mode and num_updates >= total_updates:
                break
        scheduler.step(epoch + 1)
        train_time = time.perf_counter() - started

        metrics = {
            "epoch": epoch + 1,
            "epochs": num_epochs,
            "train/loss": loss_sum.item() / max(num_updates - first_update, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": seen * session.world_size / max(train_time, 1e-9),
        }
        if step_mode:
            metrics.update({"iteration": num_updates, "iterations": total_updates})
        model_metrics = evaluate(model, val_loader, device, recipe)
        train_skipped = torch.tensor([float(skipped)], dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(train_skipped)  # evaluate() already summed its own count over workers
        metrics["data/skipped"] = train_skipped.item() + model_metrics.pop("skipped")
        dataset_size = len(data.train) + len(data.val)
        if metrics["data/skipped"] > MAX_UNREADABLE_FRACTION * dataset_size:
            raise DataError(
                f"{int(metrics['data/skipped'])} images of {recipe.data.name!r} could not be decoded in epoch {epoch + 1} "
                f"(more than {MAX_UNREADABLE_FRACTION:.0%} of {dataset_size}); their paths are in the trial's log"
            )
        if ema is not None:
            # As timm's train.py: the EMA weights are what the recipe delivers and
            # what is scored; the raw model's numbers are kept beside them.
            ema_metrics = evaluate(ema.module, val_loader, device, recipe)
            ema_metrics.pop("skipped")
            metrics.update({f"val/{k}": v for k, v in ema_metrics.items()})
            metrics.update({f"val_model/{k}": v for k, v in model_metrics.items()})
        else:
            metrics.update({f"val/{k}": v for k, v in model_metrics.items()})
        metrics["epoch_s"] = time.perf_counter() - started
        if not math.isfinite(metrics["val/loss"]):
            raise TrainingError(f"validation loss became {metrics['val/loss']} at epoch {epoch + 1}: the recipe diverged")

        if session.keeps_checkpoints and session.rank == 0:
            with tempfile.TemporaryDirectory(prefix="recipe-search-ckpt-") as directory:
                _save_checkpoint(state, epoch + 1, recipe, directory)
                session.report(metrics, directory)
        else:
            session.report(metrics, None)
    return metrics
