"""BiT transfer end to end: upstream run on digits 0-4, a HyperRule-centred search on few shots of 5-9."""

from __future__ import annotations

import io
import json
import os

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from search.cli import app
from search.plan import SweepSpec, plan_sweep
from search.results import sweep_best
from search.sweep import run_sweep
from spaces import Space

# Seconds instead of the HyperRule's 500 steps: --set keys win over the rule's.
SHORT = {"schedule.iterations": 6, "schedule.steps": [3, 5], "schedule.warmup_iters": 1, "schedule.eval_period": 3}


@pytest.mark.slow
def test_transfer_sweep_starts_from_the_hyperrule_and_reports_the_gain(ray_session, workdir):
    storage = str(workdir / "runs")
    upstream = SweepSpec(
        space=Space(name="train-bit-upstream-digits", recipe="bit-upstream-digits", params={}), name="upstream",
        overrides={"schedule.epochs": 1, "schedule.warmup_epochs": 0, "data.fraction": 0.3}, trials=1, searcher=None, scheduler="fifo", storage=storage,
    )
    run_sweep(plan_sweep(upstream), out=io.StringIO())

    spec = SweepSpec(
        space="bit", name="bit-e2e", overrides={"model.init": "run:upstream", "data.shots_per_class": 2, **SHORT},
        trials=3, searcher="tpe", scheduler="fifo", storage=storage, seed=0,
    )
    plan = plan_sweep(spec)
    checkpoint = plan.overrides["model.init"]
    assert checkpoint.startswith(os.path.join(storage, "upstream")) and os.path.isfile(os.path.join(checkpoint, "checkpoint.pt"))
    assert plan.recipe.optim.lr == pytest.approx(0.003 * 16 / 512)  # the HyperRule's LR at batch 16
    out = io.StringIO()
    state = run_sweep(plan, out=out)
    first = next(iter(state["trials"]))
    assert state["baseline"]["trial_id"] == first  # the HyperRule is the first trial
    assert "(base recipe)" in out.getvalue()
    info = sweep_best(plan.sweep_dir)
    assert info["gain"] == pytest.approx(info["value"] - state["baseline"]["value"]) and info["gain"] >= 0

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("bit-e2e").experiment_id])
    children = {r.data.tags["recipe_search.trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(children) == 3
    assert {r.data.params["model.init"] for r in children.values()} == {checkpoint}
    assert float(children[first].data.params["optim.lr"]) == pytest.approx(0.003 * 16 / 512)
    assert children[first].data.params["data.shots_per_class"] == "2" and children[first].data.params["data.classes"] == "[5, 6, 7, 8, 9]"

    shown = CliRunner().invoke(app, ["best", "bit-e2e", "--storage", storage, "--json"])
    assert json.loads(shown.output)["baseline"]["trial_id"] == first


def test_hyperrule_is_derived_from_an_image_folder_at_launch(workdir):
    for split, count in (("train", 4), ("val", 2)):
        for label in ("a", "b", "c"):
            folder = workdir / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (200, 150), (i * 40, 10, 10)).save(folder / f"{i}.png")
    spec = SweepSpec(space="bit", recipe="bit-hyperrule", overrides={"data.name": str(workdir / "data"), "optim.batch_size": 8, "runtime.workers": 1, "runtime.cpus_per_worker": 1, "runtime.gpus_per_worker": 0}, storage=str(workdir / "runs"))
    recipe = plan_sweep(spec).recipe
    # 12 images of 200x150 (173 px): the 500-step schedule, 448 -> 384 crops, no mixup, LR 0.003 x 8 / 512.
    assert (recipe.schedule.iterations, recipe.schedule.steps, recipe.schedule.warmup_iters) == (500, [200, 300, 400], 100)
    assert (recipe.data.train_size, recipe.data.test_size, recipe.reg.mixup_alpha) == (384, 384, 0.0)
    assert recipe.optim.lr == pytest.approx(0.003 * 8 / 512)
    assert recipe.model.zero_head and recipe.model.name == "resnetv2_50x1_bit"
    fixed = plan_sweep(SweepSpec(space="bit", recipe="bit-hyperrule", overrides={**spec.overrides, "schedule.iterations": 1000}, storage=str(workdir / "runs"), name="other")).recipe
    assert fixed.schedule.iterations == 1000  # --set wins over the rule
