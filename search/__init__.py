"""How a sweep runs: Ray Tune assembly, the trial function, MLflow tracking, results and the CLI."""

from __future__ import annotations

from search.sweep import SweepPlan, SweepSpec, init_ray, plan_sweep, run_sweep

__all__ = ["SweepPlan", "SweepSpec", "init_ray", "plan_sweep", "run_sweep"]
