"""What a trial's process uses, sampled once a period: CPU, memory, and the GPU's when there is one.

Reported as ``system/*`` metrics with the period's report, so they reach MLflow
from the driver like every other metric (the trial's host needs no route to it).
"""

from __future__ import annotations

import psutil
import torch

__all__ = ["SystemSampler"]

_MB = 2.0**20


class SystemSampler:
    """``system/cpu_percent`` (this process, since the last sample; 100 = one core), memory, GPU memory and use."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.utilization = device.type == "cuda"  # off after the first failure (no NVML, MIG slices, containers)
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # starts the first interval

    def sample(self) -> dict[str, float]:
        metrics = {
            "system/cpu_percent": self.process.cpu_percent(None),
            "system/memory_mb": self.process.memory_info().rss / _MB,
            "system/memory_percent": psutil.virtual_memory().percent,
        }
        if self.device.type == "cuda":
            metrics["system/gpu_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / _MB
            torch.cuda.reset_peak_memory_stats(self.device)
            if self.utilization:
                try:
                    metrics["system/gpu_utilization_percent"] = float(torch.cuda.utilization(self.device))
                except Exception:  # noqa: BLE001 - NVML raises its own errors; monitoring must never fail a trial
                    self.utilization = False
        return metrics
