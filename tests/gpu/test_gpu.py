"""What only a GPU can show. Skipped on machines without CUDA (the 2-GPU tests on fewer than 2 GPUs);
run them where GPUs are:

    make test-gpu        # python -m pytest -m gpu
"""

from __future__ import annotations

import pytest
import torch

import io

from search.plan import SweepSpec, plan_sweep
from search.sweep import run_sweep
from spaces import parse_space, resolve_recipe
from trainables import LocalSession, train_classifier, train_recipe
from trainables.system import SystemSampler

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def test_system_metrics_include_the_gpus_memory_and_use():
    device = torch.device("cuda", 0)
    sampler = SystemSampler(device)
    block = torch.ones(64, 2**20, device=device)  # 256 MB
    metrics = sampler.sample()
    assert metrics["system/gpu_memory_mb"] >= 256
    if "system/gpu_utilization_percent" in metrics:  # NVML may be missing (containers, MIG slices)
        assert 0.0 <= metrics["system/gpu_utilization_percent"] <= 100.0
    del block
    assert sampler.sample()["system/gpu_memory_mb"] < 256  # the peak is per period


def test_a_recipe_trains_on_the_gpu_under_bf16_autocast_and_reports_gpu_metrics():
    session = LocalSession()
    assert session.device.type == "cuda"
    train_classifier(resolve_recipe("digits-smoke", {"runtime.amp": True}), session)
    last = session.reports[-1].metrics
    assert last["val/top1"] > 0.5  # chance is 0.1
    assert last["system/gpu_memory_mb"] > 0


def test_channels_last_and_torch_compile_train_under_bf16():
    session = LocalSession()
    recipe = resolve_recipe("digits-smoke", {"runtime.amp": True, "runtime.channels_last": True, "runtime.compile": True, "schedule.epochs": 2})
    train_classifier(recipe, session)
    assert session.reports[-1].metrics["val/top1"] > 0.5


def test_a_detector_trains_on_the_gpu_under_bf16():
    session = LocalSession()
    recipe = resolve_recipe("scratch-det-digits", {"runtime.amp": True, "schedule.iterations": 40, "schedule.steps": [30], "schedule.eval_period": 40})
    train_recipe(recipe, session)
    assert session.reports[-1].metrics["val/bbox_AP"] >= 0.0 and session.reports[-1].metrics["system/gpu_memory_mb"] > 0


def _one_trial(workdir, name: str, recipe: str, overrides: dict) -> dict:
    space = parse_space({"name": name, "recipe": recipe, "params": {"optim.lr": {"choice": [0.02]}}}, "test")
    spec = SweepSpec(space=space, name=name, overrides=overrides, trials=1, searcher="random", scheduler="fifo",
                     storage=str(workdir / "runs"), seed=0)
    return run_sweep(plan_sweep(spec), out=io.StringIO())


@two_gpus
def test_a_two_gpu_ddp_classification_trial(ray_session, workdir):
    state = _one_trial(workdir, "gpu-ddp", "digits-smoke", {
        "runtime.workers": 2, "runtime.gpus_per_worker": 1, "runtime.amp": True, "runtime.channels_last": True, "schedule.epochs": 3})
    (trial,) = state["trials"].values()
    assert trial["status"] == "TERMINATED" and trial["metrics"]["val/top1"] > 0.5


@two_gpus
def test_a_two_gpu_syncbn_detection_trial(ray_session, workdir):
    state = _one_trial(workdir, "gpu-syncbn", "scratch-det-digits", {
        "model.norm": "syncbn", "runtime.workers": 2, "runtime.gpus_per_worker": 1, "runtime.amp": True,
        "schedule.iterations": 40, "schedule.steps": [30], "schedule.eval_period": 20})
    (trial,) = state["trials"].values()
    assert trial["status"] == "TERMINATED" and trial["progress"]["done"] == 40
