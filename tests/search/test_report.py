"""Pieces of a readable sweep: run names, the Pareto front of accuracy against cost, who may win."""

from __future__ import annotations

import io
from types import SimpleNamespace

from search.layout import read_state
from search.monitor import SweepMonitor
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


def test_a_trial_cut_by_the_scheduler_never_wins_even_with_the_higher_number(tmp_path):
    from spaces import resolve_recipe
    from trainables.report import TrialReport, Unit

    monitor = SweepMonitor(str(tmp_path), "s", 3, "val/top1", "max", lambda config: resolve_recipe("digits-smoke", config),
                           lambda trial_id: None, out=io.StringIO())
    monitor.setup()

    def trial(trial_id, lr, epoch, value):
        result = TrialReport.period({"val/top1": value}, epoch, 5, Unit.EPOCH).to_result()
        return SimpleNamespace(trial_id=trial_id, config={"optim.lr": lr}, last_result=result)

    cut, full, worse = trial("cut", 0.5, 2, 0.9), trial("full", 0.1, 5, 0.8), trial("worse", 0.2, 5, 0.7)
    for t in (cut, full, worse):
        monitor.on_trial_start(0, [cut, full, worse], t)
    monitor.on_trial_complete(0, [], cut)
    assert monitor.state["best"] is None  # no trial has run its whole schedule yet
    monitor.on_trial_complete(0, [], full)
    monitor.on_trial_complete(0, [], worse)
    monitor.on_experiment_end([])  # the state is written at most once a second as trials end, at once here
    state = read_state(str(tmp_path))
    assert state["trials"]["cut"]["stopped_early"] and state["best"]["trial_id"] == "full"
    assert state["best"]["value"] == 0.8 and state["best"]["recipe"]["optim"]["lr"] == 0.1
    lines = monitor.out.getvalue().splitlines()
    assert "stopped early at epoch 2/5: val/top1=0.9000" in lines[3] and "best so far" not in lines[3]
    assert lines[4].endswith("val/top1=0.8000 (best so far)")
