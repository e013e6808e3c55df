"""Pretraining chained before a downstream sweep: the backbone of the embedded detection study.

A detection sweep that may start from ``model.init=pretrained`` on the embedded
``digits-det`` data, without a ``model.pretrained`` checkpoint, gets one from a
classification run of this project on digits with the detector's backbone and
norm. The run is kept under the storage root and reused by later sweeps.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from spaces import Recipe, Space, SweepError
from spaces.recipe import norm_family

from search.layout import SPEC_FILE, best_checkpoint, pull_sweep, read_state
from search.plan import UPSTREAM_RECIPE, SweepPlan, SweepSpec, load_sweep_spec, needs_upstream, plan_sweep
from search.storage import Storage, display
from search.sweep import hold_lease, run_sweep

__all__ = ["run_with_upstream", "upstream_checkpoint"]


def run_with_upstream(plan: SweepPlan, out=None, resume: bool = False) -> dict[str, Any]:
    """``run_sweep``, after the upstream runs a detection plan on digits-det needs for its pretrained arm:
    one per backbone norm its trials can have, each trial loading its own norm's."""
    if needs_upstream(plan.space, plan.recipe):
        norms = {plan.recipe.model.norm}
        if "model.norm" in plan.space.params:
            norms |= set(plan.space.params["model.norm"].edge_values())
        checkpoints = {
            family: upstream_checkpoint(plan.recipe, family, plan.storage_root, plan.tracking_uri, plan.spec.address, out)
            for family in sorted({norm_family(n) for n in norms})
        }
        plan.overrides["model.pretrained"] = checkpoints if len(checkpoints) > 1 else next(iter(checkpoints.values()))
        plan.recipe.model.pretrained = checkpoints[norm_family(plan.recipe.model.norm)]
    return run_sweep(plan, out=out, resume=resume)


def upstream_checkpoint(recipe: Recipe, norm: str, storage: str, tracking_uri: Optional[str], address: Optional[str], out=None) -> str:
    """Train (or reuse) the digits classifier of ``recipe``'s backbone with ``norm`` (gn or bn); return its checkpoint directory."""
    out = out or sys.stdout
    name = f"upstream-digits-{recipe.model.backbone}-{norm}"
    store = Storage.open(storage)
    exists = store.is_file(name, SPEC_FILE)
    sweep_dir = pull_sweep(store, name, for_driver=True) if store.remote and exists else store.mirror(name) if store.remote else store.fs_path(name)
    state = read_state(sweep_dir) or {}
    if state.get("finished") and state.get("best"):
        path = best_checkpoint(sweep_dir)
        print(f"pretrained backbone: {display(path)} (upstream run {name}, val/top1={state['best']['value']:.4f})", file=out)
        return path
    resume = exists
    print(f"pretrained backbone: {'resuming' if resume else 'training'} upstream run {name} ({UPSTREAM_RECIPE}: {recipe.model.backbone}, {norm})", file=out)
    overrides: dict[str, Any] = {"model.name": recipe.model.backbone, "model.norm": norm}
    spec = SweepSpec(
        space=Space(name=name, recipe=UPSTREAM_RECIPE, params={}), name=name, overrides=overrides, trials=1,
        searcher=None, scheduler="fifo", storage=storage, tracking_uri=tracking_uri, address=address,
    )
    if resume:
        spec = load_sweep_spec(sweep_dir, tracking_uri)
    plan = plan_sweep(spec, resume=resume)
    with hold_lease(plan.sweep_dir, storage=plan.storage, name=plan.name):  # two downstream launches may want the same upstream run
        state = run_sweep(plan, out=out, resume=resume)
    if state.get("interrupted"):
        raise KeyboardInterrupt
    if not state.get("best"):
        raise SweepError(f"the upstream run {name} produced no result; see {sweep_dir}")
    return best_checkpoint(sweep_dir)

