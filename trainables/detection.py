"""Object detection from a ``Recipe``: torchvision Mask / Faster R-CNN with an FPN.

The architecture follows *Rethinking ImageNet Pre-training*: with ``model.norm=gn``
GroupNorm is in the backbone, the FPN, a 4conv1fc box head and the 4-conv mask
head, so a detector can train from random initialization. ``frozen_bn`` is the
classic fine-tuning baseline (frozen backbone statistics, no norm in FPN and
heads, 2fc box head). Training runs by iterations with detectron2's warmup +
multi-step schedule; every ``schedule.eval_period`` iterations the model is
scored with pycocotools and a checkpoint is reported (one Tune iteration).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from timm.layers import freeze_batch_norm_2d
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.misc import FrozenBatchNorm2d


from spaces import DetectionRecipe, RecipeError, validate_recipe
from spaces.recipe import init_checkpoint, step_schedule
from trainables.checkpoints import load_weights
from trainables.coco import CocoDetection, coco_evaluate, coco_layout, collate_detection, detections_to_coco, digits_det_root, subset_image_ids
from trainables.engine import (
    TrainState,
    autocast,
    build_optimizer,
    build_step_scheduler,
    DivergenceCheck,
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
    "build_detector",
    "detection_datasets",
    "evaluate_detector",
    "load_backbone_weights",
    "train_detector",
    "train_sizes",
]

logger = logging.getLogger(__name__)
Recipe = DetectionRecipe
GN_GROUPS = 32  # GroupNorm(32) as in the paper and detectron2
_RETURN_LAYERS = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def _norm_layer(norm: str):
    if norm == "gn":
        return partial(nn.GroupNorm, GN_GROUPS)
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    return nn.BatchNorm2d  # bn; syncbn is converted once the model is built


def train_sizes(recipe: Recipe) -> tuple[int, ...]:
    """Shorter sides drawn per image at training: ``train_size`` (one, or the list), or five sizes over the scale-jitter range."""
    data = recipe.data
    if isinstance(data.train_size, list):
        return tuple(sorted(set(data.train_size)))
    if not data.scale_jitter:
        return (data.train_size,)
    low, high = data.train_size * (1 - data.scale_jitter), data.train_size * (1 + data.scale_jitter)
    return tuple(sorted({int(round(s)) for s in np.linspace(low, high, 5)}))


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a classification ResNet's weights into the detector's backbone (its classifier dropped)."""
    missing = load_weights(backbone, path, skip=("fc.",))
    if missing:
        # e.g. BN running statistics when the checkpoint was trained with GroupNorm
        logger.warning("model.init %s: %d backbone tensors not in the checkpoint keep their initialization (e.g. %s)", path, len(missing), missing[0])


_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))  # detectron2's stem, res2 .. res5


def freeze_stages(backbone: nn.Module, freeze_at: int) -> None:
    """detectron2's FREEZE_AT on a torchvision ResNet: the first ``freeze_at`` stages keep their weights (no
    gradients), and their BatchNorm layers their statistics (frozen BN, as detectron2 freezes them)."""
    for stage in _STAGES[:freeze_at]:
        for name in stage:
            module = getattr(backbone, name)
            module.requires_grad_(False)
            setattr(backbone, name, freeze_batch_norm_2d(module))


def build_detector(recipe: Recipe, num_classes: int) -> nn.Module:
    """Mask or Faster R-CNN, ResNet + FPN, normalized as the recipe says. ``num_classes`` includes background."""
    cfg = recipe.model
    norm = _norm_layer(cfg.norm)
    head_norm = None if cfg.norm == "frozen_bn" else norm  # classic fine-tuning: no norm outside the backbone
    backbone = getattr(torchvision.models, cfg.backbone)(weights=None, norm_layer=norm)
    checkpoint = init_checkpoint(cfg)
    if checkpoint is not None:
        load_backbone_weights(backbone, checkpoint)
    freeze_stages(backbone, cfg.freeze_at)
    stage2 = backbone.inplanes // 8
    width = cfg.fpn_channels
    body = BackboneWithFPN(backbone, _RETURN_LAYERS, [stage2 * 2**i for i in range(4)], width, norm_layer=head_norm)
    anchors = AnchorGenerator(sizes=tuple((s,) for s in cfg.anchor_sizes), aspect_ratios=(_ASPECT_RATIOS,) * len(cfg.anchor_sizes))
    fc = 4 * width  # 1024 at the paper's 256 channels
    if head_norm is not None:
        box_head: nn.Module = FastRCNNConvFCHead((width, 7, 7), [width] * 4, [fc], norm_layer=head_norm)  # 4conv1fc
    else:
        box_head = TwoMLPHead(width * 7 * 7, fc)
    common = dict(
        min_size=train_sizes(recipe),
        max_size=recipe.data.max_size,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(width, len(_ASPECT_RATIOS)),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(fc, num_classes),
        box_batch_size_per_image=cfg.roi_batch_size,
        box_detections_per_img=cfg.detections_per_image,
        # torchvision's defaults at cfg.proposals=1000: 2000 / 1000 before and after NMS
        rpn_pre_nms_top_n_train=2 * cfg.proposals,
        rpn_post_nms_top_n_train=2 * cfg.proposals,
        rpn_pre_nms_top_n_test=cfg.proposals,
        rpn_post_nms_top_n_test=cfg.proposals,
    )
    if cfg.name == "mask_rcnn":
        model: nn.Module = MaskRCNN(
            body,
            mask_head=MaskRCNNHeads(width, [width] * 4, 1, norm_layer=head_norm),
            mask_predictor=MaskRCNNPredictor(width, width, num_classes),
            **common,
        )
    else:
        model = FasterRCNN(body, **common)
    if cfg.norm == "syncbn":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@dataclass
class DetectionData:
    train: CocoDetection
    val: CocoDetection
    num_classes: int  # with background


def detection_datasets(recipe: Recipe) -> DetectionData:
    """Train (seeded subset: fraction, max_images) and val COCO datasets of the recipe."""
    data = recipe.data
    root = digits_det_root() if data.name == "digits-det" else data.name
    layout = coco_layout(root)
    masks = recipe.model.name == "mask_rcnn"
    train = CocoDetection(layout.train_json, layout.train_images, masks=masks, hflip=data.hflip)
    if data.fraction < 1.0 or data.max_images is not None:
        ids = subset_image_ids(train.image_ids, data.fraction, data.max_images, recipe.runtime.seed)
        train = CocoDetection(layout.train_json, layout.train_images, masks=masks, hflip=data.hflip, image_ids=ids)
    val = CocoDetection(layout.val_json, layout.val_images, masks=masks, hflip=0.0)
    return DetectionData(train, val, train.num_classes)


class _EvalSize:
    """The model resizes to ``data.test_size`` while evaluating, to the train sizes otherwise."""

    def __init__(self, model: nn.Module, size: int) -> None:
        self.transform = unwrap(model).transform
        self.size = size

    def __enter__(self) -> None:
        self.saved = self.transform.min_size
        self.transform.min_size = (self.size,)

    def __exit__(self, *exc: Any) -> None:
        self.transform.min_size = self.saved


@torch.no_grad()
def evaluate_detector(model: nn.Module, val: CocoDetection, recipe: Recipe, session: Session) -> dict[str, float]:
    """COCO AP with pycocotools on the val set; workers score shards, rank 0 runs COCOeval."""
    device = session.device
    image_ids = val.image_ids[session.rank :: session.world_size]
    shard = torch.utils.data.Subset(val, range(session.rank, len(val), session.world_size))
    loader = DataLoader(shard, batch_size=4, collate_fn=collate_detection)
    inner = unwrap(model)
    inner.eval()
    masks = recipe.model.name == "mask_rcnn"
    results: list[dict[str, Any]] = []
    done = 0
    with _EvalSize(inner, recipe.data.test_size):
        for images, _ in loader:
            with autocast(recipe, device):
                outputs = inner([image.to(device) for image in images])
            outputs = [{k: v.float().cpu() for k, v in out.items()} for out in outputs]
            results += detections_to_coco(outputs, image_ids[done : done + len(images)], val.label_to_category, masks)
            done += len(images)
    if session.world_size > 1:
        gathered: list[Any] = [None] * session.world_size
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    metrics: list[Any] = [None]
    if session.rank == 0:
        iou_types = ("bbox", "segm") if masks else ("bbox",)
        metrics[0] = coco_evaluate(val.coco, results, iou_types, image_ids=val.image_ids)
    if session.world_size > 1:
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0]


class _PassOrder(torch.utils.data.Sampler):
    """This worker's image order for pass ``epoch`` over the data (a seeded DistributedSampler's); the first
    pass after a resume starts ``skip`` images in."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        order = list(self.sampler)[self.skip :]
        self.skip = 0
        return iter(order)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


@dataclass
class PeriodStats:
    losses: dict[str, float]  # train/<loss> means over the period
    images: int
    seconds: float


class _Batches:
    """The training batches of this worker from any iteration on: passes of a seeded sampler, resumable mid-pass,
    through one DataLoader whose worker processes live across evaluation periods."""

    def __init__(self, recipe: Recipe, data: DetectionData, session: Session) -> None:
        self.per_worker = recipe.optim.batch_size // session.world_size
        if self.per_worker * session.world_size > len(data.train):
            raise RecipeError(
                f"optim.batch_size {recipe.optim.batch_size} exceeds the {len(data.train)} training images of {recipe.data.name!r}"
            )
        sampler = DistributedSampler(
            data.train, num_replicas=session.world_size, rank=session.rank, shuffle=True, seed=recipe.runtime.seed, drop_last=True
        )
        self.per_pass = len(sampler) // self.per_worker
        self.order = _PassOrder(sampler)
        workers = 0 if recipe.data.name == "digits-det" else max(0, int(recipe.runtime.cpus_per_worker) - 1)
        self.loader = DataLoader(
            data.train, batch_size=self.per_worker, sampler=self.order, drop_last=True, collate_fn=collate_detection,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=session.device.type == "cuda",
            # Its own seeds for the loader processes: starting a pass (a resume starts one mid-way) does not
            # draw from the global RNG, whose streams the checkpoint holds for the model's own sampling.
            generator=torch.Generator().manual_seed(recipe.runtime.seed + session.rank),
        )

    def starting_at(self, iteration: int) -> Iterator[tuple[list, list]]:
        """Batches from ``iteration`` on, pass after pass."""
        epoch, position = divmod(iteration, self.per_pass)
        self.order.skip = position * self.per_worker
        while True:
            self.order.epoch = epoch
            yield from self.loader
            epoch += 1


def train_period(state: TrainState, batches: Iterator, recipe: Recipe, session: Session, iteration: int, end: int) -> tuple[int, PeriodStats]:
    """Train from ``iteration`` to ``end`` on the next batches; the iteration reached and the period's mean losses."""
    device, model = session.device, state.model
    model.train()
    started = time.perf_counter()
    sums: dict[str, torch.Tensor] = {}
    seen, first = 0, iteration
    divergence = DivergenceCheck(device, session.world_size)

    def where(update: int) -> str:
        return f"iteration {first + update} (optim.lr={recipe.optim.lr:g}, model.norm={recipe.model.norm}, model.init={recipe.model.init})"

    while iteration < end:
        images, targets = next(batches)
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with autocast(recipe, device):
            losses = model(images, targets)
        loss = sum(losses.values())
        divergence.record(loss)
        optimizer_step(loss, model, state.optimizer, recipe.optim.grad_clip)
        iteration += 1
        state.scheduler.step_update(num_updates=iteration)
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        sums["loss"] = sums.get("loss", 0.0) + loss.detach().float()
        seen += len(images)
        if divergence.due(iteration - first - 1):
            divergence.check(where)
    divergence.check(where)
    done = max(iteration - first, 1)
    return iteration, PeriodStats({f"train/{name}": float(total) / done for name, total in sums.items()}, seen, time.perf_counter() - started)


def train_detector(recipe: Recipe | dict[str, Any], session: Session) -> TrialReport:
    """Train one detection recipe; report COCO AP and a checkpoint every eval period. Returns the last report."""
    recipe = validate_recipe(recipe)
    prepare_process(recipe, session)
    data = detection_datasets(recipe)
    batches = _Batches(recipe, data, session)
    model = session.prepare_model(build_detector(recipe, data.num_classes))
    optimizer = build_optimizer(recipe, model)
    state = TrainState(model, optimizer, build_step_scheduler(recipe, optimizer))  # detectron2's WarmupMultiStepLR
    iterations, period = step_schedule(recipe)[0], recipe.schedule.eval_period
    iteration = restore(state, session, Unit.ITERATION)
    state.scheduler.step_update(num_updates=iteration)
    stream = batches.starting_at(iteration)
    system = SystemSampler(session.device)
    report = None
    while iteration < iterations:
        end = min(iterations, (iteration // period + 1) * period)
        iteration, stats = train_period(state, stream, recipe, session, iteration, end)
        metrics = {
            **stats.losses,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": stats.images * session.world_size / max(stats.seconds, 1e-9),
            "period_s": stats.seconds,
        }
        metrics.update({f"val/{k}": v for k, v in evaluate_detector(model, data.val, recipe, session).items()})
        metrics.update(system.sample())
        report = TrialReport.period(metrics, iteration, iterations, Unit.ITERATION)
        report_period(session, report, state, recipe, iteration, Unit.ITERATION)
    return report
