"""MLflow tracking from the driver: one parent run per sweep, one child run per trial.

A Tune callback, so a single process writes to the tracking store (no
``database is locked`` from many workers, no route from workers on other nodes
to the tracking server needed). The trial -> run map lives in the sweep
directory, so a resumed sweep keeps writing to the same runs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Optional

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.experiment import Trial

from spaces import Recipe, SweepError, flatten, recipe_to_yaml
from trainables.report import TrialReport

from search.layout import RUNS_FILE

__all__ = ["DEFAULT_TRACKING_URI", "resolve_tracking_uri", "check_tracking_uri", "MlflowTracking", "error_line"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_TRIAL = "recipe_search.trial_id"
TAG_SWEEP = "recipe_search.sweep"
TAG_RECIPE = "recipe_search.recipe"
_MLFLOW_BATCH = 200  # params per log_batch call (MLflow allows 100 params, 1000 metrics a batch)


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Make the relative default absolute: the driver may chdir, and the UI needs the same file.
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri


class MlflowTracking(Callback):
    """Logs a sweep to MLflow: experiment = sweep name, a parent run, nested trial runs.

    Args:
        tracking_uri: where runs go (see ``resolve_tracking_uri``).
        sweep_name: MLflow experiment name and ``recipe_search.sweep`` tag.
        sweep_dir: the sweep's directory; holds the trial -> run map.
        sweep_params: logged on the parent run (space, searcher, scheduler, budget).
        recipe_name: the base recipe, tagged ``recipe_search.recipe`` on each trial run.
        recipe_of: the resolved recipe of a trial's sampled config (the function the trials use).
        metric: the sweep's objective, for the parent run's best value.
        resumed: a resumed sweep: runs of trials the restored experiment does not know are deleted.
    """

    def __init__(
        self,
        tracking_uri: str,
        sweep_name: str,
        sweep_dir: str,
        sweep_params: dict[str, Any],
        recipe_name: str,
        recipe_of: Callable[[dict[str, Any]], Recipe],
        metric: str,
        resumed: bool = False,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.sweep_name = sweep_name
        self.sweep_dir = sweep_dir
        self.sweep_params = sweep_params
        self.recipe_name = recipe_name
        self.recipe_of = recipe_of
        self.resumed = resumed
        self.metric = metric
        self.client = MlflowClient(tracking_uri)
        self.parent_run_id: Optional[str] = None
        self.run_ids: dict[str, str] = {}
        self.last_steps: dict[str, int] = {}
        self.experiment_id: Optional[str] = None

    # -- run map ---------------------------------------------------------------
    @property
    def _runs_path(self) -> str:
        return os.path.join(self.sweep_dir, RUNS_FILE)

    def _save_map(self) -> None:
        os.makedirs(os.path.dirname(self._runs_path), exist_ok=True)
        tmp = self._runs_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {"experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id, "trials": self.run_ids, "last_steps": self.last_steps},
                f,
                indent=1,
            )
        os.replace(tmp, self._runs_path)

    def _load_map(self) -> None:
        if os.path.exists(self._runs_path):
            with open(self._runs_path) as f:
                saved = json.load(f)
            self.parent_run_id = saved.get("parent_run_id")
            self.run_ids = dict(saved.get("trials", {}))
            self.last_steps = dict(saved.get("last_steps", {}))

    # -- Tune callback hooks ---------------------------------------------------
    def setup(self, **info: Any) -> None:
        self._load_map()
        experiment = self.client.get_experiment_by_name(self.sweep_name)
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.sweep_name)
        if self.parent_run_id is None and self.resumed:
            # Killed before the map was first saved: the parent is the untagged-trial run of the sweep.
            for run in self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TAG_SWEEP}` = '{self.sweep_name}'"):
                if TAG_TRIAL not in run.data.tags:
                    self.parent_run_id = run.info.run_id
        if self.parent_run_id:
            self.client.update_run(self.parent_run_id, status="RUNNING")  # a resumed sweep reopens its parent
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=self.sweep_name, tags={TAG_SWEEP: self.sweep_name, TAG_RECIPE: self.recipe_name}
            )
            self.parent_run_id = run.info.run_id
            params = [Param(k, str(v)) for k, v in flatten(self.sweep_params).items()]
            for i in range(0, len(params), _MLFLOW_BATCH // 2):
                self.client.log_batch(self.parent_run_id, params=params[i : i + _MLFLOW_BATCH // 2])
        self._save_map()

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if not self.resumed:
            return
        # The map is checked against the runs' tags: a driver killed between creating a run
        # and saving the map leaves a run the map does not name, and a trial started after
        # Tune's last experiment save is asked for anew on resume, leaving an orphan run.
        self.resumed = False
        known = {t.trial_id for t in trials}
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_SWEEP}` = '{self.sweep_name}'", max_results=50_000
        )
        for run in runs:
            trial_id = run.data.tags.get(TAG_TRIAL)
            if trial_id is None:
                continue  # the parent
            if trial_id not in known or self.run_ids.setdefault(trial_id, run.info.run_id) != run.info.run_id:
                self.client.delete_run(run.info.run_id)
        for trial_id in [t for t in self.run_ids if t not in known]:
            self.run_ids.pop(trial_id)
            self.last_steps.pop(trial_id, None)
        self._save_map()

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if trial.trial_id in self.run_ids:
            self.client.update_run(self.run_ids[trial.trial_id], status="RUNNING")
            return
        recipe = self.recipe_of(trial.config)
        run = self.client.create_run(
            self.experiment_id,
            run_name=str(trial),
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                TAG_TRIAL: trial.trial_id,
                TAG_SWEEP: self.sweep_name,
                TAG_RECIPE: self.recipe_name,
            },
        )
        run_id = run.info.run_id
        self.run_ids[trial.trial_id] = run_id
        self._save_map()
        params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flatten(recipe.model_dump(mode="json")).items()]
        for i in range(0, len(params), _MLFLOW_BATCH // 2):
            self.client.log_batch(run_id, params=params[i : i + _MLFLOW_BATCH // 2])
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "recipe.yaml")
            with open(path, "w") as f:
                f.write(recipe_to_yaml(recipe))
            self.client.log_artifact(run_id, path)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        report = TrialReport.from_result(result)
        if run_id is None or report is None or report.progress is None:
            return
        step = report.progress.done  # the epoch, or the iteration (detection, step schedules)
        if step > self.last_steps.get(trial.trial_id, 0):  # an epoch re-done after a restart is not logged twice
            now = int(time.time() * 1000)
            values = {**report.metrics, report.progress.unit.value: step}
            metrics = [Metric(k, v, now, step) for k, v in values.items() if math.isfinite(v)]
            self.client.log_batch(run_id, metrics=metrics)
            self.last_steps[trial.trial_id] = step
            self._save_map()

    def _finish(self, trial: Trial, status: str, error: Optional[str] = None) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        if error:
            self.client.set_tag(run_id, "recipe_search.error", error[:5000])
        self.client.set_terminated(run_id, status=status)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        report = TrialReport.from_result(trial.last_result)
        if report is not None and report.failed:
            self._finish(trial, "FAILED", error=report.error)
        else:
            self._finish(trial, "FINISHED" if report is not None and report.completed else "KILLED")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._finish(trial, "FAILED", error=error_line(trial))

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        if self.parent_run_id is None or any(t.status not in (Trial.TERMINATED, Trial.ERROR) for t in trials):
            return  # interrupted: close_interrupted marks the open runs
        self.client.set_terminated(self.parent_run_id, status="FINISHED")

    def log_best(self, value: float, recipe_path: str) -> None:
        """The sweep's best value and recipe, on the parent run."""
        self.client.log_metric(self.parent_run_id, f"best/{self.metric}", value)
        self.client.log_artifact(self.parent_run_id, recipe_path)

    def close_interrupted(self) -> None:
        """The driver was interrupted: the parent and every run still open are KILLED."""
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status="KILLED")
        for run_id in self.run_ids.values():
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status="KILLED")


def error_line(trial: Trial) -> str:
    """The last line worth showing of a failed trial's error."""
    text = ""
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        with open(path) as f:
            text = f.read()
    text = text or str(getattr(trial, "error_message", "") or "")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line
    return lines[-1] if lines else "unknown error"


def check_tracking_uri(uri: str) -> None:
    """Fail fast (seconds, not a hang) when the tracking store does not answer."""
    import urllib.error
    import urllib.request

    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise SweepError(f"MLflow tracking URI {uri!r} does not answer: {getattr(err, 'reason', err)}") from None
    elif uri.startswith("sqlite:///"):
        directory = os.path.dirname(uri[len("sqlite:///"):]) or "."
        if not os.access(directory, os.W_OK):
            raise SweepError(f"MLflow tracking URI {uri!r}: cannot write in {directory!r}")
