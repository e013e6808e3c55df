"""Image classification from a ``Recipe``, built from timm's factories.

``train_classifier(recipe, session)`` is the whole trial: it runs as a Ray Train
worker function (DDP when several workers), directly inside a Tune trial, or
bare. Its stages: build the data (``build_classifier_data``), build the model,
optimizer, schedule, EMA, mixup and loss (``build_training``), then per period
train (``train_epoch``), evaluate (``evaluate_period``) and report a
``TrialReport`` with a checkpoint (``trainables.engine.report_period``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

import timm
import timm.layers
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2
from timm.layers import freeze_batch_norm_2d
from timm.models import get_pretrained_cfg
from timm.utils import ModelEmaV3

from spaces import ClassificationRecipe, DataError, RecipeError, TrainingError, validate_recipe
from spaces.recipe import init_checkpoint, step_schedule
from trainables.bit import zero_init_head
from trainables.checkpoints import load_weights
from trainables.data import MAX_UNREADABLE_FRACTION, build_datasets, collate_readable, shard
from trainables.engine import (
    TrainState,
    autocast,
    build_optimizer,
    build_step_scheduler,
    DivergenceCheck,
    distributed,
    optimizer_step,
    prepare_process,
    report_period,
    restore,
    unwrap,
)
from trainables.report import TrialReport, Unit
from trainables.session import Session
from trainables.system import SystemSampler

__all__ = [
    "ClassifierData",
    "Training",
    "build_classifier_data",
    "build_model",
    "build_scheduler",
    "build_mixup",
    "build_loss",
    "build_training",
    "build_transforms",
    "evaluate",
    "evaluate_period",
    "train_classifier",
    "train_epoch",
]

logger = logging.getLogger(__name__)
Recipe = ClassificationRecipe


def build_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """A timm model with the recipe's stochastic depth, normalization and initialization."""
    cfg = recipe.model
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": cfg.drop_path_rate}
    if cfg.norm == "gn":
        kwargs["norm_layer"] = timm.layers.GroupNorm  # 32 groups
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
        zero_init_head(model)
    if cfg.norm == "frozen_bn":
        model = freeze_batch_norm_2d(model)
    elif cfg.norm == "syncbn":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """timm's scheduler factory, stepped every iteration (warmup then decay)."""
    cfg = recipe.schedule
    decay: dict[str, Any] = {}
    if cfg.decay_rate is not None:  # only the schedules that use it hold one; timm's default otherwise
        decay["decay_rate"] = cfg.decay_rate
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
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
        **decay,
    )
    if scheduler is None:  # timm returns None for names it does not know
        raise RecipeError(f"schedule.name {cfg.name!r} is not a timm scheduler")
    return scheduler


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


def data_config(recipe: Recipe) -> dict[str, Any]:
    """Mean, std, interpolation and test crop: the recipe's, else the model's pretrained config (timm's;
    BiT weights expect inputs in [-1, 1], timm's ResNets ImageNet's mean and std)."""
    data = recipe.data
    pretrained = get_pretrained_cfg(recipe.model.name, allow_unregistered=True)
    if pretrained is not None:
        model = resolve_data_config(pretrained_cfg=pretrained.to_dict())
    else:  # a model registered without a pretrained config: timm's defaults
        model = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "interpolation": "bicubic", "crop_pct": DEFAULT_CROP_PCT}
    chosen = {"mean": data.mean, "std": data.std, "interpolation": data.interpolation, "crop_pct": data.crop_pct}
    return {key: model[key] if value is None else value for key, value in chosen.items()}


def _bit_transforms(recipe: Recipe, config: dict[str, Any]):
    """BiT's own: train squashed to (train_size x precrop) squared, a random train_size crop, a flip; test squashed to test_size."""
    from torchvision import transforms as T

    data = recipe.data
    mode = T.InterpolationMode.BICUBIC if config["interpolation"] == "random" else T.InterpolationMode(config["interpolation"])
    finish = [T.ToTensor(), T.Normalize(config["mean"], config["std"])]
    squash = round(data.train_size * data.precrop)
    train = T.Compose([T.Resize((squash, squash), mode), T.RandomCrop(data.train_size), T.RandomHorizontalFlip(data.hflip), *finish])
    evaluation = T.Compose([T.Resize((data.test_size, data.test_size), mode), *finish])
    return train, evaluation


def build_transforms(recipe: Recipe):
    """Train and eval transforms: timm's (random resized crop, flip, RandAugment, erasing; resize + center
    crop) or BiT's (``data.crop``); normalization, interpolation and test crop as the recipe or, where it
    sets none, the model's pretrained config says."""
    data = recipe.data
    config = data_config(recipe)
    if data.crop == "bit":
        return _bit_transforms(recipe, config)
    interpolation = config["interpolation"]
    train = create_transform(
        input_size=data.train_size,
        is_training=True,
        scale=tuple(data.scale),
        hflip=data.hflip,
        color_jitter=data.color_jitter,
        auto_augment=data.rand_augment,
        interpolation=interpolation,
        re_prob=data.random_erasing,
        mean=config["mean"],
        std=config["std"],
    )
    evaluation = create_transform(
        input_size=data.test_size,
        is_training=False,
        interpolation="bicubic" if interpolation == "random" else interpolation,
        crop_pct=config["crop_pct"],
        mean=config["mean"],
        std=config["std"],
    )
    return train, evaluation


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
        with autocast(recipe, device):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk.eq(targets[:, None])
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(dim=1).sum()
        sums[2] += nn.functional.cross_entropy(logits, targets, reduction="sum")
        sums[3] += targets.numel()
    if distributed():
        dist.all_reduce(sums)
    count = max(sums[3].item(), 1.0)
    return {
        "top1": sums[0].item() / count,
        "top5": sums[1].item() / count,
        "loss": sums[2].item() / count,
        "skipped": sums[4].item(),
    }


@dataclass
class ClassifierData:
    """The loaders of a trial and the shape of its schedule.

    A step schedule (BiT) runs ``periods`` loop epochs of ``eval_period`` updates each, over the
    training set repeated as often as it takes (few-shot sets are smaller than a batch).
    """

    train_loader: DataLoader
    val_loader: DataLoader
    sampler: Any
    num_classes: int
    size: int  # train + val images, for the share of undecodable ones
    periods: int  # loop epochs: evaluations and reports
    total_updates: Optional[int]  # a step schedule's length, None for an epoch schedule


class SeededRepeatAugSampler(RepeatAugSampler):
    """timm's RepeatAugSampler, shuffled by ``seed + epoch`` like torch's DistributedSampler (timm's uses the epoch alone)."""

    def __init__(self, dataset, num_replicas: int, rank: int, num_repeats: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, num_repeats=num_repeats)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(self.seed + epoch)


def _train_sampler(recipe: Recipe, dataset, session: Session, seed: int):
    if recipe.data.repeated_aug:
        if session.world_size < 2:  # timm's loader refuses it too: the repeats would share a batch
            raise RecipeError(f"data.repeated_aug={recipe.data.repeated_aug} needs runtime.workers >= 2 (an image's repeats go to different workers)")
        return SeededRepeatAugSampler(dataset, session.world_size, session.rank, recipe.data.repeated_aug, seed)
    if session.world_size > 1:
        return DistributedSampler(dataset, num_replicas=session.world_size, rank=session.rank, shuffle=True, seed=seed)
    return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))


def build_classifier_data(recipe: Recipe, session: Session) -> ClassifierData:
    """Datasets, transforms, the training sampler and both loaders of this worker."""
    seed, device = recipe.runtime.seed, session.device
    train_tf, eval_tf = build_transforms(recipe)
    data = build_datasets(recipe.data, seed, train_tf, eval_tf)
    size = len(data.train) + len(data.val)
    per_worker_batch = recipe.optim.batch_size // session.world_size
    total_updates, periods = None, recipe.schedule.epochs
    if recipe.schedule.iterations is not None:
        total_updates = step_schedule(recipe)[0]
        period = recipe.schedule.eval_period
        periods = math.ceil(total_updates / period)
        data.train = Subset(data.train, [i % len(data.train) for i in range(period * recipe.optim.batch_size)])
    if per_worker_batch > len(data.train):
        raise RecipeError(
            f"optim.batch_size {recipe.optim.batch_size} exceeds the {len(data.train)} training images "
            f"of {recipe.data.name!r} (per worker {per_worker_batch})"
        )
    sampler = _train_sampler(recipe, data.train, session, seed)
    loader_workers = 0 if recipe.data.name == "digits" else max(0, int(recipe.runtime.cpus_per_worker) - 1)
    train_loader = DataLoader(
        data.train, batch_size=per_worker_batch, sampler=sampler,
        drop_last=True,  # Mixup needs even, full batches
        collate_fn=collate_readable, num_workers=loader_workers,
        persistent_workers=loader_workers > 0, pin_memory=device.type == "cuda",
    )
    val_loader = DataLoader(
        shard(data.val, session.rank, session.world_size), batch_size=max(per_worker_batch, 64),
        collate_fn=collate_readable, num_workers=loader_workers, pin_memory=device.type == "cuda",
    )
    return ClassifierData(train_loader, val_loader, sampler, data.num_classes, size, periods, total_updates)


@dataclass
class Training:
    """What trains: the state a checkpoint holds, plus mixup and the loss."""

    state: TrainState
    mixup: Optional[Mixup]
    loss_fn: nn.Module

    @property
    def model(self) -> nn.Module:
        return self.state.model


def build_training(recipe: Recipe, session: Session, data: ClassifierData) -> Training:
    """Model (on the session's device, DDP under Ray Train), EMA, optimizer, schedule, mixup and loss."""
    model = build_model(recipe, data.num_classes)
    if recipe.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = session.prepare_model(model)
    ema = ModelEmaV3(unwrap(model), decay=recipe.reg.ema_decay, use_warmup=recipe.reg.ema_warmup) if recipe.reg.ema_decay else None
    optimizer = build_optimizer(recipe, model)
    if data.total_updates is not None:
        scheduler = build_step_scheduler(recipe, optimizer)
    else:
        scheduler = build_scheduler(recipe, optimizer, len(data.train_loader))
    mixup = build_mixup(recipe, data.num_classes)
    loss_fn = build_loss(recipe, mixup is not None).to(session.device)
    if recipe.runtime.compile:
        model = torch.compile(model)
    return Training(TrainState(model, optimizer, scheduler, ema, data.sampler), mixup, loss_fn)


@dataclass
class EpochStats:
    loss: float
    images: int
    skipped: int
    updates: int  # after the epoch, since the start of training


def _batch(images: torch.Tensor, targets: torch.Tensor, training: Training, recipe: Recipe, device: torch.device):
    """A batch on the device, mixed when the recipe mixes, in the recipe's memory format."""
    if training.mixup is not None and images.shape[0] % 2:
        images, targets = images[:-1], targets[:-1]  # Mixup pairs samples: an even batch
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if training.mixup is not None:
        images, targets = training.mixup(images, targets)
    if recipe.runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def train_epoch(training: Training, data: ClassifierData, recipe: Recipe, session: Session, epoch: int) -> EpochStats:
    """One pass of the training loader (a step schedule: one evaluation period of updates)."""
    state, device = training.state, session.device
    if hasattr(data.sampler, "set_epoch"):
        data.sampler.set_epoch(epoch)
    state.model.train()
    loss_sum = torch.zeros((), device=device)
    seen = skipped = 0
    updates = first = epoch * len(data.train_loader)
    divergence = DivergenceCheck(device, session.world_size)

    def where(update: int) -> str:
        return f"epoch {epoch + 1}, update {update} of the epoch (optim.name={recipe.optim.name}, optim.lr={recipe.optim.lr:g})"

    for step, (images, targets, batch_skipped) in enumerate(data.train_loader):
        skipped += batch_skipped
        if images is not None:
            images, targets = _batch(images, targets, training, recipe, device)
            with autocast(recipe, device):
                loss = training.loss_fn(state.model(images), targets)
            divergence.record(loss)
            optimizer_step(loss, state.model, state.optimizer, recipe.optim.grad_clip)
            updates += 1
            state.scheduler.step_update(num_updates=updates)
            if state.ema is not None:
                state.ema.update(unwrap(state.model), step=updates)
            loss_sum += loss.detach()
            seen += images.shape[0]
        if divergence.due(step):
            divergence.check(where)
        if data.total_updates is not None and updates >= data.total_updates:
            break
    divergence.check(where)
    state.scheduler.step(epoch + 1)
    return EpochStats(loss_sum.item() / max(updates - first, 1), seen, skipped, updates)


def evaluate_period(training: Training, data: ClassifierData, recipe: Recipe, session: Session, train_skipped: int) -> dict[str, float]:
    """``val/*`` (the EMA weights when the recipe keeps an EMA, as timm's train.py scores them; the raw
    model's then as ``val_model/*``) and ``data/skipped``; fails when too many images cannot be decoded."""
    model_metrics = evaluate(training.model, data.val_loader, session.device, recipe)
    skipped = torch.tensor([float(train_skipped)], dtype=torch.float64, device=session.device)
    if distributed():
        dist.all_reduce(skipped)  # evaluate() already summed its own count over workers
    metrics = {"data/skipped": skipped.item() + model_metrics.pop("skipped")}
    if metrics["data/skipped"] > MAX_UNREADABLE_FRACTION * data.size:
        raise DataError(
            f"{int(metrics['data/skipped'])} images of {recipe.data.name!r} could not be decoded "
            f"(more than {MAX_UNREADABLE_FRACTION:.0%} of {data.size}); their paths are in the trial's log"
        )
    if training.state.ema is not None:
        ema_metrics = evaluate(training.state.ema.module, data.val_loader, session.device, recipe)
        ema_metrics.pop("skipped")
        metrics.update({f"val/{k}": v for k, v in ema_metrics.items()})
        metrics.update({f"val_model/{k}": v for k, v in model_metrics.items()})
    else:
        metrics.update({f"val/{k}": v for k, v in model_metrics.items()})
    if not math.isfinite(metrics["val/loss"]):
        raise TrainingError(f"validation loss became {metrics['val/loss']}: the recipe diverged")
    return metrics


def _period_report(data: ClassifierData, stats: EpochStats, epoch: int, metrics: dict[str, float]) -> TrialReport:
    """Progress in iterations for a step schedule, in epochs otherwise."""
    if data.total_updates is not None:
        return TrialReport.period(metrics, stats.updates, data.total_updates, Unit.ITERATION)
    return TrialReport.period(metrics, epoch + 1, data.periods, Unit.EPOCH)


def train_classifier(recipe: Recipe | dict[str, Any], session: Session) -> TrialReport:
    """Train and evaluate one recipe; report every period to ``session``. Returns the last report."""
    recipe = validate_recipe(recipe)
    prepare_process(recipe, session)
    data = build_classifier_data(recipe, session)
    training = build_training(recipe, session, data)
    start = restore(training.state, session, Unit.EPOCH)
    system = SystemSampler(session.device)
    report = None
    for epoch in range(start, data.periods):
        started = time.perf_counter()
        stats = train_epoch(training, data, recipe, session, epoch)
        train_time = time.perf_counter() - started
        metrics = {
            "train/loss": stats.loss,
            "lr": training.state.optimizer.param_groups[0]["lr"],
            "images_per_s": stats.images * session.world_size / max(train_time, 1e-9),
        }
        metrics.update(evaluate_period(training, data, recipe, session, stats.skipped))
        metrics["epoch_s"] = time.perf_counter() - started
        metrics.update(system.sample())
        report = _period_report(data, stats, epoch, metrics)
        report_period(session, report, training.state, recipe, epoch + 1, Unit.EPOCH)
    return report
