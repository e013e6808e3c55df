"""Pieces of a readable sweep: run names, the Pareto front of accuracy against cost."""

from __future__ import annotations

from search.report import pareto_front
from search.tracking import run_name


def test_run_names_start_with_the_ordinal_and_show_short_searched_values():
    config = {"optim.name": "adamw", "optim.lr": 0.0067234, "optim.weight_decay": 4.1e-4, "reg.mixup_alpha": 0.25, "loss.name": "bce"}
    searched = ["optim.name", "optim.lr", "optim.weight_decay", "reg.mixup_alpha", "loss.name"]
    assert run_name(7, config, searched) == "t07 adamw lr=6.7e-3 wd=4.1e-4 mixup=0.25"
    assert run_name(12, {"optim.lr": 0.1}, ["optim.lr", "optim.momentum"]) == "t12 lr=0.1"
    assert run_name(3, {}, []) == "t03"


def test_pareto_front_keeps_the_points_nothing_cheaper_beats():
    points = [(10.0, 0.5), (20.0, 0.9), (15.0, 0.4), (30.0, 0.85), (25.0, 0.95)]
    assert pareto_front(points, "max") == [(10.0, 0.5), (20.0, 0.9), (25.0, 0.95)]
    losses = [(10.0, 2.0), (20.0, 1.0), (15.0, 2.5), (30.0, 0.5)]
    assert pareto_front(losses, "min") == [(10.0, 2.0), (20.0, 1.0), (30.0, 0.5)]
