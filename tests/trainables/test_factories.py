"""Every registry entry builds through timm; data, models and losses behave as a user expects."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from spaces import SCHEDULES, DataError, RecipeError, resolve_recipe
from trainables.classification import (
    build_loss,
    build_mixup,
    build_model,
    build_scheduler,
    build_transforms,
)
from trainables.engine import build_optimizer

# The optimizers the presets and spaces name, and a few more of timm's registry.
OPTIMIZERS = ("adam", "adamw", "lamb", "lars", "lion", "momentum", "rmsproptf", "sgd")
from trainables.data import build_datasets, check_image_folder, stratified_subset

TINY = {"model.name": "test_resnet", "data.train_size": 32, "data.test_size": 32}


def _recipe(**overrides):
    return resolve_recipe("rsb-digits", {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}})


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_is_timm_and_steps(name):
    recipe = _recipe(optim__name=name, optim__lr=1e-3)
    # timm says which optimizers take a momentum: the recipe holds one exactly for those, and it reaches them.
    takes = timm.optim.get_optimizer_info(name).has_momentum
    assert (recipe.optim.momentum is not None) == takes
    model = build_model(recipe, 10)
    optimizer = build_optimizer(recipe, model)
    if takes:
        assert optimizer.defaults["momentum"] == 0.9
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_no_weight_decay_on_biases_and_norms():
    recipe = _recipe(optim__weight_decay=0.05)
    optimizer = build_optimizer(recipe, build_model(recipe, 10))
    decays = {g["weight_decay"]: sum(p.ndim for p in g["params"]) for g in optimizer.param_groups}
    assert set(decays) == {0.0, 0.05}
    no_decay = next(g for g in optimizer.param_groups if g["weight_decay"] == 0.0)
    assert all(p.ndim <= 1 for p in no_decay["params"])


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_builds_and_warms_up_per_iteration(name):
    decay = {"step": {"schedule__decay_epochs": 3}, "multistep": {"schedule__decay_milestones": [3, 6]}}.get(name, {})
    recipe = _recipe(schedule__name=name, schedule__epochs=10, schedule__warmup_epochs=2, optim__lr=0.1, **decay)
    optimizer = build_optimizer(recipe, build_model(recipe, 10))
    scheduler = build_scheduler(recipe, optimizer, updates_per_epoch=5)
    lrs = []
    for update in range(1, 51):
        scheduler.step_update(num_updates=update)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] < lrs[8] <= 0.1 + 1e-9  # linear warmup over the first 10 updates
    assert lrs[-1] < 0.1


def test_cosine_decays_to_min_lr():
    recipe = _recipe(schedule__epochs=4, schedule__warmup_epochs=1, optim__lr=0.1, schedule__min_lr=1e-5)
    optimizer = build_optimizer(recipe, build_model(recipe, 10))
    scheduler = build_scheduler(recipe, optimizer, updates_per_epoch=10)
    scheduler.step_update(num_updates=40)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5, rel=0.05)


@pytest.mark.parametrize("loss_name", ["bce", "ce"])
@pytest.mark.parametrize("mixup", [0.0, 0.2])
def test_losses_take_the_targets_mixup_produces(loss_name, mixup):
    recipe = _recipe(loss__name=loss_name, reg__mixup_alpha=mixup, reg__cutmix_alpha=0.0, reg__label_smoothing=0.1)
    mix = build_mixup(recipe, 10)
    assert (mix is None) == (mixup == 0.0)
    loss_fn = build_loss(recipe, mix is not None)
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    if mix is not None:
        images, targets = mix(images, targets)
        assert targets.shape == (8, 10)
    loss = loss_fn(torch.randn(8, 10, requires_grad=True), targets)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_bce_applies_the_target_threshold():
    recipe = _recipe(loss__name="bce", loss__target_threshold=0.2)
    loss_fn = build_loss(recipe, mixup_active=True)
    assert loss_fn.target_threshold == 0.2


@pytest.mark.parametrize("norm", ["bn", "gn", "frozen_bn"])
def test_norm_choices(norm):
    model = build_model(_recipe(model__name="resnet18", model__norm=norm), 10)
    kinds = {type(m).__name__ for m in model.modules()}
    if norm == "gn":
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert "GroupNorm" in kinds
    elif norm == "frozen_bn":
        assert "FrozenBatchNorm2d" in kinds and "BatchNorm2d" not in kinds
    else:
        assert "BatchNorm2d" in kinds


def test_drop_path_reaches_the_model():
    model = build_model(_recipe(model__drop_path_rate=0.1), 10)
    assert any(type(m).__name__ == "DropPath" for m in model.modules())


def test_unknown_model_and_missing_init_file():
    with pytest.raises(RecipeError, match="unknown timm model 'resnet9000'"):
        build_model(_recipe(model__name="resnet9000"), 10)
    with pytest.raises(DataError, match="does not exist"):
        build_model(_recipe(model__init="/nonexistent/weights.pth"), 10)


def test_init_from_a_local_checkpoint_keeps_the_backbone(tmp_path):
    source = build_model(_recipe(), 7)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = build_model(_recipe(model__init=str(path)), 10)
    assert torch.equal(model.conv1[0].weight if isinstance(model.conv1, nn.Sequential) else model.conv1.weight,
                       source.conv1[0].weight if isinstance(source.conv1, nn.Sequential) else source.conv1.weight)
    assert model.get_classifier().out_features == 10


def test_transforms_follow_the_recipe():
    recipe = _recipe(data__rand_augment="rand-m9-mstd0.5-inc1", data__crop_pct=0.875)
    train, evaluation = build_transforms(recipe)
    names = repr(train)
    assert "RandomResizedCrop" in names and "RandAugment" in names and "RandomHorizontalFlip" in names
    assert "CenterCrop" in repr(evaluation)


def test_digits_split_and_fraction_are_stratified_and_seeded():
    recipe = _recipe()
    train_tf, eval_tf = build_transforms(recipe)
    data = build_datasets(recipe.data, 0, train_tf, eval_tf)
    assert (len(data.train), len(data.val), data.num_classes) == (1437, 360, 10)
    image, label = data.train[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10
    half = build_datasets(_recipe(data__fraction=0.5).data, 0, train_tf, eval_tf)
    counts = torch.bincount(torch.tensor(half.train_targets), minlength=10)
    full = torch.bincount(torch.tensor(data.train_targets), minlength=10)
    assert torch.all((counts - full / 2).abs() <= 1)
    assert stratified_subset(data.train_targets, 0.1, 3) == stratified_subset(data.train_targets, 0.1, 3)
    assert stratified_subset(data.train_targets, 0.1, 3) != stratified_subset(data.train_targets, 0.1, 4)


def test_image_folder_checks(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_image_folder(tmp_path / "missing")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no val/"):
        check_image_folder(tmp_path)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        check_image_folder(tmp_path)
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        check_image_folder(tmp_path)


def test_randaugment_at_full_magnitude_runs():
    """Magnitude noise can reach 10, where timm's posterize keeps 0 bits (pillow 13 refuses that)."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    image = Image.new("RGB", (32, 32), (120, 30, 200))
    for name in ("PosterizeIncreasing", "Posterize", "SolarizeIncreasing", "SharpnessIncreasing"):
        assert AugmentOp(name, prob=1.0, magnitude=10)(image).size == (32, 32)
