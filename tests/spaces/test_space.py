"""Search spaces load, validate against the recipe schema, and sample with conditions."""

from __future__ import annotations

import optuna
import pytest

from spaces import SpaceError, define_by_run, load_space, parse_space, space_names, resolve_recipe


@pytest.mark.parametrize("name", space_names())
def test_every_space_preset_loads_and_checks(name):
    space = load_space(name)
    space.check()
    assert space.params


def test_rsb_space_covers_the_paper_knobs():
    keys = set(load_space("rsb").params)
    assert {
        "optim.name", "optim.lr", "optim.momentum", "optim.weight_decay", "schedule.warmup_epochs",
        "reg.mixup_alpha", "reg.cutmix_alpha", "reg.label_smoothing", "data.rand_augment",
        "model.drop_path_rate", "reg.ema_decay", "loss.name",
    } <= keys
    assert "data.repeated_aug" not in keys  # its one-worker trials cannot repeat: timm refuses it there
    assert set(load_space("rsb").params["optim.name"].choices) == {"lamb", "adamw", "sgd"}


def _space(params, recipe="rsb-digits"):
    return parse_space({"name": "t", "recipe": recipe, "params": params}, "test")


@pytest.mark.parametrize(
    "params, message",
    [
        ({"optim.lr": {"loguniform": [0.1, 0.001]}}, "low < high"),
        ({"optim.lr": {"loguniform": [0.0, 0.1]}}, "low > 0"),
        ({"optim.lrr": {"uniform": [0.1, 0.2]}}, "unknown recipe key 'optim.lrr'"),
        ({"optim.lr": {"uniform": [0.1]}}, "[low, high]"),
        ({"optim.lr": {"choice": []}}, "at least one"),
        ({"optim.lr": {"normal": [0, 1]}}, "optim.lr"),
        ({"optim.momentum": {"uniform": [0.8, 0.9], "when": {"optim.nme": "sgd"}}}, "unknown recipe key 'optim.nme'"),
    ],
)
def test_bad_spaces_fail_naming_the_param(params, message):
    with pytest.raises(SpaceError) as err:
        _space(params)
    assert message in str(err.value)


def test_values_outside_the_recipe_schema_are_rejected_at_check():
    with pytest.raises(SpaceError, match="optim.name.*lamb2"):
        _space({"optim.name": {"choice": ["lamb", "lamb2"]}}).check()
    with pytest.raises(SpaceError, match="data.fraction"):
        _space({"data.fraction": {"uniform": [0.5, 2.0]}}).check()


def test_unknown_and_malformed_space_files(tmp_path):
    with pytest.raises(SpaceError, match="unknown space 'nope'; available: bit, det, rethinking, rsb"):
        load_space("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(str(bad))


def test_conditions_and_formats_in_define_by_run():
    space = _space(
        {
            "optim.name": {"choice": ["sgd", "adamw"]},
            "optim.momentum": {"uniform": [0.8, 0.99], "when": {"optim.name": "sgd"}},
            "data.rand_augment": {"int": [1, 9], "format": "rand-m{}-mstd0.5-inc1"},
        }
    )
    sample = define_by_run(space, space.base_recipe())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        rendered = sample(trial)
        assert ("optim.momentum" in trial.params) == (trial.params["optim.name"] == "sgd")
        assert rendered["data.rand_augment"] == f"rand-m{trial.params['data.rand_augment']}-mstd0.5-inc1"
        config = {**trial.params, **rendered}
        resolve_recipe(space.recipe, config)  # every sample is a valid recipe
        seen.add(trial.params["optim.name"])
        study.tell(trial, 0.5)
    assert seen == {"sgd", "adamw"}


def test_define_by_run_pickles():
    import pickle

    space = load_space("rsb")
    fn = pickle.loads(pickle.dumps(define_by_run(space, space.base_recipe())))
    trial = optuna.create_study().ask()
    fn(trial)
    assert "optim.lr" in trial.params


def test_relative_params_and_start_points():
    from spaces.recipe import flatten

    space = parse_space(
        {"name": "rel", "recipe": "rsb-digits", "start": True,
         "params": {"optim.lr": {"loguniform": [0.5, 2.0], "relative": True}, "optim.name": {"choice": ["lamb", "sgd"]}}},
        "test",
    )
    recipe = space.check()
    base = flatten(recipe.model_dump())
    assert space.start_point(base) == {"optim.lr": 1, "optim.name": "lamb"}

    class Trial:  # what Optuna's trial answers for the start point
        def suggest_float(self, key, low, high, log=False):
            return 1.0

        def suggest_categorical(self, key, choices):
            return choices[0]

    assert define_by_run(space, base)(Trial()) == {"optim.lr": base["optim.lr"]}  # rendered: absolute LR
    off = parse_space({"name": "off", "recipe": "rsb-digits", "start": True, "params": {"optim.name": {"choice": ["adamw", "sgd"]}}}, "test")
    with pytest.raises(SpaceError, match="outside the param's range"):
        off.check()
    with pytest.raises(SpaceError, match="must be a number"):
        parse_space({"name": "x", "recipe": "rsb-digits", "params": {"data.rand_augment": {"choice": [1.0], "relative": True}}}, "test").check()


BOMB = """name: bomb
recipe: rsb-digits
params:
  optim.lr:
""" + "".join(
    f"    - &{chr(97 + i)} [{', '.join([f'*{chr(96 + i)}' if i else '0'] * 9)}]\n" for i in range(9)
)  # 9 levels of 9 aliases: 9^9 (387 million) leaves in a file of under 1 KB


def test_an_alias_bomb_or_a_huge_space_is_refused_in_one_short_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert bomb.stat().st_size < 1000
    with pytest.raises(SpaceError) as err:
        load_space(str(bomb)).check()
    assert "must be a mapping such as {uniform: [0, 1]}, but got [[0, 0, 0, 0, 0, 0, ...]" in str(err.value)
    assert len(str(err.value)) < 500

    many = tmp_path / "many.yaml"
    many.write_text("name: many\nrecipe: rsb-digits\nparams:\n  optim.lr: {choice: [" + ", ".join(["0.001"] * 1001) + "]}\n")
    with pytest.raises(SpaceError, match="choice takes at most 1000 values .*, but got 1001"):
        load_space(str(many))
    with pytest.raises(SpaceError, match="choice takes at most 1000 values .*, but got 1001"):
        parse_space({"name": "s", "recipe": "rsb-digits", "params": {"optim.lr": {"kind": "choice", "choices": [0.1] * 1001}}}, "test")
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: huge\n# " + "x" * 1_000_001 + "\n")
    with pytest.raises(SpaceError, match=r"huge.yaml' is over 1 MB; a space is a small YAML file"):
        load_space(str(huge))
    # Read up to the cap, not by the size a file claims: a pipe (or /dev/zero) claims none.
    with pytest.raises(SpaceError, match=r"'/dev/zero' is over 1 MB"):
        load_space("/dev/zero")


def test_a_bomb_in_a_set_value_is_one_short_line():
    from spaces import RecipeError
    from spaces.recipe import parse_overrides

    levels = [f"&{chr(97 + i)} [{','.join([f'*{chr(96 + i)}' if i else '0'] * 9)}]" for i in range(9)]
    pair = f"data.scale=[{', '.join(levels)}]"  # 9^9 leaves in about 300 characters
    with pytest.raises(RecipeError) as err:
        resolve_recipe("rsb-digits", parse_overrides([pair]))
    assert str(err.value).startswith("invalid recipe: data.scale") and len(str(err.value)) < 500
