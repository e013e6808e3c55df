"""Searchers (Optuna samplers behind Ray Tune's OptunaSearch) and trial schedulers.

Each registry entry is a small frozen record; unknown names fail listing the
available ones (a name timm-style factories would silently map to None).
"""

from __future__ import annotations

import contextlib
import logging
import math
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
    make: Callable[[int, int], TrialScheduler]  # (max_t, grace_period) -> scheduler


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

SCHEDULERS: dict[str, SchedulerSpec] = {
    s.name: s
    for s in (
        SchedulerSpec("asha", "ASHA early stopping (Li et al. 2018, arXiv:1810.05934)", lambda max_t, grace: ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace, reduction_factor=3)),
        SchedulerSpec("hyperband", "HyperBand (Li et al. 2016, arXiv:1603.06560)", lambda max_t, grace: HyperBandScheduler(time_attr="training_iteration", max_t=max_t, reduction_factor=3)),
        SchedulerSpec("median", "median stopping rule (Golovin et al. 2017)", lambda max_t, grace: MedianStoppingRule(time_attr="training_iteration", grace_period=grace, min_samples_required=3)),
        SchedulerSpec("fifo", "no early stopping: every trial runs its full schedule", lambda max_t, grace: FIFOScheduler()),
    )
}


def _known(what: str, registry: dict[str, Any], name: str) -> Any:
    if name not in registry:
        raise SweepError(UNKNOWN.format(what=what, name=name, available=", ".join(registry)))
    return registry[name]


def check_names(searcher: str, scheduler: str) -> None:
    _known("searcher", SEARCHERS, searcher)
    _known("scheduler", SCHEDULERS, scheduler)


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about trials a scheduler stopped.

    Ray's OptunaSearch reports a trial stopped early by ASHA as COMPLETE with its
    short-budget score, so TPE models a 3-epoch score as a final one. Here such a
    trial is told as PRUNED (its per-epoch values were already reported as
    intermediate values), and a trial whose metric is not finite as FAIL.

    Example::

        searcher = PruneAwareOptunaSearch(space=define_by_run(space, base),
                                          metric="val/top1", mode="max",
                                          sampler=optuna.samplers.TPESampler(seed=0))
    """

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        report = TrialReport.from_result(result)
        value = report.metrics.get(self.metric) if report else None
        if error or report is None or report.failed or value is None or not math.isfinite(value):
            state, value = TrialState.FAIL, None
        elif report.completed:
            state = TrialState.COMPLETE
        else:
            # Tune hands a trial's last result to on_trial_complete, not on_trial_result,
            # when the scheduler stops it there: record it as the value it was pruned at.
            step = result.get("training_iteration")
            if step is not None:
                with warnings.catch_warnings(), contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    warnings.simplefilter("ignore")  # Optuna keeps the first value of a step reported twice
                    self._ot_trials[trial_id].report(value, step)
            state, value = TrialState.PRUNED, None
        # A stored study may hold the trial as finished already: told just before the driver was
        # killed, after Tune last saved this searcher. The stored verdict stands.
        self._ot_study.tell(self._ot_trials[trial_id], value, state=state, skip_if_finished=True)
        self._completed_trials.add(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # see on_trial_complete
            super().on_trial_result(trial_id, result)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def restore(self, checkpoint_path: str) -> None:
        """Restore the searcher. A trial its stored study still holds as RUNNING that no Tune trial
        knows (asked after Tune's last save of the searcher, then lost with the driver) becomes FAIL,
        and its point is enqueued again: a grid cell or the space's start point is still evaluated."""
        super().restore(checkpoint_path)
        known = {trial.number for trial in self._ot_trials.values()}
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number not in known:
                if trial.params:
                    self.study.enqueue_trial(trial.params, skip_if_exists=False)
                self.study.tell(trial.number, state=TrialState.FAIL)


def build_searcher(name: str, space_fn: Callable, metric: str, mode: str, seed: Optional[int], trials: int,
                   points_to_evaluate: Optional[list[dict]] = None, storage: Optional[str] = None,
                   study_name: Optional[str] = None) -> PruneAwareOptunaSearch:
    """The searcher ``name`` over a define-by-run space; its Optuna study in the RDB ``storage`` URL when given."""
    spec = _known("searcher", SEARCHERS, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # TPE's multivariate/group
        sampler = spec.make_sampler(seed, trials, space_fn.space)
    rdb = optuna.storages.RDBStorage(storage) if storage else None
    return PruneAwareOptunaSearch(
        space=space_fn, metric=metric, mode=mode, sampler=sampler, points_to_evaluate=points_to_evaluate,
        storage=rdb, study_name=study_name,
    )


def build_scheduler(name: str, max_t: int, grace_period: int) -> TrialScheduler:
    return _known("scheduler", SCHEDULERS, name).make(max_t, grace_period)
