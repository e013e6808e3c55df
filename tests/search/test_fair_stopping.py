"""Early stopping that is fair to every recipe the space can sample: no cut during warmup."""

from __future__ import annotations

import pytest

from search.plan import fair_grace
from spaces import load_space, parse_space, resolve_recipe


def _space(params, recipe="rsb-digits"):
    return parse_space({"name": "s", "recipe": recipe, "params": params}, "test")


def test_the_first_cut_waits_for_the_longest_warmup_the_space_samples():
    space = load_space("rsb")  # schedule.warmup_epochs: int [0, 3]
    recipe = resolve_recipe(space.recipe)
    grace, why = fair_grace(space, recipe, requested=3, max_t=20)
    assert grace == 4  # 3 warmup epochs, then one at full LR
    assert why == "raised from 3: the space samples warmups up to 3 epochs, and a trial is judged only after a report at full LR"
    assert fair_grace(space, recipe, requested=6, max_t=20) == (6, "")


def test_an_unsearched_warmup_counts_and_a_grace_past_the_schedule_means_no_cut():
    space = _space({"optim.lr": {"loguniform": [1e-3, 1e-1]}})
    recipe = resolve_recipe("rsb-digits", {"schedule.warmup_epochs": 4})
    assert fair_grace(space, recipe, requested=3, max_t=20)[0] == 5
    grace, why = fair_grace(space, recipe, requested=3, max_t=5)
    assert grace == 5 and why.endswith("no trial can be cut before its last report (5): no early stopping")


@pytest.mark.parametrize("warmup, expected", [(0, 1), (49, 1), (50, 2), (60, 2)])
def test_step_schedules_count_warmup_in_evaluation_periods(warmup, expected):
    space = _space({"optim.lr": {"loguniform": [1e-3, 1e-1]}}, recipe="scratch-det-digits")
    recipe = resolve_recipe("scratch-det-digits", {"schedule.warmup_iters": warmup})  # eval_period 50
    assert fair_grace(space, recipe, requested=1, max_t=4)[0] == expected


def test_a_hyperrule_multiplier_stretches_the_warmup_it_waits_for():
    space = load_space("bit")
    recipe = resolve_recipe(space.recipe)  # warmup 100 iterations, evaluations every 100
    assert space.params["schedule.multiplier"].high == 2.0
    assert fair_grace(space, recipe, requested=1, max_t=100)[0] == 3  # 200 iterations of warmup at x2, then one report


def test_a_null_choice_counts_as_the_base_value():
    space = _space({"schedule.warmup_epochs": {"choice": [None, 2]}})
    recipe = resolve_recipe("rsb-digits", {"schedule.warmup_epochs": 4})
    assert fair_grace(space, recipe, requested=1, max_t=20)[0] == 5
