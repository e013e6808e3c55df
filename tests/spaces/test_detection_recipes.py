"""Detection presets follow Rethinking ImageNet Pre-training; detection recipes fail clearly when inconsistent."""

from __future__ import annotations

import pytest

from spaces import RecipeError, load_space, resolve_recipe
from spaces.recipe import check_applies, detection_schedule, init_checkpoint
from spaces.recipes import coco_equivalent_1x, rethinking_schedule

# reference/RECIPES.md: 1x = 90k at batch 16, drops in the last 60k and 20k; 9x as detectron2.
SCHEDULES = {
    1: (90_000, [30_000, 70_000]),
    2: (180_000, [120_000, 160_000]),
    3: (270_000, [210_000, 250_000]),
    6: (540_000, [480_000, 520_000]),
}


@pytest.mark.parametrize("multiple", sorted(SCHEDULES))
def test_nx_schedule_arithmetic(multiple):
    keys = rethinking_schedule(multiple)
    assert (keys["schedule.iterations"], keys["schedule.steps"]) == SCHEDULES[multiple]
    assert keys["optim.lr"] == 0.02 and keys["optim.batch_size"] == 16
    assert keys["schedule.warmup_iters"] == 1000 and keys["schedule.warmup_factor"] == 0.001


def test_9x_is_detectron2s_batch_64_schedule():
    r = resolve_recipe("scratch-maskrcnn-r50-gn-9x")
    assert (r.schedule.iterations, r.schedule.steps) == (202_500, [187_500, 197_500])
    assert (r.optim.batch_size, r.optim.lr) == (64, 0.08)


@pytest.mark.parametrize(
    "name, iterations, steps",
    [("scratch-maskrcnn-r50-gn-3x", 270_000, [210_000, 250_000]), ("scratch-maskrcnn-r50-gn-6x", 540_000, [480_000, 520_000])],
)
def test_paper_presets(name, iterations, steps):
    r = resolve_recipe(name)
    assert (r.task, r.model.name, r.model.backbone, r.model.norm, r.model.init) == ("detection", "mask_rcnn", "resnet50", "gn", "scratch")
    assert (r.schedule.iterations, r.schedule.steps) == (iterations, steps)
    assert (r.optim.name, r.optim.momentum, r.optim.weight_decay, r.optim.lr) == ("momentum", 0.9, 1e-4, 0.02)
    assert (r.data.train_size, r.data.max_size, r.data.hflip) == (800, 1333, 0.5)


def test_pretrained_and_syncbn_variants():
    assert resolve_recipe("pretrained-maskrcnn-r50-gn-3x").model.init == "pretrained"
    sync = resolve_recipe("pretrained-maskrcnn-r50-syncbn-3x")
    assert sync.model.norm == "syncbn" and sync.runtime.gpus_per_worker == 1 and sync.runtime.workers == 8


def test_multiplier_keeps_drops_at_the_same_distance_from_the_end():
    r = resolve_recipe("scratch-maskrcnn-r50-gn-3x", {"schedule.multiplier": 2})
    assert detection_schedule(r.schedule) == (540_000, [480_000, 520_000])
    digits = resolve_recipe("scratch-det-digits", {"schedule.multiplier": 3})
    assert detection_schedule(digits.schedule) == (600, [467, 556])


def test_small_data_keeps_cocos_epochs():
    assert coco_equivalent_1x(118_287, 16) == 90_000
    assert coco_equivalent_1x(11_829, 16) == 9_000  # 10% of COCO: a tenth of the iterations


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"data.name": "digits"}, "digits-det"),
        ({"model.norm": "syncbn"}, "SyncBatchNorm layers only work with GPU modules"),
        ({"reg.mixup_alpha": 0.2}, "reg.mixup_alpha is a classification key; recipe scratch-det-digits is detection"),
        ({"model.backbone": "resnet152"}, "model.backbone: input should be 'resnet18', 'resnet34', 'resnet50' or 'resnet101', but got 'resnet152'"),
        ({"model.name": "resnet50"}, "model.name: input should be 'mask_rcnn' or 'faster_rcnn', but got 'resnet50'"),
        ({"schedule.steps": [250, 100]}, "schedule.steps must increase"),
        ({"schedule.multiplier": 0.1}, "every drop must come after"),
        ({"model.fpn_channels": 48}, "multiple of 32"),
        ({"model.anchor_sizes": [8, 16]}, "5 positive sizes"),
    ],
)
def test_bad_detection_recipes_name_the_problem(overrides, fragment):
    with pytest.raises(RecipeError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as err:
        resolve_recipe("scratch-det-digits", overrides)
    assert "\n" not in str(err.value)


def test_classification_refuses_detection_only_settings():
    with pytest.raises(RecipeError, match="task=detection"):
        resolve_recipe("rsb-digits", {"data.name": "digits-det"})
    # A step-schedule key on an epoch schedule does not apply: --set refuses it, saying what it needs.
    recipe = resolve_recipe("rsb-digits", {"schedule.multiplier": 2})
    assert "multiplier" not in recipe.model_dump()["schedule"]
    with pytest.raises(RecipeError, match=r"--set schedule.multiplier does not apply to recipe rsb-digits .*needs a step schedule"):
        check_applies(recipe, ["schedule.multiplier"], "recipe rsb-digits", "--set ")


def test_init_pretrained_reads_model_pretrained():
    r = resolve_recipe("scratch-det-digits", {"model.init": "pretrained", "model.pretrained": "/ckpt/r18.pt"})
    assert init_checkpoint(r.model) == "/ckpt/r18.pt"
    assert init_checkpoint(resolve_recipe("scratch-det-digits").model) is None
    with pytest.raises(RecipeError, match="model.pretrained=PATH"):
        init_checkpoint(resolve_recipe("scratch-det-digits", {"model.init": "pretrained"}).model)


def test_det_and_rethinking_spaces_validate_at_every_edge():
    det = load_space("det")
    assert det.metric == "val/bbox_AP"
    assert {"optim.lr", "schedule.warmup_iters", "schedule.multiplier", "optim.weight_decay", "model.norm", "model.init", "data.scale_jitter"} <= set(det.params)
    det.check({"model.pretrained": "/ckpt"})
    load_space("rethinking").check({"model.pretrained": "/ckpt"})
