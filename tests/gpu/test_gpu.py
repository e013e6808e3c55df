"""What only a GPU can show. Skipped on machines without CUDA; run them where one is.

    python -m pytest tests/gpu -q
"""

from __future__ import annotations

import pytest
import torch

from spaces import resolve_recipe
from trainables import LocalSession, train_classifier
from trainables.system import SystemSampler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
