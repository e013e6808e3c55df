"""Recipe presets reproduce the studies' tables; bad values fail naming key and value."""

from __future__ import annotations

import pytest
import yaml

from spaces import (
    RECIPE_PRESETS,
    RecipeError,
    flatten,
    known_keys,
    load_recipe_file,
    parse_overrides,
    recipe_names,
    recipe_to_yaml,
    resolve_recipe,
    unflatten,
)


@pytest.mark.parametrize("name", recipe_names())
def test_every_preset_resolves(name):
    recipe = resolve_recipe(name)
    assert recipe.task == ("detection" if "rcnn" in name or "-det-" in name else "classification")


# ResNet strikes back, Table 1 (reference/RECIPES.md).
RSB_TABLE = {
    "rsb-a1": dict(train=224, test=224, epochs=600, lr=5e-3, wd=0.01, smoothing=0.1, drop_path=0.05, repeats=3, ra="rand-m7-mstd0.5-inc1", mixup=0.2),
    "rsb-a2": dict(train=224, test=224, epochs=300, lr=5e-3, wd=0.02, smoothing=0.0, drop_path=0.05, repeats=3, ra="rand-m7-mstd0.5-inc1", mixup=0.1),
    "rsb-a3": dict(train=160, test=224, epochs=100, lr=8e-3, wd=0.02, smoothing=0.0, drop_path=0.0, repeats=0, ra="rand-m6-mstd0.5-inc1", mixup=0.1),
}


@pytest.mark.parametrize("name", sorted(RSB_TABLE))
def test_rsb_presets_match_table_1(name):
    row = RSB_TABLE[name]
    r = resolve_recipe(name)
    assert r.model.name == "resnet50"
    assert (r.data.train_size, r.data.test_size) == (row["train"], row["test"])
    assert r.schedule.epochs == row["epochs"]
    assert r.optim.batch_size == 2048
    assert r.optim.name == "lamb"
    assert r.optim.lr == pytest.approx(row["lr"])
    assert r.optim.weight_decay == pytest.approx(row["wd"])
    assert r.schedule.name == "cosine" and r.schedule.warmup_epochs == 5
    assert r.reg.label_smoothing == pytest.approx(row["smoothing"])
    assert r.model.drop_path_rate == pytest.approx(row["drop_path"])
    assert r.data.repeated_aug == row["repeats"]
    assert r.data.rand_augment == row["ra"]
    assert r.reg.mixup_alpha == pytest.approx(row["mixup"])
    assert r.reg.cutmix_alpha == 1.0
    assert r.optim.grad_clip is None and r.reg.ema_decay is None
    assert r.data.random_erasing == 0.0 and r.data.color_jitter is None
    assert r.data.crop_pct == 0.95 and r.data.interpolation == "bicubic" and r.data.hflip == 0.5
    assert r.loss.name == "bce" and r.loss.target_threshold == 0.2
    assert r.runtime.amp is True


def test_rsb_digits_is_a3_plus_overrides_with_linear_lr_scaling():
    base, overrides, _ = RECIPE_PRESETS["rsb-digits"]
    assert base == "rsb-a3"
    assert "optim.name" not in overrides and "reg.cutmix_alpha" not in overrides  # inherited, not copied
    a3, digits = resolve_recipe("rsb-a3"), resolve_recipe("rsb-digits")
    assert digits.optim.lr == pytest.approx(a3.optim.lr * digits.optim.batch_size / a3.optim.batch_size)
    assert digits.optim.name == a3.optim.name and digits.loss == a3.loss
    assert digits.data.name == "digits" and digits.data.train_size == 32
    assert digits.runtime.gpus_per_worker == 0


@pytest.mark.parametrize(
    "override, words",
    [
        ({"optim.lr": -0.1}, ["optim.lr", "-0.1"]),
        ({"optim.name": "lamb2"}, ["unknown optimizer 'lamb2'", "adamw", "lamb"]),
        ({"schedule.name": "cosinus"}, ["unknown schedule 'cosinus'", "cosine"]),
        ({"data.fraction": 0}, ["data.fraction", "0"]),
        ({"data.fraction": 1.5}, ["data.fraction", "1.5"]),
        ({"runtime.workers": 0}, ["runtime.workers", "0"]),
        ({"loss.name": "mse"}, ["loss.name", "mse"]),
        ({"data.rand_augment": "augmix"}, ["data.rand_augment", "augmix"]),
        ({"data.repeated_aug": 1}, ["data.repeated_aug", "1"]),
        ({"schedule.warmup_epochs": 30}, ["schedule.warmup_epochs", "30"]),
        ({"model.norm": "syncbn"}, ["syncbn", "GPU"]),
        ({"optim.lr": "fast"}, ["optim.lr", "fast"]),
    ],
)
def test_bad_values_name_key_and_value(override, words):
    with pytest.raises(RecipeError) as err:
        resolve_recipe("rsb-digits", override)
    for word in words:
        assert word in str(err.value)


def test_syncbn_is_accepted_with_several_gpu_workers():
    recipe = resolve_recipe("rsb-a1", {"model.norm": "syncbn"})
    assert recipe.runtime.workers == 4 and recipe.runtime.gpus_per_worker == 1


def test_overrides_parse_yaml_scalars_and_reject_unknown_keys():
    assert parse_overrides(["optim.lr=0.1", "reg.ema_decay=null", "data.scale=[0.2, 1.0]", "loss.name=ce"]) == {
        "optim.lr": 0.1,
        "reg.ema_decay": None,
        "data.scale": [0.2, 1.0],
        "loss.name": "ce",
    }
    with pytest.raises(RecipeError, match="unknown recipe key 'optim.lrr'.*optim.lr"):
        parse_overrides(["optim.lrr=1"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_overrides(["optim.lr"])


def test_yaml_round_trip(tmp_path):
    recipe = resolve_recipe("rsb-digits", {"optim.lr": 0.01})
    path = tmp_path / "r.yaml"
    path.write_text(recipe_to_yaml(recipe))
    assert resolve_recipe(str(path)) == recipe


def test_recipe_files_are_read_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("optim: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe_file(evil)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe_file(tmp_path / "missing.yaml")


def test_flatten_unflatten_cover_every_key():
    nested = unflatten({k: 1 for k in known_keys()})
    assert set(flatten(nested)) == set(known_keys())
    assert {"optim.lr", "reg.mixup_alpha", "runtime.gpus_per_worker", "data.fraction", "loss.target_threshold"} <= known_keys()
    assert yaml.safe_load(recipe_to_yaml(resolve_recipe("rsb-a1")))["optim"]["lr"] == 5e-3
