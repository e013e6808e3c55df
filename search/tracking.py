"""MLflow tracking from the driver: one parent run per sweep, one child run per trial.

A Tune callback, so a single process writes to the tracking store (no
``database is locked`` from many workers, no route from workers on other nodes
to the tracking server needed). The trial -> run map lives in the sweep
directory, so a resumed sweep keeps writing to the same runs.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import json
import logging
import math
import os
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Optional

from mlflow.exceptions import MlflowException
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.result import TIME_TOTAL_S

from spaces import Recipe, SweepError, flatten, recipe_to_yaml
from spaces.errors import short
from trainables.report import TrialReport, Unit

from search.layout import DISK_FULL, RUNS_FILE, read_run_map, write_json

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TRACKING_URI",
    "OUTCOMES",
    "MlflowTracking",
    "check_tracking_uri",
    "error_line",
    "resolve_tracking_uri",
    "run_name",
]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
FLUSH_AT_END_S = 600.0  # how long the end of a sweep waits for MLflow writes a tracking-store outage held back
FLUSH_ON_STOP_S = 30.0  # the same when the driver was interrupted
TAG_TRIAL = "recipe_search.trial_id"
TAG_SWEEP = "recipe_search.sweep"
TAG_RECIPE = "recipe_search.recipe"
TAG_ORDINAL = "recipe_search.ordinal"
TAG_SEARCHED = "recipe_search.searched"  # the keys the space searches, comma-separated
TAG_OUTCOME = "recipe_search.outcome"
TAG_STOPPED_AT = "recipe_search.stopped_at"  # "epoch 3 of 20": where the scheduler cut the trial
TAG_ERROR = "recipe_search.error"
TAG_BEST_TRIAL = "recipe_search.best_trial"
TAG_BEST_RUN = "recipe_search.best_run_id"
TAG_PHASE = "recipe_search.phase"  # search; confirm: a run of a confirmation over seeds; study: a run of a study of seeds
TAG_CONFIRMS = "recipe_search.confirms"  # the search trial a confirmation run trains again
TAG_SEED = "recipe_search.seed"
# How a trial ended, as its run's outcome tag (MLflow's status says only FINISHED / FAILED / KILLED).
OUTCOMES = ("completed", "stopped_early", "failed", "interrupted")
_MLFLOW_BATCH = 200  # params per log_batch call (MLflow allows 100 params, 1000 metrics a batch)
_METRICS_BATCH = 1000
# Short names of searched keys in run names (t07 adamw lr=6.7e-3 wd=4.1e-4).
_SHORT = {
    "weight_decay": "wd", "momentum": "mom", "warmup_epochs": "warmup", "warmup_iters": "warmup", "mixup_alpha": "mixup",
    "cutmix_alpha": "cutmix", "label_smoothing": "smooth", "drop_path_rate": "droppath", "ema_decay": "ema",
    "rand_augment": "ra", "repeated_aug": "repeat", "multiplier": "x", "scale_jitter": "jitter", "train_size": "size",
}


def _short_number(value: float) -> str:
    """Two significant digits; an exponent for very small or large values (6.7e-3, not 0.0067)."""
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:.2g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def run_name(ordinal: int, config: dict[str, Any], searched: list[str], most: int = 4) -> str:
    """``t07 adamw lr=6.7e-3 wd=4.1e-4``: the trial's ordinal and its leading searched values."""
    parts = [f"t{ordinal:02d}"]
    for key in searched:
        if key not in config or len(parts) > most:
            continue
        value, leaf = config[key], key.split(".")[-1]
        if leaf == "name" and isinstance(value, str):
            parts.append(value)  # optim.name=adamw reads as adamw
        elif isinstance(value, float):
            parts.append(f"{_SHORT.get(leaf, leaf)}={_short_number(value)}")
        else:
            parts.append(f"{_SHORT.get(leaf, leaf)}={value}")
    return " ".join(parts)


def _git_commit(directory: Optional[str]) -> Optional[str]:
    """The commit checked out in ``directory`` when it is in a git work tree."""
    if directory is None:
        return None
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance_tags(directory: Optional[str]) -> dict[str, str]:
    """The user, and the git commit of ``directory`` when it is a git work tree (MLflow's own tag names)."""
    tags = {"mlflow.user": getpass.getuser(), "mlflow.source.name": "recipe-search", "mlflow.source.type": "LOCAL"}
    commit = _git_commit(directory)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _dataset_input(recipe: Recipe) -> Optional[DatasetInput]:
    """The training data of a recipe as an MLflow dataset input: name, source, digest, number of examples."""
    from trainables.tasks import summarize_data  # torch, pycocotools: only when a sweep logs its data

    try:
        summary = summarize_data(recipe)
    except Exception:  # noqa: BLE001 - the trial reports what is wrong with its data; tracking must not stop the sweep
        logger.warning("no dataset input for %s", recipe.data.name, exc_info=True)
        return None
    source_type = "local" if summary.source.startswith("/") else "code"
    dataset = Dataset(summary.name, summary.digest, source_type, summary.source, profile=json.dumps({"num_examples": summary.examples}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Make the relative default absolute: the driver may chdir, and the UI needs the same file.
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return database_url(uri)


def database_url(url: str) -> str:
    """A database URL as users write it, in the form SQLAlchemy loads with the drivers the install extras
    bring: ``postgres://`` is ``postgresql://`` (SQLAlchemy's default driver for it, psycopg 3, in
    ``recipe-search[postgres]``); ``mysql://`` is
    ``mysql+pymysql://`` (``recipe-search[mysql]``) unless mysqlclient's ``MySQLdb`` is installed."""
    import importlib.util

    if url.startswith("postgres://"):
        return "postgresql://" + url[len("postgres://"):]
    if url.startswith("mysql://") and importlib.util.find_spec("MySQLdb") is None and importlib.util.find_spec("pymysql") is not None:
        return "mysql+pymysql://" + url[len("mysql://"):]
    return url


# Errors with which an MLflow store refuses a write for what it is (not because it is unreachable).
_REFUSED = ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST", "INVALID_STATE")


class MlflowWriter:
    """MLflow writes off Tune's control loop: a thread that makes them in the order they were queued for
    each run, each run's metrics batched into few ``log_batch`` calls, and retries what fails (a tracking
    server down for a while) until it lands, so nothing queued is lost while the sweep goes on. ``written``
    is called in the thread after each batch that landed, with the ``(trial_id, step)`` of its metrics.

    A pass over the queue starts at most every ``PASS_S`` (sooner when someone waits in ``flush``): results
    pile up meanwhile, and a run's results of the whole pass go in one call. With 20 trials reporting side by
    side, a pass per result would make a ``log_batch`` call (a store transaction) per result."""

    RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)
    PASS_S = 2.0  # how late a result may reach MLflow; a resume re-logs from Tune's records what a killed driver had queued

    def __init__(self, client: MlflowClient, written: Callable[[list[tuple[str, int]]], None]) -> None:
        self.client = client
        self.written = written
        self.queue: list[tuple] = []
        self.busy = False
        self.waiting = 0  # callers in flush: the next pass starts now
        self.failing = 0  # consecutive failed attempts (0: the store answers)
        self.condition = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="recipe-search-mlflow", daemon=True)
        self.thread.start()

    def metrics(self, trial_id: str, run_id: str, step: int, metrics: list[Metric]) -> None:
        self._put(("metrics", run_id, trial_id, step, metrics))

    def call(self, function: Callable[..., Any], run_id: str, *args: Any, **kwargs: Any) -> None:
        """``function(run_id, *args, **kwargs)``, after what was queued before it for that run."""
        self._put(("call", run_id, function, (run_id, *args), kwargs))

    def _put(self, item: tuple) -> None:
        with self.condition:
            self.queue.append(item)
            if len(self.queue) == 1:  # the thread waits for a first item; later ones it takes at its next pass
                self.condition.notify_all()

    def flush(self, timeout: Optional[float] = None) -> int:
        """Wait until everything queued has landed (or ``timeout``); the number of writes still pending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.condition:
            self.waiting += 1
            self.condition.notify_all()
            try:
                while self.queue or self.busy:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self.condition.wait(left)
                return len(self.queue) + self.busy
            finally:
                self.waiting -= 1

    def _run(self) -> None:
        last = 0.0
        while True:
            with self.condition:
                while not self.queue:
                    self.condition.wait()
                while not self.waiting and (left := last + self.PASS_S - time.monotonic()) > 0:
                    self.condition.wait(left)
                items, self.queue, self.busy = self.queue, [], True
            last = time.monotonic()
            try:
                while items:
                    try:
                        written = self._write(items)
                        items = [item for i, item in enumerate(items) if i not in written]
                        self.failing = 0
                    except Exception as err:  # noqa: BLE001 - any store error: wait, then the same writes again
                        self.failing += 1
                        wait = self.RETRY_S[min(self.failing, len(self.RETRY_S)) - 1]
                        first = (str(err).splitlines() or [type(err).__name__])[0]  # TimeoutError() has no message
                        logger.warning("MLflow write failed (%s); retrying in %.0f s, %d writes kept", first[:200], wait, len(items))
                        time.sleep(wait)
            finally:
                with self.condition:
                    self.busy = False
                    self.condition.notify_all()

    def _write(self, items: list[tuple]) -> set[int]:
        """Make the first write of ``items``: a call, or the metrics of the first item's run from every item
        of that run queued before its next call (other runs' items are passed over: the order that matters is
        each run's own), up to MLflow's batch limit; the indices of the items it covered."""
        if items[0][0] == "call":
            _, _, function, args, kwargs = items[0]
            try:
                function(*args, **kwargs)
            except MlflowException as err:
                if err.error_code not in _REFUSED:
                    raise  # the store is down or busy: tried again
                # The store refused this write itself (a value too long, a key it already has): the same write would
                # be refused forever and hold back everything queued after it.
                logger.warning("MLflow refused a write, which is dropped: %s", str(err).splitlines()[0][:300])
            return {0}
        run_id, batch, steps, covered = items[0][1], [], [], set()
        for i, item in enumerate(items):
            if item[1] != run_id:
                continue
            if item[0] == "call" or (steps and len(batch) + len(item[4]) > _METRICS_BATCH):
                break  # a call (the run's end, its tags) keeps its place after the run's metrics queued before it
            batch.extend(item[4])
            steps.append((item[2], item[3]))
            covered.add(i)
        try:
            for start in range(0, len(batch), _METRICS_BATCH):
                self.client.log_batch(run_id, metrics=batch[start : start + _METRICS_BATCH])
        except MlflowException as err:
            if err.error_code not in _REFUSED:
                raise
            # e.g. the run was deleted in the UI: these results can never land, and must not hold back the others
            logger.warning("MLflow refused the results of run %s, which are dropped: %s", run_id, str(err).splitlines()[0][:300])
            return covered
        self.written(steps)
        return covered


class MlflowTracking(Callback):
    """Logs a sweep to MLflow: experiment = sweep name, a parent run, nested trial runs.

    The parent carries the sweep's settings, the user and git commit, the space and
    ``sweep.json``, and at the end the winner (tags, a link in its description, its
    recipe and checkpoint under ``best/``). Each trial run is named by its ordinal and
    searched values, tagged with what was searched and how it ended, holds the
    recipe's own keys as params, the training data as a dataset input, every
    metric per epoch (or iteration), ``best/<metric>`` and ``cost/device_s``.

    Args:
        tracking_uri: where runs go (see ``resolve_tracking_uri``).
        sweep_name: MLflow experiment name and ``recipe_search.sweep`` tag.
        sweep_dir: the sweep's directory; holds the trial -> run map.
        sweep_params: logged on the parent run (space, searcher, scheduler, budget).
        recipe_name: the base recipe, tagged ``recipe_search.recipe`` on each trial run.
        recipe_of: the resolved recipe of a trial's sampled config (the function the trials use).
        metric, mode: the sweep's objective.
        searched: the keys the space searches, in its order (run names and tags).
        parent_tags, parent_files: tags and ``{name: text}`` artifacts of a new parent run.
        resumed: a resumed sweep: runs of trials the restored experiment does not know are deleted.
        phase: ``search``, or ``confirm`` for the runs of a confirmation (nested under the search's
            parent, which ``parent_run_id`` names); a resume cleans up the runs of its own phase only.
        name_of: the run name of ``(ordinal, config)`` [default: ordinal and leading searched values].
        tags_of: extra tags of a trial's run, from its config.
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
        mode: str = "max",
        searched: Optional[list[str]] = None,
        parent_tags: Optional[dict[str, str]] = None,
        parent_files: Optional[dict[str, str]] = None,
        resumed: bool = False,
        phase: str = "search",
        parent_run_id: Optional[str] = None,
        name_of: Optional[Callable[[int, dict[str, Any]], str]] = None,
        tags_of: Optional[Callable[[dict[str, Any]], dict[str, str]]] = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.sweep_name = sweep_name
        self.sweep_dir = sweep_dir
        self.sweep_params = sweep_params
        self.recipe_name = recipe_name
        self.recipe_of = recipe_of
        self.metric, self.mode = metric, mode
        self.searched = list(searched or [])
        self.parent_tags = dict(parent_tags or {})
        self.parent_files = dict(parent_files or {})
        self.resumed = resumed
        self.phase = phase
        self.name_of = name_of
        self.tags_of = tags_of or (lambda config: {})
        self.client = MlflowClient(tracking_uri)
        self.parent_run_id: Optional[str] = parent_run_id
        self.run_ids: dict[str, str] = {}
        self.last_steps: dict[str, int] = {}
        self.best_values: dict[str, float] = {}
        self.experiment_id: Optional[str] = None
        self.datasets: dict[tuple, Optional[DatasetInput]] = {}  # one summary per distinct selection of samples
        self.devices: dict[str, float] = {}
        self.queued_steps: dict[str, int] = {}  # the last step of each trial handed to the writer
        self.lock = threading.Lock()  # the run map, written by Tune's loop and by the writer's thread
        self.map_saved_at = 0.0
        self._writer: Optional[MlflowWriter] = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the tuner: a thread and a lock do not pickle.
        state = dict(self.__dict__)
        state["_writer"], state["lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    @property
    def writer(self) -> MlflowWriter:
        if self._writer is None:
            self._writer = MlflowWriter(self.client, self._written)
        return self._writer

    SAVE_MAP_EVERY_S = 1.0

    def _written(self, steps: list[tuple[str, int]]) -> None:
        """In the writer's thread: metrics landed up to these steps. The map says so at most once a second (it
        names every trial: rewritten per batch it costs the driver O(trials) per result); a resume takes the
        steps that landed from the runs themselves, so a map a second behind logs no step twice."""
        with self.lock:
            for trial_id, step in steps:
                self.last_steps[trial_id] = max(step, self.last_steps.get(trial_id, 0))
        if time.monotonic() - self.map_saved_at >= self.SAVE_MAP_EVERY_S:
            try:
                self._save_map()
            except OSError as err:  # a full disk: the writes landed, and are not made again; the next save may work
                logger.warning("could not save the MLflow run map: %s", err)

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait for the queued MLflow writes; past ``timeout``, say how many could not be made."""
        if self._writer is None:
            return
        pending = self._writer.flush(timeout)
        self._save_map()
        if pending:
            logger.warning("%d MLflow writes could not be made in %.0f s (the tracking store does not answer)", pending, timeout or 0)

    # -- run map ---------------------------------------------------------------
    @property
    def _runs_path(self) -> str:
        return os.path.join(self.sweep_dir, RUNS_FILE)

    def _save_map(self) -> None:
        with self.lock:  # one writer of the file at a time, from a consistent copy
            self.map_saved_at = time.monotonic()
            write_json(self._runs_path, {
                "experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id, "trials": dict(self.run_ids),
                "last_steps": dict(self.last_steps), "best_values": dict(self.best_values),
            })

    def _load_map(self) -> None:
        saved = read_run_map(self.sweep_dir)  # checked: a damaged map is a one-line error
        self.parent_run_id = saved.get("parent_run_id") or self.parent_run_id
        self.run_ids = dict(saved["trials"])
        self.last_steps = dict(saved.get("last_steps", {}))
        self.best_values = dict(saved.get("best_values", {}))

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        entries = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
        for i in range(0, len(entries), _MLFLOW_BATCH // 2):
            self.client.log_batch(run_id, params=entries[i : i + _MLFLOW_BATCH // 2])

    def _log_text(self, run_id: str, name: str, text: str, artifact_path: Optional[str] = None) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, name)
            with open(path, "w") as f:
                f.write(text)
            self.client.log_artifact(run_id, path, artifact_path=artifact_path)

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
            self._create_parent()
        self._save_map()

    def _create_parent(self) -> None:
        tags = {TAG_SWEEP: self.sweep_name, TAG_RECIPE: self.recipe_name, TAG_SEARCHED: ",".join(self.searched), **self.parent_tags}
        run = self.client.create_run(self.experiment_id, run_name=self.sweep_name, tags=tags)
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, flatten(self.sweep_params))
        for name, text in self.parent_files.items():
            self._log_text(self.parent_run_id, name, text)

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
            if trial_id is None or run.data.tags.get(TAG_PHASE, "search") != self.phase:
                continue  # the parent, or a run of the other phase
            if trial_id not in known or self.run_ids.setdefault(trial_id, run.info.run_id) != run.info.run_id:
                self.client.delete_run(run.info.run_id)
                continue
            self._landed(trial_id, run.data.metrics)
        for trial_id in [t for t in self.run_ids if t not in known]:
            self.run_ids.pop(trial_id)
            self.last_steps.pop(trial_id, None)
            self.best_values.pop(trial_id, None)
        self._save_map()
        # Results Tune recorded (its result.json) that never reached MLflow: the driver was killed before its
        # writer landed them, and the trial goes on from a later checkpoint. Logged now, in order; and the end of
        # a trial that ended before the kill, which its run never got (still RUNNING).
        still_open = {run.info.run_id for run in runs if run.info.status == "RUNNING"}
        for trial in trials:
            if trial.trial_id in self.run_ids:
                for result in _recorded_results(trial):
                    self.on_trial_result(0, trials, trial, result)
                if self.run_ids[trial.trial_id] in still_open and trial.status == Trial.TERMINATED:
                    self.on_trial_complete(0, trials, trial)
                elif self.run_ids[trial.trial_id] in still_open and trial.status == Trial.ERROR:
                    self._finish(trial, "FAILED", "failed", **{TAG_ERROR: error_line(trial)})

    def _landed(self, trial_id: str, logged: dict[str, float]) -> None:
        """What reached a trial's run before a resume (its latest values): the last step (the progress
        metric's value is its step) and the best value, which the map, saved at most once a second, may not know."""
        step = logged.get(Unit.EPOCH.value, logged.get(Unit.ITERATION.value))
        if step is not None:
            self.last_steps[trial_id] = max(int(step), self.last_steps.get(trial_id, 0))
        # The runs' value, not the map's: the map may hold a best whose result was queued, never landed, and is
        # logged again now (it would not beat itself, and the run would never get it).
        value = logged.get(f"best/{self.metric}")
        if value is None:
            self.best_values.pop(trial_id, None)
        else:
            self.best_values[trial_id] = value

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if trial.trial_id in self.run_ids:
            self.client.update_run(self.run_ids[trial.trial_id], status="RUNNING")
            return
        recipe = self.recipe_of(trial.config)
        ordinal = next(i for i, t in enumerate(trials, start=1) if t.trial_id == trial.trial_id)  # Tune's creation order
        searched = [k for k in self.searched if k in trial.config]
        tags = {
            "mlflow.parentRunId": self.parent_run_id, TAG_TRIAL: trial.trial_id, TAG_SWEEP: self.sweep_name,
            TAG_RECIPE: self.recipe_name, TAG_ORDINAL: str(ordinal), TAG_SEARCHED: ",".join(searched), TAG_PHASE: self.phase,
            **self.parent_tags, **self.tags_of(trial.config),
        }
        name = self.name_of(ordinal, trial.config) if self.name_of else run_name(ordinal, trial.config, searched)
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        self.run_ids[trial.trial_id] = run_id
        self._save_map()
        # The run's params, recipe file and dataset input go through the writer: off Tune's loop (about 0.17 s
        # of the 0.27 s a trial start cost in SQLite), in order before the run's first metrics.
        self.writer.call(self._log_params, run_id, flatten(recipe.model_dump(mode="json")))  # repr of floats: the searched values exactly
        self.writer.call(self._log_recipe, run_id, recipe)
        data = recipe.data  # what selects the samples, not how they are augmented
        key = (recipe.task, data.name, data.fraction, getattr(data, "max_images", None), str(getattr(data, "classes", None)),
               getattr(data, "shots_per_class", None), recipe.runtime.seed)
        if key not in self.datasets:
            self.datasets[key] = _dataset_input(recipe)
        if self.datasets[key] is not None:
            self.writer.call(self._log_dataset, run_id, self.datasets[key])

    def _log_recipe(self, run_id: str, recipe: Recipe) -> None:
        self._log_text(run_id, "recipe.yaml", recipe_to_yaml(recipe))  # YAML's pure-Python emitter: in the writer's thread

    def _log_dataset(self, run_id: str, dataset) -> None:
        try:
            self.client.log_inputs(run_id, datasets=[dataset])
        except Exception:  # noqa: BLE001 - a store without dataset support keeps the run's other records
            logger.warning("could not log the dataset input of run %s", run_id, exc_info=True)

    def _devices(self, trial: Trial) -> float:
        """Workers x GPUs per worker, or x CPUs per worker without GPUs: what a second of the trial costs."""
        if trial.trial_id not in self.devices:
            runtime = self.recipe_of(trial.config).runtime
            self.devices[trial.trial_id] = runtime.workers * (runtime.gpus_per_worker or runtime.cpus_per_worker)
        return self.devices[trial.trial_id]

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        report = TrialReport.from_result(result)
        if run_id is None or report is None or report.progress is None:
            return
        step = report.progress.done  # the epoch, or the iteration (detection, step schedules)
        if step <= max(self.last_steps.get(trial.trial_id, 0), self.queued_steps.get(trial.trial_id, 0)):
            return  # an epoch re-done after a restart is not logged twice
        values = {**report.metrics, report.progress.unit.value: step}
        if TIME_TOTAL_S in result:
            values["cost/device_s"] = float(result[TIME_TOTAL_S]) * self._devices(trial)
        value = report.metrics.get(self.metric)
        best = self.best_values.get(trial.trial_id)
        if value is not None and math.isfinite(value) and (best is None or (value > best if self.mode == "max" else value < best)):
            self.best_values[trial.trial_id] = values[f"best/{self.metric}"] = value
        now = int(time.time() * 1000)
        self.queued_steps[trial.trial_id] = step
        self.writer.metrics(trial.trial_id, run_id, step, [Metric(k, v, now, step) for k, v in values.items() if math.isfinite(v)])

    def _finish(self, trial: Trial, status: str, outcome: str, **tags: str) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        self.writer.call(self._end_run, run_id, status, {TAG_OUTCOME: outcome, **{k: v[:5000] for k, v in tags.items()}})  # after its last metrics

    def _end_run(self, run_id: str, status: str, tags: dict[str, str]) -> None:
        try:
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        except MlflowException as err:
            if err.error_code not in _REFUSED:
                raise
            logger.warning("MLflow refused the end tags of run %s: %s", run_id, str(err).splitlines()[0][:300])  # the run still ends
        self.client.set_terminated(run_id, status=status)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        report = TrialReport.from_result(trial.last_result)
        if report is not None and report.failed:
            self._finish(trial, "FAILED", "failed", **{TAG_ERROR: report.error or "failed"})
        elif report is not None and report.completed:
            self._finish(trial, "FINISHED", "completed")
        else:
            # The scheduler's decision, not a fault: FINISHED, with where it was cut.
            progress = report.progress if report else None
            where = f"{progress.unit.value} {progress.done} of {progress.total}" if progress else "before its first report"
            self._finish(trial, "FINISHED", "stopped_early", **{TAG_STOPPED_AT: where})

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        full = trial_out_of_disk(trial, self.sweep_dir)
        if full:  # the sweep stops as if interrupted; its run stays open, to go on after a resume
            self.stopping = True
            raise OSError(errno.ENOSPC, f"trial {trial.trial_id} ran out of disk: {full[:200]}")
        self._finish(trial, "FAILED", "failed", **{TAG_ERROR: error_line(trial)})

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        if self.resumed:  # restored with every trial done, so no step ran: the map is checked here
            self.on_step_begin(0, trials)
        if self.parent_run_id is None or getattr(self, "stopping", False) or any(t.status not in (Trial.TERMINATED, Trial.ERROR) for t in trials):
            return  # interrupted, or stopped by a full disk: close_interrupted marks the open runs
        self.flush(FLUSH_AT_END_S)
        self.client.set_terminated(self.parent_run_id, status="FINISHED")

    def log_best(self, best: dict[str, Any], files: dict[str, str]) -> None:
        """The winner on the parent run: tags naming its trial and run, a link in the description,
        ``best/<metric>``, and ``files`` (recipe, checkpoint: ``{artifact name: local path}``) under ``best/``."""
        run_id = self.run_ids.get(best["trial_id"])
        name = self.client.get_run(run_id).info.run_name if run_id else best["trial_id"]
        self.client.log_metric(self.parent_run_id, f"best/{self.metric}", best["value"])
        self.client.set_tag(self.parent_run_id, TAG_BEST_TRIAL, best["trial_id"])
        if run_id:
            self.client.set_tag(self.parent_run_id, TAG_BEST_RUN, run_id)
            link = f"#/experiments/{self.experiment_id}/runs/{run_id}"
            note = f"Best trial: [{name}]({link}), {self.metric} = {best['value']:.4f}. Its recipe and checkpoint are under artifacts best/."
            self.client.set_tag(self.parent_run_id, "mlflow.note.content", note)
        for path in files.values():
            self.client.log_artifact(self.parent_run_id, path, artifact_path="best")

    def log_confirmed(self, summary: dict[str, Any], table: str, files: dict[str, str]) -> None:
        """A finished confirmation on the parent run: the confirmed winner's mean, std and 95% CI
        (``confirmed/<metric>/...``), the winner tags and description moved to it, the table,
        and ``files`` under ``best/``."""
        parent, winner = self.parent_run_id, next((r for r in summary["recipes"] if r["trial_id"] == summary.get("winner")), None)
        self._log_params(parent, {"confirm.top": summary["top"], "confirm.seeds": json.dumps(summary["seeds"])})
        self._log_text(parent, "confirmation.md", table + "\n", artifact_path="confirmation")
        self._log_text(parent, "confirmation.json", json.dumps(summary, indent=1), artifact_path="confirmation")
        if winner is None:
            return
        prefix = f"confirmed/{self.metric}"
        values = {f"{prefix}/mean": winner["mean"], f"{prefix}/std": winner["std"], f"{prefix}/seeds": float(winner["n"])}
        if winner["ci95"]:
            values.update({f"{prefix}/ci95_low": winner["ci95"][0], f"{prefix}/ci95_high": winner["ci95"][1]})
        now = int(time.time() * 1000)
        self.client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in values.items() if v is not None and math.isfinite(v)])
        self.client.set_tag(parent, TAG_BEST_TRIAL, winner["trial_id"])
        if winner.get("mlflow_run_id"):
            self.client.set_tag(parent, TAG_BEST_RUN, winner["mlflow_run_id"])
        link = f"#/experiments/{self.experiment_id}/runs/{winner.get('mlflow_run_id')}"
        note = f"Confirmed winner: [{winner['name']}]({link}). Its recipe and checkpoint are under artifacts best/.\n\n```\n{table}\n```"
        self.client.set_tag(parent, "mlflow.note.content", note)
        for path in files.values():
            self.client.log_artifact(parent, path, artifact_path="best")

    def close_interrupted(self) -> None:
        """The driver was interrupted: the parent and every run still open are KILLED, tagged interrupted."""
        self.flush(FLUSH_ON_STOP_S)
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status="KILLED")
        for run_id in self.run_ids.values():
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_tag(run_id, TAG_OUTCOME, "interrupted")
                self.client.set_terminated(run_id, status="KILLED")


def rebuild_run_map(directory: str, tracking_uri: str, experiment_name: str, phase: str, metric: str) -> dict[str, Any]:
    """The trial -> MLflow run map of ``directory`` rebuilt from the runs' tags (its file was damaged): the
    parent, each trial's run of ``phase``, the last step logged and the best value so far of each."""
    client = MlflowClient(tracking_uri)
    saved: dict[str, Any] = {"experiment_id": None, "parent_run_id": None, "trials": {}, "last_steps": {}, "best_values": {}}
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is not None:
        saved["experiment_id"] = experiment.experiment_id
        runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_SWEEP}` = '{experiment_name}'",
                                  max_results=50_000, order_by=["attributes.start_time ASC"])
        for run in runs:
            tags, trial_id = run.data.tags, run.data.tags.get(TAG_TRIAL)
            if trial_id is None:
                if "mlflow.parentRunId" not in tags and saved["parent_run_id"] is None:
                    saved["parent_run_id"] = run.info.run_id
                continue
            if tags.get(TAG_PHASE, "search") != phase or trial_id in saved["trials"]:
                continue
            saved["trials"][trial_id] = run.info.run_id
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            if steps:
                saved["last_steps"][trial_id] = max(steps)
            if f"best/{metric}" in run.data.metrics:
                saved["best_values"][trial_id] = run.data.metrics[f"best/{metric}"]
    write_json(os.path.join(directory, RUNS_FILE), saved)
    return saved


def _recorded_results(trial: Trial) -> list[dict[str, Any]]:
    """The results Tune wrote to the trial's ``result.json`` (none when it is not on this machine)."""
    results = []
    try:
        with open(os.path.join(trial.local_path, "result.json")) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    results.append(json.loads(line))
    except (OSError, TypeError):
        pass
    return [r for r in results if isinstance(r, dict)]


LOW_DISK_BYTES = 64 << 20  # free space under which "No space left on device" is taken to be the sweep's disk


def trial_out_of_disk(trial: Trial, directory: str) -> Optional[str]:
    """The error of a trial that failed for want of room where the sweep keeps its files, or None: its error
    says a disk is full, and the sweep's has almost no room left (a full ``/dev/shm`` or a worker's own
    scratch disk is that trial's failure, not a reason to stop the sweep)."""
    import shutil

    error = error_line(trial)
    if not any(marker in error for marker in DISK_FULL):
        return None
    try:
        return error if shutil.disk_usage(directory).free < LOW_DISK_BYTES else None
    except OSError:
        return None


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
            raise SweepError(f"MLflow tracking URI {short_uri(uri)} does not answer: {str(getattr(err, 'reason', err))[:200]}") from None
    elif uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        directory = os.path.dirname(path) or "."
        if os.path.isdir(path):
            raise SweepError(f"MLflow tracking URI {short_uri(uri)}: {short(path)} is a directory, not a database file")
        if not os.access(directory, os.W_OK):
            raise SweepError(f"MLflow tracking URI {short_uri(uri)}: cannot write in {short(directory)}")
    elif "://" in uri:
        _check_database_uri(uri)


# What installs the drivers of the install extras (SQLAlchemy's driver name -> what to install).
_DB_EXTRAS = {
    "psycopg": "'recipe-search[postgres]'", "psycopg2": "'recipe-search[postgres]'",
    "pymysql": "'recipe-search[mysql]'", "mysqldb": "'recipe-search[mysql]' and write mysql+pymysql://",
}
_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def _check_database_uri(uri: str) -> None:
    """A database tracking URI: a database MLflow stores runs in, its SQLAlchemy driver importable, its server answering."""
    import socket
    from urllib.parse import urlsplit

    from sqlalchemy.engine.url import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("file", "databricks", "databricks-uc", "uc"):
        return
    try:
        dialect = make_url(uri).get_dialect() if scheme.split("+")[0] in _DB_PORTS else None
    except (ArgumentError, NoSuchModuleError, ValueError):
        dialect = None
    if dialect is None:
        raise SweepError(
            f"MLflow tracking URI {short_uri(uri)}: unknown scheme {scheme!r} (sqlite:///PATH, http(s)://HOST, a folder, "
            "or a database: postgresql://, mysql://, mssql+pyodbc://, with an optional +driver)"
        )
    try:
        dialect.import_dbapi()
    except ImportError as err:
        missing = err.name or dialect.driver
        raise SweepError(
            f"MLflow tracking URI {short_uri(uri)} needs the Python driver {missing!r}: pip install {_DB_EXTRAS.get(dialect.driver, missing)}"
        ) from None
    try:
        port = parts.port or _DB_PORTS[scheme.split("+")[0]]
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=5):
            pass
    except (OSError, ValueError) as err:
        raise SweepError(f"MLflow tracking URI {short_uri(uri)}: the database server does not answer ({err})") from None


def short_uri(uri: str) -> str:
    """A URI as an error message quotes it: without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.password:
        uri = uri.replace(f":{parts.password}@", ":***@", 1)
    return repr(uri[:200])
