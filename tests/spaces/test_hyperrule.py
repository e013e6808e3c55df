"""The BiT-HyperRule gives the paper's numbers, switches at the right boundaries and rejects bad input."""

from __future__ import annotations

import pytest

from spaces import RecipeError
from spaces.hyperrule import HyperRule, hyperrule

# Worked out by hand from the rule (reference/RECIPES.md, bit_hyperrule.py), not from the code.
SMALL_DATA_SMALL_IMAGES = {  # 1k examples of 32x32: < 20k -> 500 steps, no MixUp; 32*32 < 96*96 -> 160/128
    "steps": 500,
    "warmup_steps": 100,
    "lr_drops": [200, 300, 400],
    "resize": 160,
    "crop": 128,
    "mixup_alpha": 0.0,
    "lr": 0.003,
    "batch_size": 512,
    "momentum": 0.9,
    "weight_decay": 0.0,
}
MEDIUM_DATA_LARGE_IMAGES = {  # 50k examples of 224x224: < 500k -> 10k steps, MixUp 0.1; >= 96*96 -> 448/384
    "steps": 10_000,
    "warmup_steps": 500,
    "lr_drops": [3_000, 6_000, 9_000],
    "resize": 448,
    "crop": 384,
    "mixup_alpha": 0.1,
    "lr": 0.003,
    "batch_size": 512,
    "momentum": 0.9,
    "weight_decay": 0.0,
}
LARGE_DATA_LARGE_IMAGES = {  # 1M examples of 384x384: >= 500k -> 20k steps
    "steps": 20_000,
    "warmup_steps": 500,
    "lr_drops": [6_000, 12_000, 18_000],
    "resize": 448,
    "crop": 384,
    "mixup_alpha": 0.1,
    "lr": 0.003,
    "batch_size": 512,
    "momentum": 0.9,
    "weight_decay": 0.0,
}


@pytest.mark.parametrize(
    "examples, image_size, expected",
    [
        (1_000, 32, SMALL_DATA_SMALL_IMAGES),
        (50_000, 224, MEDIUM_DATA_LARGE_IMAGES),
        (1_000_000, 384, LARGE_DATA_LARGE_IMAGES),
    ],
)
def test_paper_values(examples, image_size, expected):
    assert hyperrule(examples, image_size).as_dict() == expected


def test_as_dict_has_exactly_the_documented_keys():
    assert set(hyperrule(1_000, 32).as_dict()) == set(SMALL_DATA_SMALL_IMAGES)


def test_rule_is_frozen():
    rule = hyperrule(1_000, 32)
    assert isinstance(rule, HyperRule)
    with pytest.raises(AttributeError):
        rule.steps = 1  # type: ignore[misc]


def test_drops_of_medium_and_large_are_at_30_60_90_percent():
    for examples in (50_000, 1_000_000):
        rule = hyperrule(examples, 224)
        assert [drop / rule.steps for drop in rule.lr_drops] == [0.3, 0.6, 0.9]


@pytest.mark.parametrize(
    "examples, steps, warmup, mixup",
    [
        (19_999, 500, 100, 0.0),
        (20_000, 10_000, 500, 0.1),
        (499_999, 10_000, 500, 0.1),
        (500_000, 20_000, 500, 0.1),
    ],
)
def test_dataset_size_boundaries(examples, steps, warmup, mixup):
    rule = hyperrule(examples, 32)
    assert (rule.steps, rule.warmup_steps, rule.mixup_alpha) == (steps, warmup, mixup)


@pytest.mark.parametrize("image_size, resize, crop", [(95, 160, 128), (96, 448, 384)])
def test_image_area_boundary(image_size, resize, crop):
    rule = hyperrule(1_000, image_size)
    assert (rule.resize, rule.crop) == (resize, crop)


def test_lr_scales_linearly_with_batch():
    rule = hyperrule(1_000, 32, batch_size=128)
    assert rule.lr == pytest.approx(0.00075)
    assert rule.batch_size == 128
    assert hyperrule(1_000, 32, batch_size=1024).lr == pytest.approx(0.006)
    assert rule.steps == 500  # the schedule is counted in steps whatever the batch


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"examples": 0, "image_size": 32}, "examples"),
        ({"examples": 1_000, "image_size": 0}, "image_size"),
        ({"examples": 1_000, "image_size": 32, "batch_size": -1}, "batch_size"),
    ],
)
def test_bad_input_raises_one_line_recipe_error(kwargs, key):
    with pytest.raises(RecipeError) as info:
        hyperrule(**kwargs)
    message = str(info.value)
    assert key in message and "\n" not in message
    assert f"got {kwargs[key]}" in message


def test_hyperrule_as_recipe_keys():
    from spaces import resolve_recipe
    from spaces.hyperrule import hyperrule_keys

    keys = hyperrule_keys(hyperrule(50_000, 224, batch_size=128))
    assert keys["schedule.iterations"] == 10_000 and keys["schedule.steps"] == [3000, 6000, 9000]
    assert keys["schedule.warmup_iters"] == 500 and keys["schedule.eval_period"] == 2000
    assert keys["optim.lr"] == pytest.approx(0.00075) and keys["optim.weight_decay"] == 0.0 and keys["optim.momentum"] == 0.9
    assert keys["reg.mixup_alpha"] == 0.1
    assert (keys["data.crop"], keys["data.precrop"], keys["data.train_size"], keys["data.test_size"]) == ("bit", 1.1667, 384, 384)
    assert "data.train_size" not in hyperrule_keys(hyperrule(100, 8), resolution=False)
    resolve_recipe("bit-hyperrule", keys)  # a valid recipe


def test_space_bit_starts_at_the_hyperrule_and_searches_around_it():
    from spaces import load_space, resolve_recipe
    from spaces.recipe import flatten

    space = load_space("bit")
    assert space.start and space.recipe == "bit-digits"
    base = flatten(resolve_recipe("bit-digits").model_dump())
    assert space.start_point(base) == {"optim.lr": 1, "schedule.multiplier": 1.0, "reg.mixup_alpha": 0.0, "data.train_size": 1.0}
    lr = space.params["optim.lr"]
    assert lr.edge_values(base["optim.lr"]) == pytest.approx([base["optim.lr"] * 0.1, base["optim.lr"] * 10])
    assert space.params["data.train_size"].edge_values(32) == [24, 32, 40]
    space.check()
