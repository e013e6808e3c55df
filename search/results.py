"""Finding a sweep and reading its state: ``status`` and ``best``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from spaces import SweepError

from search.monitor import count_states, read_state
from search.sweep import SPEC_FILE

__all__ = ["find_sweep", "sweep_status", "sweep_best", "trial_checkpoint", "best_checkpoint"]


def find_sweep(name_or_path: str, storage: str = "runs") -> str:
    """A sweep directory, by path or by name under the storage root."""
    candidates = [Path(name_or_path), Path(storage).expanduser() / name_or_path]
    for candidate in candidates:
        if (candidate / SPEC_FILE).is_file():
            return str(candidate.absolute())
    for candidate in candidates:
        if candidate.is_dir():
            raise SweepError(f"{str(candidate)!r} is not a sweep directory (it has no {SPEC_FILE})")
    raise SweepError(f"no sweep {name_or_path!r}: not a path, and not a name under storage {storage!r}")


def _state(sweep_dir: str) -> dict[str, Any]:
    state = read_state(sweep_dir)
    if state is None:
        raise SweepError(f"sweep {sweep_dir!r} has no recorded state yet (it has not started a trial)")
    return state


def sweep_status(sweep_dir: str) -> dict[str, Any]:
    """``{"name", "path", "num_samples", "trials": {state: n}, "best": {...} or null}``."""
    state = _state(sweep_dir)
    return {
        "name": state["name"],
        "path": sweep_dir,
        "num_samples": state["num_samples"],
        "trials": count_states(state),
        "best": state.get("best"),
    }


def sweep_best(sweep_dir: str) -> Optional[dict[str, Any]]:
    """``{"trial_id", "metric", "mode", "value", "mlflow_run_id", "recipe"}`` of the best trial, or None."""
    best = _state(sweep_dir).get("best")
    if best is None:
        return None
    keys = ("trial_id", "metric", "mode", "value", "mlflow_run_id", "recipe")
    info = {k: best.get(k) for k in keys}
    baseline = _state(sweep_dir).get("baseline")
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
        rows.append(
            {
                "trial_id": trial_id,
                "status": record["status"] + (" (stopped early)" if record.get("stopped_early") else ""),
                "epoch": f"{record.get('epoch') or 0}/{record.get('epochs') or '?'}",
                "unit": record.get("unit", "epoch"),
                metric: (record.get("metrics") or {}).get(metric),
                "error": record.get("error"),
            }
        )
    return rows



def trial_checkpoint(sweep_dir: str, trial_id: str) -> Optional[str]:
    """The newest checkpoint directory a trial left: in its Tune folder, or its Ray Train run's folder."""
    from trainables.checkpoints import CHECKPOINT_FILE

    root = Path(sweep_dir)
    found = [
        path
        for pattern in (f"*_{trial_id}_*/checkpoint_*", f"train/train-{trial_id}/checkpoint_*")
        for path in root.glob(pattern)
        if (path / CHECKPOINT_FILE).is_file()
    ]
    return str(max(found, key=lambda p: (p / CHECKPOINT_FILE).stat().st_mtime)) if found else None


def best_checkpoint(sweep_dir: str) -> str:
    """The checkpoint of a finished sweep's (or ``train`` run's) best trial, for a downstream ``model.init``."""
    best = _state(sweep_dir).get("best")
    if best is None:
        raise SweepError(f"sweep {sweep_dir!r} has no finished trial with a result: no checkpoint to start from")
    path = trial_checkpoint(sweep_dir, best["trial_id"])
    if path is None:
        raise SweepError(f"the best trial {best['trial_id']} of {sweep_dir!r} left no checkpoint")
    return path
