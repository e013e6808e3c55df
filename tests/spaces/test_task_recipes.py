"""One recipe per task: each holds only its own keys, conditional keys only where they apply,
another task's key fails naming both tasks, and files of the one-schema version still load."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm.optim
import yaml

from spaces import (
    ClassificationRecipe,
    DetectionRecipe,
    RecipeError,
    SpaceError,
    flatten,
    parse_space,
    recipe_names,
    recipe_to_yaml,
    resolve_recipe,
    task_keys,
)
from spaces.recipe import check_applies

LEGACY = Path(__file__).parent / "legacy"  # recipes as the previous version wrote them: every task's keys
DETECTION_ONLY = task_keys("detection") - task_keys("classification")
CLASSIFICATION_ONLY = task_keys("classification") - task_keys("detection")


def _keys(recipe) -> set[str]:
    return set(flatten(recipe.model_dump(mode="json")))


def test_tasks_share_sections_and_keep_their_own_keys():
    assert {"optim.lr", "optim.batch_size", "runtime.workers", "model.norm", "model.init", "data.hflip"} <= task_keys("classification") & task_keys("detection")
    assert {"model.anchor_sizes", "model.roi_batch_size", "model.proposals", "data.max_size", "data.scale_jitter", "data.max_images"} <= DETECTION_ONLY
    assert {"data.rand_augment", "data.repeated_aug", "data.crop_pct", "data.shots_per_class", "model.zero_head", "reg.mixup_alpha", "loss.name", "schedule.hyperrule"} <= CLASSIFICATION_ONLY


@pytest.mark.parametrize("name", recipe_names())
def test_every_preset_holds_only_its_tasks_keys(name):
    recipe = resolve_recipe(name)
    other = DETECTION_ONLY if recipe.task == "classification" else CLASSIFICATION_ONLY
    assert not _keys(recipe) & other
    assert isinstance(recipe, ClassificationRecipe if recipe.task == "classification" else DetectionRecipe)


def test_classification_demo_recipe_shows_what_it_uses():
    keys = _keys(resolve_recipe("rsb-digits"))
    assert "optim.momentum" not in keys  # LAMB takes none (timm's registry says so)
    assert "loss.target_threshold" in keys  # BCE
    assert {"schedule.epochs", "schedule.warmup_epochs"} <= keys
    assert not {"schedule.iterations", "schedule.steps", "schedule.warmup_iters", "schedule.multiplier", "schedule.decay_rate"} & keys
    det = _keys(resolve_recipe("scratch-det-digits"))
    assert {"schedule.iterations", "schedule.steps", "optim.momentum", "model.anchor_sizes"} <= det
    assert not {"schedule.epochs", "schedule.name", "reg.mixup_alpha", "loss.name", "model.drop_path_rate"} & det


@pytest.mark.parametrize("name", ["sgd", "momentum", "lars", "lamb", "adamw", "lion", "rmsproptf"])
def test_momentum_is_in_the_recipe_exactly_when_timm_says_the_optimizer_takes_it(name):
    recipe = resolve_recipe("rsb-digits", {"optim.name": name})
    assert ("optim.momentum" in _keys(recipe)) == timm.optim.get_optimizer_info(name).has_momentum


def test_conditional_keys_follow_their_condition():
    ce = resolve_recipe("rsb-digits", {"loss.name": "ce"})
    assert "loss.target_threshold" not in _keys(ce)
    step = resolve_recipe("rsb-digits", {"schedule.name": "step", "schedule.decay_epochs": 5})
    assert step.schedule.decay_rate == 0.1 and step.schedule.decay_epochs == 5
    bit = resolve_recipe("bit-digits")
    assert bit.schedule.iterations == 500 and "schedule.epochs" not in _keys(bit) and "schedule.warmup_iters" in _keys(bit)


@pytest.mark.parametrize(
    "base, key, value, message",
    [
        ("rsb-digits", "model.anchor_sizes", [8, 16, 32, 64, 128], "model.anchor_sizes is a detection key; recipe rsb-digits is classification"),
        ("rsb-digits", "data.max_size", 64, "data.max_size is a detection key; recipe rsb-digits is classification"),
        ("scratch-det-digits", "reg.ema_decay", 0.99, "reg.ema_decay is a classification key; recipe scratch-det-digits is detection"),
        ("scratch-det-digits", "data.rand_augment", "rand-m9-mstd0.5", "data.rand_augment is a classification key; recipe scratch-det-digits is detection"),
    ],
)
def test_another_tasks_key_fails_naming_the_key_and_both_tasks(base, key, value, message):
    with pytest.raises(RecipeError) as err:
        resolve_recipe(base, {key: value})
    assert str(err.value) == message


def test_a_space_naming_another_tasks_key_fails():
    space = parse_space({"name": "s", "recipe": "rsb-digits", "params": {"model.proposals": {"int": [10, 100]}}}, "test")
    with pytest.raises(RecipeError, match="model.proposals is a detection key; recipe rsb-digits is classification"):
        space.check()


def test_a_param_that_does_not_apply_fails_unless_its_condition_is_searched():
    loose = parse_space({"name": "s", "recipe": "rsb-digits", "params": {"optim.momentum": {"uniform": [0.8, 0.99]}}}, "test")
    with pytest.raises(SpaceError, match=r"params.optim.momentum does not apply to recipe rsb-digits \(optim.name=lamb\)"):
        loose.check()
    conditioned = {"optim.name": {"choice": ["lamb", "sgd"]}, "optim.momentum": {"uniform": [0.8, 0.99], "when": {"optim.name": "sgd"}}}
    parse_space({"name": "s", "recipe": "rsb-digits", "params": conditioned}, "test").check()


# bit-digits has since taken BiT's own crop: an old file keeps the timm crop it names.
_CHANGED_SINCE = {"bit-digits": {"data.crop": "timm", "data.crop_pct": 1.0, "data.scale": [0.64, 1.0]}}


@pytest.mark.parametrize("name", ["rsb-digits", "scratch-det-digits", "bit-digits"])
def test_recipe_files_of_the_one_schema_version_still_load(name):
    old = yaml.safe_load((LEGACY / f"{name}.yaml").read_text())
    assert "model.anchor_sizes" in flatten(old) and "reg.mixup_alpha" in flatten(old)  # every task's keys
    assert resolve_recipe(str(LEGACY / f"{name}.yaml")) == resolve_recipe(name, _CHANGED_SINCE.get(name, {}))


def test_an_old_file_with_another_tasks_key_changed_fails_naming_it(tmp_path):
    old = yaml.safe_load((LEGACY / "rsb-digits.yaml").read_text())
    old["model"]["proposals"] = 300
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(RecipeError, match=f"model.proposals is a detection key; recipe {path} is classification"):
        resolve_recipe(str(path))


def test_a_dumped_recipe_reads_back_the_same(tmp_path):
    for name in ("rsb-digits", "scratch-det-digits", "bit-digits", "digits-backbone"):
        recipe = resolve_recipe(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(recipe_to_yaml(recipe))
        assert resolve_recipe(str(path)) == recipe


def test_timms_optimizer_registry_is_asked_once_per_version_then_read_without_importing_timm(tmp_path):
    import json
    import os
    import subprocess
    import sys

    code = "import sys; from spaces import resolve_recipe; r = resolve_recipe('rsb-digits', {'optim.name': 'sgd'}); print(r.optim.momentum, 'timm' in sys.modules)"
    env = {**os.environ, "RECIPE_SEARCH_CACHE": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert first == ["0.9", "True"] and second == ["0.9", "False"]
    (cached,) = tmp_path.glob("timm-*-optimizers.json")
    registry = json.loads(cached.read_text())
    assert set(registry) == set(timm.optim.list_optimizers())
    assert all(registry[name] == timm.optim.get_optimizer_info(name).has_momentum for name in registry)


def test_setting_an_applying_key_to_null_is_no_misuse():
    recipe = resolve_recipe("rsb-digits", {"loss.target_threshold": None})
    check_applies(recipe, ["loss.target_threshold"], "recipe rsb-digits")
    check_applies(resolve_recipe("bit-digits", {"schedule.steps": None}), ["schedule.steps"], "recipe bit-digits")
    choice = {"loss.target_threshold": {"choice": [None, 0.2]}}
    parse_space({"name": "s", "recipe": "rsb-digits", "params": choice}, "test").check()
    # A when: list is met by any of its values (sgd here), not only the first.
    when = {"optim.momentum": {"uniform": [0.8, 0.99], "when": {"optim.name": ["lamb", "sgd"]}}}
    parse_space({"name": "s", "recipe": "digits-smoke", "params": when}, "test").check()


def test_timm_optimizers_the_training_step_cannot_drive_are_refused():
    for name in ("fusedsgd", "bnbadamw", "adahessian"):
        with pytest.raises(RecipeError, match=f"unknown optimizer '{name}'"):
            resolve_recipe("rsb-digits", {"optim.name": name})


def test_a_partial_old_detection_file_keeps_its_old_defaults(tmp_path):
    path = tmp_path / "det.yaml"
    old = {"task": "detection", "model.backbone": "resnet18", "data.name": "digits-det", "schedule.iterations": 100, "schedule.eval_period": 50, "optim.name": "sgd"}
    path.write_text(yaml.safe_dump(old))
    recipe = resolve_recipe(str(path))  # the previous schema's defaults: BN, 224 px, 1333 max
    assert (recipe.model.norm, recipe.data.train_size, recipe.data.test_size, recipe.data.max_size) == ("bn", 224, 224, 1333)


def test_trial_records_written_before_the_typed_report_still_read():
    from trainables.report import Progress, Unit

    assert Progress.of_record({"epoch": 3, "epochs": 20, "unit": "epoch"}) == Progress(3, 20, Unit.EPOCH)
    assert Progress.of_record({"progress": {"done": 4, "total": 6, "unit": "iteration"}}) == Progress(4, 6, Unit.ITERATION)
    assert Progress.of_record({"status": "PENDING"}) is None


def test_ema_warmup_is_an_ema_key():
    from spaces import flatten

    plain = flatten(resolve_recipe("rsb-digits").model_dump())
    assert "reg.ema_warmup" not in plain  # no EMA: the key does not apply and leaves the dump
    ema = resolve_recipe("rsb-digits", {"reg.ema_decay": 0.99})
    assert ema.reg.ema_warmup is True  # timm's EMA warmup by default
    assert resolve_recipe("rsb-digits", {"reg.ema_decay": 0.99, "reg.ema_warmup": False}).reg.ema_warmup is False
    space = parse_space({"name": "s", "recipe": "rsb-digits", "params": {"reg.ema_warmup": {"choice": [True, False]}}}, "test")
    with pytest.raises(SpaceError, match=r"params.reg.ema_warmup does not apply to recipe rsb-digits \(reg.ema_decay=None\): it needs EMA"):
        space.check()
