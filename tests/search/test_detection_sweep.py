"""Detection end to end: a sweep with early stopping and the scratch-vs-pretrained study, on digits-det."""

from __future__ import annotations

import io
import os

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import timm
import timm.layers

from search.cli import app
from search.plan import SweepSpec, needs_upstream, plan_sweep
from search.sweep import run_sweep
from spaces import load_space, parse_space, resolve_recipe



# Seconds per trial: 4-6 iterations at batch 2 on 8 training canvases, evaluated on digits-det's val set.
TINY = {
    "data.max_images": 8,
    "model.fpn_channels": 32,
    "model.roi_batch_size": 16,
    "model.proposals": 20,
    "optim.batch_size": 2,
    "schedule.warmup_iters": 1,
    "schedule.eval_period": 2,
}


def _children(experiment):
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    return client, parents[0], children


@pytest.mark.slow
def test_detection_sweep_reports_ap_per_eval_period_and_asha_stops_by_it(ray_session, workdir):
    space = parse_space(
        {"name": "lr", "recipe": "scratch-det-digits", "metric": "val/bbox_AP", "params": {"optim.lr": {"choice": [0.01, 1.0e-9]}}}, "test"
    )
    spec = SweepSpec(
        space=space, name="det-e2e", overrides={**TINY, "schedule.iterations": 6, "schedule.steps": [5]}, trials=3,
        searcher="random", scheduler="asha", grace_period=1, storage=str(workdir / "runs"), seed=1,
    )
    plan = plan_sweep(spec)
    assert plan.max_epochs == 3  # Tune iterations = 6 iterations / eval period 2
    out = io.StringIO()
    state = run_sweep(plan, out=out)
    records = state["trials"]
    assert [r["status"] for r in records.values()] == ["TERMINATED"] * 3
    assert {r["progress"]["unit"] for r in records.values()} == {"iteration"}
    assert "finished 6 iterations" in out.getvalue()
    client, parent, children = _children("det-e2e")
    assert len(children) == 3
    for run in children:
        assert run.data.params["task"] == "detection" and run.data.params["model.norm"] == "gn"
        history = client.get_metric_history(run.info.run_id, "val/bbox_AP")
        steps = [m.step for m in history]
        assert steps == sorted(steps) and set(steps) <= {2, 4, 6} and 2 in steps  # step = iteration
        assert "val/segm_AP" in run.data.metrics
    assert state["best"]["metric"] == "val/bbox_AP"


@pytest.mark.slow
def test_study_rethinking_pairs_scratch_and_pretrained_with_plot_and_table(ray_session, workdir):
    backbone = timm.create_model("resnet18", num_classes=10, norm_layer=timm.layers.GroupNorm)
    torch.save(backbone.state_dict(), workdir / "r18-gn.pt")
    sets = [f"--set={k}={v}" for k, v in {**TINY, "schedule.iterations": 4, "schedule.steps": "[3]"}.items()]
    result = CliRunner().invoke(
        app, ["study", "rethinking", "--name", "study-e2e", "--schedules", "1", "--pretrained", "r18-gn.pt", "--storage", "runs", *sets]
    )
    assert result.exit_code == 0, result.output
    assert "| 1 | 1x | 4 |" in result.output and "study.png" in result.output  # data, schedule, iterations; both APs
    sweep_dir = workdir / "runs" / "study-e2e"
    assert (sweep_dir / "study.png").stat().st_size > 10_000
    table = (sweep_dir / "study.md").read_text()
    assert "scratch val/bbox_AP" in table and "pretrained val/bbox_AP" in table and "TERMINATED" not in table
    client, parent, children = _children("study-e2e")
    assert sorted(r.data.params["model.init"] for r in children) == ["pretrained", "scratch"]
    assert {r.data.params["model.pretrained"] for r in children} == {os.path.abspath(workdir / "r18-gn.pt")}
    for run in children:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/bbox_AP")] == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert artifacts == {"study/study.png", "study/study.md"}
    assert any(k.startswith("study/pretrained_1x") for k in client.get_run(parent.info.run_id).data.metrics)


def test_pretraining_is_chained_only_where_it_is_needed():
    det, recipe = load_space("det"), resolve_recipe("scratch-det-digits")
    assert needs_upstream(det, recipe)  # the space samples init=pretrained on digits-det
    assert not needs_upstream(det, resolve_recipe("scratch-det-digits", {"model.pretrained": "/ckpt"}))
    assert not needs_upstream(load_space("rsb"), resolve_recipe("rsb-digits"))
    fixed = parse_space({"name": "x", "recipe": "scratch-det-digits", "params": {"optim.lr": {"choice": [0.01]}}}, "test")
    assert not needs_upstream(fixed, recipe)


def test_a_space_without_a_metric_optimizes_its_tasks_own(workdir):
    from spaces import Space

    detection = plan_sweep(SweepSpec(space=Space(name="train-det", recipe="scratch-det-digits"), searcher=None, trials=1, storage=str(workdir / "runs")))
    assert detection.space.metric == "val/bbox_AP"
    classification = plan_sweep(SweepSpec(space=Space(name="train-cls", recipe="digits-smoke"), searcher=None, trials=1, storage=str(workdir / "runs")))
    assert classification.space.metric == "val/top1"


def test_a_det_sweep_gets_an_upstream_backbone_per_norm_and_each_trial_loads_its_own(workdir, monkeypatch):
    """Space det samples model.norm in {gn, bn}: a BN trial loading the GN upstream got GN affine weights and
    default running statistics. Each backbone norm now has its upstream run (here stood in for: the runs
    themselves are the upstream sweep's, tested above), and each trial's recipe names its own."""
    from search import upstream

    trained = []
    monkeypatch.setattr(upstream, "upstream_checkpoint", lambda recipe, norm, *args: trained.append(norm) or f"/upstream-{norm}")
    monkeypatch.setattr(upstream, "run_sweep", lambda plan, out=None, resume=False: plan)
    plan = upstream.run_with_upstream(plan_sweep(SweepSpec(space=load_space("det"), trials=2, storage=str(workdir / "runs"))))
    assert trained == ["bn", "gn"]
    for norm, checkpoint in (("gn", "/upstream-gn"), ("bn", "/upstream-bn"), ("frozen_bn", "/upstream-bn")):
        recipe = resolve_recipe(plan.base, {"model.norm": norm, "model.init": "pretrained"}, plan.overrides)
        assert recipe.model.pretrained == checkpoint
    with pytest.raises(Exception, match="none for model.norm=bn"):
        resolve_recipe("scratch-det-digits", {"model.norm": "bn", "model.pretrained": {"gn": "/upstream-gn"}})
    # Planned again (resume, confirm: the map comes back from sweep.json), the map stays a map, each path checked.
    for norm in ("gn", "bn"):
        torch.save({"model": {}}, workdir / f"{norm}.pt")
    again = plan_sweep(SweepSpec(space=load_space("det"), trials=2, storage=str(workdir / "runs"),
                                 overrides={"model.pretrained": {"gn": "gn.pt", "bn": "bn.pt"}}))
    assert again.overrides["model.pretrained"] == {"gn": str(workdir / "gn.pt"), "bn": str(workdir / "bn.pt")}
    assert resolve_recipe(again.base, {"model.norm": "bn", "model.init": "pretrained"}, again.overrides).model.pretrained == str(workdir / "bn.pt")


@pytest.mark.slow
def test_an_error_on_one_ddp_worker_ends_the_trial_on_both_with_its_message(ray_session, workdir):
    """Two Ray Train workers; one training image cannot be decoded, and only one worker's shard holds it.
    That worker raised and the other waited in the gradient all-reduce (before: the failing worker reported
    and stopped, and ray.train.report is a barrier: both waited forever)."""
    from trainables.coco import coco_layout, write_digits_det

    root = write_digits_det(workdir / "coco", train_images=8, val_images=4)
    layout = coco_layout(root)
    broken = sorted(os.listdir(layout.train_images))[3]
    (layout.train_images / broken).write_bytes(b"not an image")
    space = parse_space({"name": "one", "recipe": "scratch-det-digits", "params": {"optim.lr": {"choice": [0.01]}}}, "test")
    overrides = {**TINY, "data.name": str(root), "data.max_images": None, "runtime.workers": 2, "schedule.iterations": 8, "schedule.steps": [6]}
    spec = SweepSpec(space=space, name="det-broken", overrides=overrides, trials=1, searcher="random", scheduler="fifo",
                     storage=str(workdir / "runs"), seed=0)
    state = run_sweep(plan_sweep(spec), out=io.StringIO())
    (trial,) = state["trials"].values()
    assert trial["status"] == "ERROR", trial
    assert f"cannot read image {str(layout.train_images / broken)!r}" in trial["error"] and "(worker " in trial["error"], trial["error"]
