"""Reading a sweep's state for people: ``status`` and ``best``."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from spaces import SweepError

from trainables.report import Progress

from search.confirm import confirmation_progress, confirmed_recipe, replicate_progress
from search.layout import SPEC_FILE, count_states, live_lease, read_confirmation, read_state

__all__ = ["phase", "sweep_status", "sweep_best", "trial_rows"]


def _state(sweep_dir: str) -> dict[str, Any]:
    state = read_state(sweep_dir)
    if state is None:
        raise SweepError(f"sweep {sweep_dir!r} has no recorded state yet (it has not started a trial)")
    return state


def phase(sweep_dir: str, state: dict[str, Any]) -> dict[str, Any]:
    """Where the sweep is: ``{"phase": "search" | "confirmation" | "study" | "done", ...}``: a confirmation
    or a study with runs done / total / failed and whether a driver runs it; done: whether confirmed."""
    study = replicate_progress(sweep_dir)  # a replicate plan in the sweep itself: a study of seeds
    if study is not None:
        return {"phase": "study", **study}
    if not state.get("finished"):
        return {"phase": "search"}
    confirmation = read_confirmation(sweep_dir)
    if confirmation is not None:
        return {"phase": "done", "confirmed": confirmation.get("winner") is not None, "confirmation": True}
    spec = _spec(sweep_dir)
    progress = confirmation_progress(sweep_dir)
    if progress is None and spec.get("confirm"):  # asked with --confirm, not started yet
        progress = {"done": 0, "failed": 0, "total": int(spec["confirm"]) * int(spec.get("confirm_seeds", 3))}
    if progress is not None:
        return {"phase": "confirmation", **progress, "driver": live_lease(sweep_dir) is not None}
    return {"phase": "done", "confirmed": False, "confirmable": spec.get("searcher") not in (None, "grid")}


def _spec(sweep_dir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(sweep_dir, SPEC_FILE)) as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def sweep_status(sweep_dir: str) -> dict[str, Any]:
    """``{"name", "path", "num_samples", "trials": {state: n}, "best": {...} or null, "phase": {...}}``."""
    state = _state(sweep_dir)
    return {
        "name": state["name"],
        "path": sweep_dir,
        "num_samples": state["num_samples"],
        "trials": count_states(state),
        "best": state.get("best"),
        "phase": phase(sweep_dir, state),
    }


def sweep_best(sweep_dir: str, follow_confirmation: bool = True) -> Optional[dict[str, Any]]:
    """``{"trial_id", "metric", "mode", "value", "mlflow_run_id", "recipe"}`` of the best trial, or None.

    After a confirmation over seeds, the confirmed winner (the best mean over fresh seeds), with
    ``"confirmed": {"seeds", "mean", "std", "ci95", "runs", ...}``; ``value`` stays its search run's.
    """
    state = _state(sweep_dir)
    best = state.get("best")
    if best is None:
        return None
    keys = ("trial_id", "metric", "mode", "value", "mlflow_run_id", "recipe")
    info = {k: best.get(k) for k in keys}
    winner = confirmed_recipe(sweep_dir) if follow_confirmation else None
    if winner is not None:
        info.update(trial_id=winner["trial_id"], value=winner["search_value"], mlflow_run_id=winner["mlflow_run_id"], recipe=winner["recipe"])
        info["confirmed"] = winner["confirmed"]
        best = {**best, "value": winner["search_value"]}
    baseline = state.get("baseline")
    if baseline and baseline.get("value") is not None:
        # A space with start: true; the gain is signed so that positive means better.
        sign = 1 if best.get("mode", "max") == "max" else -1
        info["baseline"] = baseline
        info["gain"] = sign * (best["value"] - baseline["value"])
    return info


def trial_rows(sweep_dir: str) -> list[dict[str, Any]]:
    """One row per recorded trial, for the human-readable status table."""
    state = _state(sweep_dir)
    metric = state["metric"]
    rows = []
    for trial_id, record in state["trials"].items():
        known = Progress.of_record(record)
        progress = known.as_dict() if known else {}
        rows.append(
            {
                "trial_id": trial_id,
                "status": record["status"] + (" (stopped early)" if record.get("stopped_early") else ""),
                "progress": f"{progress.get('unit', '')} {progress.get('done', 0)}/{progress.get('total', '?')}".strip(),
                "value": (record.get("metrics") or {}).get(metric),
                "error": record.get("error"),
            }
        )
    return rows
