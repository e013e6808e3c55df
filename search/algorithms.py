"""Searchers (Optuna samplers behind Ray Tune's OptunaSearch) and trial schedulers.

Each registry entry is a small frozen record; unknown names fail listing the
available ones (a name timm-style factories would silently map to None).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    TrialScheduler,
)
from ray.tune.search.optuna import OptunaSearch

from search.layout import SCHEDULER_FILE
from spaces import Space, SpaceError, SweepError
from trainables.report import TrialReport

__all__ = ["SEARCHERS", "SCHEDULERS", "PruneAwareOptunaSearch", "build_searcher", "build_scheduler", "check_names", "grid_points"]

logger = logging.getLogger(__name__)

UNKNOWN = "unknown {what} {name!r}; available: {available}"


@dataclass(frozen=True)
class SearcherSpec:
    name: str
    description: str
    make_sampler: Callable[[Optional[int], int, Space], optuna.samplers.BaseSampler]  # (seed, trials, space) -> sampler


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    description: str
    make: Callable[..., TrialScheduler]  # (max_t, grace_period, **objective) -> scheduler


def tpe_startup_trials(trials: int) -> int:
    """Random trials before TPE models the results: Optuna's 10, or a quarter of a smaller budget.

    With Optuna's default a 12-trial sweep would be a random search with two modelled trials.
    """
    return min(10, max(3, trials // 4))


def grid_points(space: Space) -> int:
    """How many points a grid over ``space`` has; every param must be a plain choice."""
    size = 1
    for key, param in space.params.items():
        if param.kind != "choice" or param.when or param.format:
            raise SpaceError(f"searcher grid takes choice params without when/format, but {key} is {param.kind}")
        size *= len(param.choices)
    return size


class _TuneGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid, without its ``study.stop()`` once every point is visited.

    Outside ``study.optimize`` that call raises, and Tune ends the sweep itself:
    its ``num_samples`` is the grid's size.
    """

    def after_trial(self, study, trial, state, values) -> None:  # noqa: D102
        return None


def _grid(seed: Optional[int], trials: int, space: Space) -> optuna.samplers.BaseSampler:
    grid_points(space)
    return _TuneGridSampler({k: p.choices for k, p in space.params.items()}, seed=seed)


def _tpe(seed: Optional[int], trials: int, space: Space) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=tpe_startup_trials(trials))


SEARCHERS: dict[str, SearcherSpec] = {
    s.name: s
    for s in (
        SearcherSpec("tpe", "Optuna TPE (Bergstra et al. 2011), multivariate", _tpe),
        SearcherSpec("grid", "every combination of the space's choices once (studies); --trials is the grid size", _grid),
        SearcherSpec("random", "Optuna random sampling", lambda seed, trials, space: optuna.samplers.RandomSampler(seed=seed)),
        SearcherSpec("cmaes", "Optuna CMA-ES for numeric keys; categorical keys sampled at random", lambda seed, trials, space: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)),
    )
}

class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive a resume.

    Tune restores a sweep's scheduler as it was built, with empty rungs: after a resume,
    new trials would be judged only against the trials that report again, a laxer cut
    than the one the first trials met. This ASHA saves itself (its public ``save``) in the
    experiment's folder after every result it judges, and restores from there before it
    judges anything in a resumed sweep (the folder where the sweep is now, if it moved).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state_file: Optional[str] = None

    def _bind(self, tune_controller) -> None:
        if self.state_file is None:
            state_file = os.path.join(tune_controller.experiment_path, SCHEDULER_FILE)
            if os.path.isfile(state_file):
                self.restore(state_file)
            self.state_file = state_file

    def on_trial_add(self, tune_controller, trial) -> None:
        self._bind(tune_controller)
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._bind(tune_controller)
        decision = super().on_trial_result(tune_controller, trial, result)
        self._persist()
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._bind(tune_controller)
        super().on_trial_complete(tune_controller, trial, result)
        self._persist()

    def _persist(self) -> None:
        tmp = f"{self.state_file}.tmp"
        self.save(tmp)
        os.replace(tmp, self.state_file)


SCHEDULERS: dict[str, SchedulerSpec] = {
    s.name: s
    for s in (
        SchedulerSpec("asha", "ASHA early stopping (Li et al. 2018, arXiv:1810.05934); its rungs survive a resume", lambda max_t, grace, **objective: ResumableASHA(max_t=max_t, grace_period=grace, reduction_factor=3, **objective)),
        SchedulerSpec("hyperband", "HyperBand (Li et al. 2016, arXiv:1603.06560); starts afresh on resume", lambda max_t, grace, **objective: HyperBandScheduler(max_t=max_t, reduction_factor=3, **objective)),
        SchedulerSpec("median", "median stopping rule (Golovin et al. 2017); starts afresh on resume", lambda max_t, grace, **objective: MedianStoppingRule(grace_period=grace, min_samples_required=3, **objective)),
        SchedulerSpec("fifo", "no early stopping: every trial runs its full schedule", lambda max_t, grace, **objective: FIFOScheduler()),
    )
}


def _known(what: str, registry: dict[str, Any], name: str) -> Any:
    if name not in registry:
        raise SweepError(UNKNOWN.format(what=what, name=name, available=", ".join(registry)))
    return registry[name]


def check_names(searcher: str, scheduler: str) -> None:
    _known("searcher", SEARCHERS, searcher)
    _known("scheduler", SCHEDULERS, scheduler)


class _Numbered:
    """A define-by-run function that also returns the Optuna trial's number (popped by the searcher)."""

    def __init__(self, space_fn: Callable) -> None:
        self.space_fn = space_fn

    def __call__(self, trial: Any) -> dict[str, Any]:
        return {**self.space_fn(trial), NUMBER_KEY: trial.number}


NUMBER_KEY = "__optuna_trial_number__"


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about trials a scheduler stopped.

    Ray's OptunaSearch reports a trial stopped early by ASHA as COMPLETE with its
    short-budget score, so TPE models a 3-epoch score as a final one. Here such a
    trial is told as PRUNED (its per-epoch values, the cut one included, reported as
    intermediate values), and a failed trial or one whose metric is not finite as FAIL.
    Only the public interfaces of Ray's searcher and of Optuna are used: the study is
    opened by its storage URL and name, and each Tune trial's Optuna number is kept here.

    Example::

        searcher = PruneAwareOptunaSearch(space=define_by_run(space, base),
                                          metric="val/top1", mode="max",
                                          sampler=optuna.samplers.TPESampler(seed=0),
                                          storage="sqlite:///runs/s/optuna.db", study_name="s")
    """

    def __init__(self, space: Callable, metric: str, mode: str, sampler: optuna.samplers.BaseSampler,
                 storage: str, study_name: str, points_to_evaluate: Optional[list[dict]] = None) -> None:
        super().__init__(space=_Numbered(space), metric=metric, mode=mode, sampler=sampler,
                         points_to_evaluate=points_to_evaluate,
                         storage=optuna.storages.RDBStorage(storage), study_name=study_name)
        self.storage_url = storage
        self.study_name = study_name
        self.numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self.told: set[str] = set()

    def suggest(self, trial_id: str) -> Optional[dict]:
        config = super().suggest(trial_id)
        if config is not None:
            self.numbers[trial_id] = config.pop(NUMBER_KEY)
        return config

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if trial_id not in self.numbers or trial_id in self.told:
            return  # never asked by this searcher, or told already
        if result is None and not error:  # stopped while paused or pending (HyperBand): its values are reported
            return self._tell(trial_id, None, error=False)  # PRUNED
        report = TrialReport.from_result(result)
        value = report.metrics.get(self.metric) if report else None
        if error or report is None or report.failed or value is None or not math.isfinite(value):
            return self._tell(trial_id, None, error=True)  # FAIL
        if report.completed:
            return self._tell(trial_id, result, error=False)  # COMPLETE with the final value
        # Tune hands a trial's last result to on_trial_complete, not on_trial_result, when the
        # scheduler stops it there: record it as the value it was cut at, then tell it without a
        # value, which Ray's searcher tells Optuna as PRUNED.
        if "training_iteration" in result:
            self.on_trial_result(trial_id, result)
        self._tell(trial_id, {k: v for k, v in result.items() if k != self.metric}, error=False)

    def _tell(self, trial_id: str, result: Optional[dict], error: bool) -> None:
        # A stored study may hold the trial as finished already: told just before the driver was
        # killed, after Tune last saved this searcher. The stored verdict stands (Ray logs it).
        self.told.add(trial_id)
        with _quiet("ray.tune.search.optuna.optuna_search"):
            super().on_trial_complete(trial_id, result, error)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.numbers or trial_id in self.told:
            return
        with warnings.catch_warnings(), contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            warnings.simplefilter("ignore")  # Optuna keeps the first value of a step reported twice
            super().on_trial_result(trial_id, result)  # see _tell

    @property
    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.study_name, storage=self.storage_url)

    def restore(self, checkpoint_path: str) -> None:
        """Restore the searcher. A trial its stored study still holds as RUNNING that no Tune trial
        knows (asked after Tune's last save of the searcher, then lost with the driver) becomes FAIL,
        and its point is enqueued again: a grid cell or the space's start point is still evaluated."""
        super().restore(checkpoint_path)
        known = set(self.numbers.values())
        study = self.study
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number not in known:
                if trial.params:
                    study.enqueue_trial(trial.params, skip_if_exists=False)
                study.tell(trial.number, state=TrialState.FAIL)


@contextlib.contextmanager
def _quiet(logger_name: str):
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def build_searcher(name: str, space_fn: Callable, metric: str, mode: str, seed: Optional[int], trials: int,
                   storage: str, study_name: str, points_to_evaluate: Optional[list[dict]] = None) -> PruneAwareOptunaSearch:
    """The searcher ``name`` over a define-by-run space; its Optuna study ``study_name`` in the RDB ``storage`` URL."""
    spec = _known("searcher", SEARCHERS, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # TPE's multivariate/group
        sampler = spec.make_sampler(seed, trials, space_fn.space)
    return PruneAwareOptunaSearch(space_fn, metric, mode, sampler, storage, study_name, points_to_evaluate)


def build_scheduler(name: str, max_t: int, grace_period: int, metric: str, mode: str) -> TrialScheduler:
    """The scheduler ``name``, given the objective itself (a restored ASHA keeps it; Tune's own would clash)."""
    objective = {"time_attr": "training_iteration", "metric": metric, "mode": mode}
    return _known("scheduler", SCHEDULERS, name).make(max_t, grace_period, **objective)
