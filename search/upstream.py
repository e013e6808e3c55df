"""Pretraining chained before a downstream sweep: the backbone of the embedded detection study.

A detection sweep that may start from ``model.init=pretrained`` on the embedded
``digits-det`` data, without a ``model.pretrained`` checkpoint, gets one from a
classification run of this project on digits with the detector's backbone and
norm. The run is kept under the storage root and reused by later sweeps.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from spaces import Recipe, Space, SweepError
from spaces.recipe import PRETRAINED

__all__ = ["UPSTREAM_RECIPE", "needs_upstream", "upstream_checkpoint"]

UPSTREAM_RECIPE = "digits-backbone"


def needs_upstream(space: Space, recipe: Recipe) -> bool:
    """Whether a sweep may load ``model.pretrained`` on digits-det and none is given."""
    inits = {recipe.model.init}
    if "model.init" in space.params:
        inits |= set(space.params["model.init"].edge_values())
    return recipe.task == "detection" and recipe.data.name == "digits-det" and PRETRAINED in inits and not recipe.model.pretrained


def upstream_checkpoint(recipe: Recipe, storage: str, tracking_uri: Optional[str], address: Optional[str], out=None) -> str:
    """Train (or reuse) the digits classifier of ``recipe``'s backbone; return its checkpoint directory."""
    from search.monitor import read_state
    from search.results import best_checkpoint
    from search.sweep import SPEC_FILE, SweepSpec, plan_sweep, run_sweep

    out = out or sys.stdout
    norm = "gn" if recipe.model.norm == "gn" else "bn"
    name = f"upstream-digits-{recipe.model.backbone}-{norm}"
    sweep_dir = os.path.join(os.path.abspath(os.path.expanduser(storage)), name)
    state = read_state(sweep_dir) or {}
    if state.get("finished") and state.get("best"):
        path = best_checkpoint(sweep_dir)
        print(f"pretrained backbone: {path} (upstream run {name}, val/top1={state['best']['value']:.4f})", file=out)
        return path
    resume = os.path.isfile(os.path.join(sweep_dir, SPEC_FILE))
    print(f"pretrained backbone: {'resuming' if resume else 'training'} upstream run {name} ({UPSTREAM_RECIPE}: {recipe.model.backbone}, {norm})", file=out)
    overrides: dict[str, Any] = {"model.name": recipe.model.backbone, "model.norm": norm}
    spec = SweepSpec(
        space=Space(name=name, recipe=UPSTREAM_RECIPE, params={}), name=name, overrides=overrides, trials=1,
        searcher=None, scheduler="fifo", storage=storage, tracking_uri=tracking_uri, address=address,
    )
    if resume:
        from search.sweep import load_sweep_spec

        spec = load_sweep_spec(sweep_dir, tracking_uri)
    state = run_sweep(plan_sweep(spec, resume=resume), out=out, resume=resume)
    if state.get("interrupted"):
        raise KeyboardInterrupt
    if not state.get("best"):
        raise SweepError(f"the upstream run {name} produced no result; see {sweep_dir}")
    return best_checkpoint(sweep_dir)

