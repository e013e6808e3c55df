"""BiT transfer in the training loop: step schedules, class splits and shots, initialization from a run, zero head."""

from __future__ import annotations

import pytest
import torch

from spaces import DataError, resolve_recipe
from trainables import LocalSession, train_classifier
from trainables.bit import is_gn_ws
from trainables.classification import build_model
from trainables.data import build_datasets, dataset_stats

STEPS = {"schedule.iterations": 10, "schedule.steps": [4, 8], "schedule.warmup_iters": 2, "schedule.eval_period": 4}


def _few_shot(**extra):
    return resolve_recipe("digits-smoke", {"data.classes": [5, 6, 7, 8, 9], "data.shots_per_class": 5, "optim.batch_size": 16, "data.fraction": 1.0, **STEPS, **extra})


def test_class_split_and_shots_give_exact_relabelled_sets():
    recipe = _few_shot()
    data = build_datasets(recipe.data, 0, None, None)
    assert data.num_classes == 5
    assert sorted(data.train_targets) == sorted([0, 1, 2, 3, 4] * 5)
    assert len(data.val) == 180 and set(data.val.targets) == {0, 1, 2, 3, 4}  # digits 5-9 of the val split
    assert dataset_stats(recipe.data, 0) == (25, 8)
    with pytest.raises(DataError, match="fewer than shots=200"):
        build_datasets(resolve_recipe("digits-smoke", {"data.classes": [1, 2], "data.shots_per_class": 200, "data.fraction": 1.0}).data, 0, None, None)
    with pytest.raises(DataError, match="names class 12"):
        build_datasets(resolve_recipe("digits-smoke", {"data.classes": [1, 12]}).data, 0, None, None)


def test_step_schedule_reports_every_eval_period_and_resumes_exactly():
    recipe = _few_shot()
    full = LocalSession(keep_checkpoints=True)
    train_classifier(recipe, full)
    assert [(r.progress.done, r.progress.total, r.progress.unit.value) for r in full.reports] == [(4, 10, "iteration"), (8, 10, "iteration"), (10, 10, "iteration")]
    lr = recipe.optim.lr
    assert [r.metrics["lr"] for r in full.reports] == pytest.approx([lr * 0.1, lr * 0.01, lr * 0.01])  # drops after 4 and 8 steps
    resumed = LocalSession(resume_from=full.checkpoints[1])
    train_classifier(recipe, resumed)
    assert [r.progress.done for r in resumed.reports] == [10]
    assert resumed.reports[0].metrics["val/top1"] == full.reports[-1].metrics["val/top1"]
    assert resumed.reports[0].metrics["train/loss"] == pytest.approx(full.reports[-1].metrics["train/loss"], rel=1e-6)


def test_multiplier_scales_a_classification_step_schedule_whole():
    from spaces.recipe import step_schedule

    assert step_schedule(resolve_recipe("bit-digits", {"schedule.multiplier": 2})) == (1000, [400, 600, 800], 200)


def test_init_from_a_run_checkpoint_keeps_the_body_and_zeroes_a_new_head(tmp_path):
    upstream = LocalSession(keep_checkpoints=True)
    train_classifier(resolve_recipe("digits-smoke", {"model.name": "resnetv2_bit_tiny", "schedule.epochs": 1, "data.classes": [0, 1, 2, 3, 4]}), upstream)
    checkpoint = upstream.checkpoints[-1]  # a run's checkpoint directory
    saved = torch.load(f"{checkpoint}/checkpoint.pt", weights_only=True)["model"]
    recipe = resolve_recipe("bit-digits", {"model.init": checkpoint})
    model = build_model(recipe, 5)
    assert is_gn_ws(model)
    assert torch.equal(model.stem.conv.weight, saved["stem.conv.weight"])
    assert torch.count_nonzero(model.head.fc.weight) == 0 and torch.count_nonzero(model.head.fc.bias) == 0
    logits = model.eval()(torch.rand(2, 3, 32, 32))
    assert torch.count_nonzero(logits) == 0  # BiT's zero head: every class starts equal
