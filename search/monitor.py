"""The sweep's own record and terminal view.

``SweepMonitor`` is a Tune callback on the driver. It keeps ``state.json`` in the
sweep directory (trial states, last metrics, the best trial with its resolved
recipe), which ``status`` and ``best`` read, also while the sweep runs; and it
prints one line per trial state change instead of Ray's wall of logs.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import sys
import time
from typing import Any, Callable, Optional, TextIO

from ray.tune import Callback
from ray.tune.experiment import Trial

from spaces import Recipe
from trainables.report import Progress, TrialReport, Unit

from search.layout import STATE_FILE, read_state, write_json
from search.tracking import error_line, trial_out_of_disk

__all__ = ["SweepMonitor", "better"]


def better(value: float, than: Optional[float], mode: str) -> bool:
    return than is None or (value > than if mode == "max" else value < than)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class SweepMonitor(Callback):
    """Records every trial in ``state.json`` and prints compact progress.

    Args:
        sweep_dir: where ``state.json`` goes.
        name, num_samples, metric, mode: the sweep's identity and objective.
        recipe_of: the resolved recipe of a trial's sampled config.
        run_id_of: the MLflow run id of a trial id (None when not tracked).
        out: where progress lines go (stdout by default).
        resumed: a resumed sweep: records of trials the restored experiment does not know are dropped.
        baseline_config: the sampled config of the base recipe (a space with ``start: true``); its
            trial is recorded as the sweep's baseline, which ``best`` compares the winner with.
    """

    def __init__(
        self,
        sweep_dir: str,
        name: str,
        num_samples: int,
        metric: str,
        mode: str,
        recipe_of: Callable[[dict[str, Any]], Recipe],
        run_id_of: Callable[[str], Optional[str]],
        out: Optional[TextIO] = None,
        resumed: bool = False,
        baseline_config: Optional[dict[str, Any]] = None,
        ranks: bool = True,
        describe: Optional[Callable[[dict[str, Any]], str]] = None,
    ) -> None:
        self.sweep_dir = sweep_dir
        self.ranks = ranks
        self.describe = describe
        self.baseline_config = baseline_config
        self.metric = metric
        self.mode = mode
        self.recipe_of = recipe_of
        self.resumed = resumed
        self.run_id_of = run_id_of
        self.out = out or sys.stdout
        self.started = time.time()
        self.dirty, self.saved_at = False, 0.0  # a result not yet in state.json; when it was last written
        previous = read_state(sweep_dir) or {}
        self.state: dict[str, Any] = {
            "name": name,
            "path": sweep_dir,
            "num_samples": num_samples,
            "metric": metric,
            "mode": mode,
            "finished": False,
            "trials": previous.get("trials", {}),
            "best": previous.get("best"),
            "baseline": previous.get("baseline"),
            # The base recipe as this sweep runs it (--set, data, HyperRule applied): what the winner is compared with.
            "base_recipe": previous.get("base_recipe") or recipe_of({}).model_dump(mode="json"),
        }

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; a terminal stream does not pickle
        # (the test runner's capture stream) and would be stale when the state is restored.
        state = dict(self.__dict__)
        state["out"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.out = self.out or sys.stdout

    def _print(self, text: str) -> None:
        elapsed = time.time() - self.started
        print(f"[{int(elapsed // 60):02d}:{int(elapsed % 60):02d}] {text}", file=self.out, flush=True)

    SAVE_EVERY_S = 1.0  # the state is saved at most this often as trials start, report and end

    def _save_soon(self) -> None:
        """``state.json`` at most once a second (it holds every trial: rewriting it per result, or per trial
        start and end, costs the driver O(trials) each); ``on_step_end`` writes what is left, and the
        experiment's end and an interrupt write it at once."""
        self.dirty = True
        self.on_step_end(0, [])

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self.dirty and time.monotonic() - self.saved_at >= self.SAVE_EVERY_S:
            self._save()

    def _save(self) -> None:
        self.dirty, self.saved_at = False, time.monotonic()
        write_json(os.path.join(self.sweep_dir, STATE_FILE), self.state)

    def _record(self, trial: Trial) -> dict[str, Any]:
        return self.state["trials"].setdefault(trial.trial_id, {"config": dict(trial.config), "status": "PENDING"})

    def _ordinal(self, trial: Trial) -> str:
        index = list(self.state["trials"]).index(trial.trial_id) + 1
        return f"{index}/{self.state['num_samples']}"

    def setup(self, **info: Any) -> None:
        self.started = time.time()
        self.state["driver"] = {"host": socket.gethostname(), "pid": os.getpid()}
        self._save()

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        for known in trials:  # records (and ordinals) in the order Tune created the trials, not the order they start
            if known.trial_id not in self.state["trials"]:
                self._record(known)
        record = self._record(trial)
        resumed = record["status"] != "PENDING"
        record["status"] = "RUNNING"
        self._save_soon()
        sampled = self.describe(trial.config) if self.describe else " ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
        self._print(f"trial {self._ordinal(trial)} {trial.trial_id} {'resumed' if resumed else 'started'}: {sampled or '(base recipe)'}")

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        report = TrialReport.from_result(result)
        if report is None or report.progress is None:
            return  # a failure: on_trial_complete records it
        record = self._record(trial)
        record["progress"] = report.progress.as_dict()
        record["metrics"] = report.metrics
        # Time spent training and evaluating, for the overhead benchmark (wall time minus this).
        record["train_s"] = record.get("train_s", 0.0) + report.metrics.get("epoch_s", report.metrics.get("period_s", 0.0))
        self._save_soon()

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        report = TrialReport.from_result(trial.last_result)
        if report is not None and report.failed:
            self._failed(trial, report.error)
            return
        record = self._record(trial)
        record["status"] = "TERMINATED"
        complete = report is not None and report.completed
        record["stopped_early"] = not complete
        value = report.metrics.get(self.metric) if report else None
        line = f"trial {self._ordinal(trial)} {trial.trial_id} "
        progress = report.progress if report and report.progress else Progress(0, 0, Unit.EPOCH)
        unit = progress.unit.value
        line += f"finished {progress.done} {unit}s" if complete else f"stopped early at {unit} {progress.done}/{progress.total}"
        is_baseline = self.baseline_config is not None and _same(trial.config, self.baseline_config) and not self.state.get("baseline")
        if is_baseline:
            self.state["baseline"] = {"trial_id": trial.trial_id, "value": value if isinstance(value, (int, float)) and math.isfinite(value) else None}
        if isinstance(value, (int, float)) and math.isfinite(value):
            line += f": {self.metric}={value:.4f}" + (" (base recipe)" if is_baseline else "")
            best = self.state["best"]
            # Only a trial that ran its whole schedule can win: a score at the scheduler's cut is
            # a short-budget number, not comparable with the delivered ones.
            if complete and better(value, best["value"] if best else None, self.mode):
                self._set_best(trial.trial_id, record, value)
                line += " (best so far)" if self.ranks else ""
        self._save_soon()
        self._print(line)

    def _set_best(self, trial_id: str, record: dict[str, Any], value: float) -> None:
        self.state["best"] = {
            "trial_id": trial_id,
            "metric": self.metric,
            "mode": self.mode,
            "value": value,
            "progress": record.get("progress"),
            "mlflow_run_id": self.run_id_of(trial_id),
            "recipe": self.recipe_of(record["config"]).model_dump(mode="json"),
        }

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if not self.resumed:
            return
        # Tune saves its experiment state every few seconds: a trial started after the last
        # save (then killed) is unknown to the restored experiment and is asked for anew.
        self._reconcile(trials)

    def _reconcile(self, trials: list[Trial]) -> None:
        """After a restore: records of trials Tune does not know go; trials Tune knows that the state does
        not (a damaged ``state.json`` set aside by resume) are recorded from Tune's own record of them."""
        self.resumed = False
        known = {t.trial_id for t in trials}
        for trial in trials:
            if trial.trial_id in self.state["trials"]:
                continue
            self._record(trial)
            if trial.status == Trial.TERMINATED:
                if trial.last_result:
                    self.on_trial_result(0, trials, trial, trial.last_result)
                self.on_trial_complete(0, trials, trial)
            elif trial.status == Trial.ERROR:
                self._failed(trial, error_line(trial))
        for trial_id in [t for t in self.state["trials"] if t not in known]:
            del self.state["trials"][trial_id]
        best = self.state["best"]
        if best and best["trial_id"] not in known:
            self.state["best"] = None
            for trial_id, record in self.state["trials"].items():
                value = (record.get("metrics") or {}).get(self.metric)
                if record["status"] == "TERMINATED" and not record.get("stopped_early") and isinstance(value, (int, float)) and math.isfinite(value):
                    if better(value, self.state["best"]["value"] if self.state["best"] else None, self.mode):
                        self._set_best(trial_id, record, value)
        self._save()

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        full = trial_out_of_disk(trial, self.sweep_dir)
        if full:
            # Not the recipe's fault, and every trial after it would fail the same way: the sweep stops as if
            # interrupted (the trial stays unfinished, to go on from its checkpoint once there is room).
            raise OSError(errno.ENOSPC, f"trial {trial.trial_id} ran out of disk: {full[:200]}")
        self._failed(trial, error_line(trial))

    def _failed(self, trial: Trial, error: str) -> None:
        record = self._record(trial)
        record["status"] = "ERROR"
        record["error"] = error
        self._save()
        self._print(f"trial {self._ordinal(trial)} {trial.trial_id} failed: {error}")

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        # Tune also ends the experiment when the driver is interrupted, and a Ctrl-C marks the trials it
        # stops TERMINATED without completing them: finished only if every trial completed or failed here.
        if self.resumed:  # restored with every trial done: no step ran
            self._reconcile(trials)
        records = self.state["trials"].values()
        done = [r for r in records if r["status"] in ("TERMINATED", "ERROR")]
        self.state["finished"] = len(done) == len(records) >= self.state["num_samples"]
        self.state["fit_s"] = self.state.get("fit_s", 0.0) + time.time() - self.started
        self._save()

    def mark_interrupted(self) -> None:
        for record in self.state["trials"].values():
            if record["status"] == "RUNNING":
                record["status"] = "PENDING"
        self._save()


def _same(config: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Whether a trial's sampled config is ``expected`` (floats compared to rounding)."""
    if set(config) != set(expected):
        return False
    for key, value in expected.items():
        got = config[key]
        if isinstance(value, float) or isinstance(got, float):
            if not isinstance(got, (int, float)) or not math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif got != value:
            return False
    return True
