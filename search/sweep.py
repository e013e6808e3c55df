"""Run a planned sweep: join or start Ray, build the Tuner with the driver's callbacks, fit.

``search.plan`` does every check first; ``run_sweep`` runs the plan and returns
the sweep's recorded state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
from typing import Any, Optional

import yaml

from spaces import Recipe, SweepError, define_by_run, flatten, recipe_to_yaml, resolve_recipe, validate_recipe
from trainables.report import CHECKPOINT_FILE

from search.algorithms import build_scheduler, build_searcher
from search.layout import BEST_RECIPE_FILE, LOG_FILE, META_DIR, SPEC_FILE, SWEEP_FORMAT, read_state, trial_checkpoint
from search.monitor import SweepMonitor
from search.plan import SweepPlan
from search.report import write_report
from search.tracking import MlflowTracking, provenance_tags
from search.trial import run_trial, trial_resources, uses_ray_train

__all__ = ["init_ray", "build_tuner", "run_sweep"]

logger = logging.getLogger("recipe_search")


def _route_ray_logs(sweep_dir: str) -> None:
    """Ray's and Tune's log records go to ``ray.log`` in the sweep directory, not the terminal."""
    handler = logging.FileHandler(os.path.join(sweep_dir, LOG_FILE))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "ray.tune", "ray.train", "ray.air", "ray.data", "optuna", "mlflow", "alembic"):
        log = logging.getLogger(name)
        for old in list(log.handlers):
            log.removeHandler(old)
        log.addHandler(handler)
        log.propagate = False
    import optuna

    optuna.logging.disable_default_handler()


def init_ray(address: Optional[str] = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray with its dashboard on 127.0.0.1.

    Train V2 releases a trial's placement group through the state API, which
    needs the dashboard: without it the second trial waits forever for workers.
    """
    import ray

    if ray.is_initialized():
        return
    import search
    import spaces
    import trainables

    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        # Nodes of a remote cluster may not have this project installed: ship it.
        modules = [os.path.dirname(m.__file__) for m in (spaces, trainables, search)]
        ray.init(address=address, log_to_driver=False, runtime_env={"py_modules": modules}, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING)


def _fit_concurrency(plan: SweepPlan) -> int:
    import ray

    runtime = plan.recipe.runtime
    cluster = ray.cluster_resources()
    need_cpu = runtime.workers * runtime.cpus_per_worker
    need_gpu = runtime.workers * runtime.gpus_per_worker
    fits = [math.floor(cluster.get("CPU", 0) / need_cpu)]
    if need_gpu:
        fits.append(math.floor(cluster.get("GPU", 0) / need_gpu))
    fit = min(fits)
    if fit < 1:
        raise SweepError(
            f"a trial needs {runtime.workers} worker(s) x {runtime.cpus_per_worker:g} CPU"
            + (f" + {runtime.gpus_per_worker:g} GPU" if runtime.gpus_per_worker else "")
            + f", but the Ray cluster has {cluster.get('CPU', 0):g} CPU and {cluster.get('GPU', 0):g} GPU "
            "(lower --workers / --cpus-per-worker / --gpus-per-worker, or join a larger cluster with --address)"
        )
    return min(fit, plan.spec.concurrency or fit, plan.spec.trials)


def _recipe_of(plan: SweepPlan):
    def recipe_of(config: dict[str, Any]) -> Recipe:
        return resolve_recipe(plan.base, config, plan.overrides)

    return recipe_of


def build_tuner(plan: SweepPlan, callbacks: list, restore: bool = False):
    """The Ray Tune ``Tuner`` of a plan (fresh, or restored from its directory)."""
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig

    spec = plan.spec
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=plan.base,
            overrides=plan.overrides,
            train_storage=os.path.join(plan.sweep_dir, "train"),
            max_failures=spec.max_failures,
            metric=plan.space.metric,
            launcher=spec.launcher,
        ),
        trial_resources(plan.recipe, spec.launcher),
    )
    if restore:
        return tune.Tuner.restore(plan.sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    searcher = None
    if spec.searcher is not None:
        resolved = flatten(plan.recipe.model_dump())
        points = [plan.space.start_point(resolved)] if plan.space.start else None
        searcher = build_searcher(
            spec.searcher, define_by_run(plan.space, resolved), plan.space.metric, plan.space.mode, spec.seed, spec.trials,
            points_to_evaluate=points, storage=spec.optuna_storage, study_name=plan.name,
        )
    tune_config = tune.TuneConfig(  # the searcher and the scheduler hold the objective (metric, mode)
        search_alg=searcher,
        scheduler=build_scheduler(spec.scheduler, plan.max_epochs, plan.grace_period, plan.space.metric, plan.space.mode),
        num_samples=spec.trials,
        max_concurrent_trials=_fit_concurrency(plan),
        # Reusing a trial's actor saves its start-up (torch import) when the loop runs in it;
        # a trial that ran a TorchTrainer takes longer to wind down than Tune waits, and a
        # failed reuse left the next trial unscheduled: those get fresh actors.
        reuse_actors=not uses_ray_train(plan.recipe, spec.launcher),
    )
    run_config = tune.RunConfig(
        name=plan.name,
        storage_path=plan.storage_root,
        callbacks=callbacks,
        verbose=0,
        log_to_file=True,
        checkpoint_config=CheckpointConfig(num_to_keep=1),
        # Under Ray Train, the TorchTrainer restarts its own workers; the trial itself is light.
        failure_config=FailureConfig(max_failures=0 if uses_ray_train(plan.recipe, spec.launcher) else spec.max_failures),
    )
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _baseline_config(plan: SweepPlan) -> Optional[dict[str, Any]]:
    """The trial config of the base recipe in a ``start: true`` space (what the first trial samples)."""
    if not plan.space.start or plan.spec.searcher is None:
        return None
    resolved = flatten(plan.recipe.model_dump())
    point = plan.space.start_point(resolved)
    return {key: plan.space.params[key].render(value, resolved.get(key)) for key, value in point.items()}


def _callbacks(plan: SweepPlan, out, resume: bool) -> tuple[MlflowTracking, SweepMonitor]:
    """The driver's Tune callbacks: MLflow tracking, and the sweep's state with its progress lines."""
    recipe_of = _recipe_of(plan)
    tracker = MlflowTracking(
        tracking_uri=plan.tracking_uri,
        sweep_name=plan.name,
        sweep_dir=plan.sweep_dir,
        sweep_params={
            "space": plan.space.name,
            "recipe": plan.space.recipe,
            "searcher": plan.spec.searcher or "none",
            "scheduler": plan.spec.scheduler,
            "trials": plan.spec.trials,
            "max_epochs": plan.max_epochs,
            "seed": plan.spec.seed,
            "overrides": json.dumps(plan.overrides, sort_keys=True),
        },
        recipe_name=plan.space.recipe,
        recipe_of=recipe_of,
        metric=plan.space.metric,
        mode=plan.space.mode,
        searched=list(plan.space.params),
        parent_tags=provenance_tags(_working_directory()),
        parent_files={
            "space.yaml": yaml.safe_dump(plan.space.model_dump(mode="json"), sort_keys=False),
            "sweep.json": _read(os.path.join(plan.sweep_dir, SPEC_FILE)),
        },
        resumed=resume,
    )
    monitor = SweepMonitor(
        plan.sweep_dir, plan.name, plan.spec.trials, plan.space.metric, plan.space.mode,
        recipe_of=recipe_of, run_id_of=lambda trial_id: tracker.run_ids.get(trial_id), out=out,
        resumed=resume, baseline_config=_baseline_config(plan),
    )
    return tracker, monitor


def _stop_as_interrupt(signum, frame) -> None:
    """SIGTERM handled by whatever handles Ctrl-C now (Tune's graceful stop during ``fit``)."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIGINT ignored (a background job) or not set from Python
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """While Tune runs, SIGTERM (kill, a batch scheduler, ``ray job stop``) stops the driver as Ctrl-C
    does: Tune saves the experiment, open runs are marked KILLED, the resume command is printed.
    Both handlers are put back afterwards (Ray's SIGTERM handler would abort the process; Tune's
    SIGINT handler outlives a ``fit`` that ended normally)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _stop_as_interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _fit(tuner, sweep_dir: str) -> bool:
    """Run the Tuner with Tune's banners sent to the log; whether the driver was interrupted."""
    from ray.tune.error import TuneError

    with open(os.path.join(sweep_dir, LOG_FILE), "a") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            with _sigterm_as_ctrl_c():
                tuner.fit()
        except (KeyboardInterrupt, TuneError):
            return True
    return False


def run_sweep(plan: SweepPlan, out=None, resume: bool = False) -> dict[str, Any]:
    """Start Ray (or join it), run the sweep to its end, and return its recorded state.

    With ``resume``, the sweep continues from its directory: finished trials stay
    finished, interrupted ones go on from their last checkpoint, the searcher's
    Optuna study is restored, and MLflow runs are reopened, not duplicated.
    If the driver is interrupted (Ctrl-C), the state is saved, open runs are
    marked KILLED and the returned state has ``"interrupted": true``.
    """
    out = out or sys.stdout
    os.makedirs(os.path.join(plan.sweep_dir, META_DIR), exist_ok=True)
    if not resume:
        with open(os.path.join(plan.sweep_dir, SPEC_FILE), "w") as f:
            json.dump({**plan.spec.to_json(), "name": plan.name, "tracking_uri": plan.tracking_uri, "format": SWEEP_FORMAT}, f, indent=1)
    _route_ray_logs(plan.sweep_dir)
    init_ray(plan.spec.address)
    tracker, monitor = _callbacks(plan, out, resume)
    verb = "resuming" if resume else "sweep"
    print(f"{verb} {plan.name}: {plan.spec.trials} trial(s) of space {plan.space.name!r} on recipe {plan.space.recipe!r}", file=out)
    print(f"  directory {plan.sweep_dir} (Ray logs: {os.path.join(plan.sweep_dir, LOG_FILE)})", file=out)
    if plan.spec.scheduler in ("asha", "median"):
        unit = "evaluation" if plan.recipe.schedule.iterations is not None else "epoch"
        print(f"  early stopping: {plan.spec.scheduler}, no cut before {unit} {plan.grace_period}" + (f" ({plan.grace_note})" if plan.grace_note else ""), file=out)
    out.flush()
    tuner = build_tuner(plan, [tracker, monitor], restore=resume)
    if resume:
        # Tune restores the run config it pickled; this driver's callbacks replace its stale copies.
        tuner._local_tuner.get_run_config().callbacks = [tracker, monitor]
    interrupted = _fit(tuner, plan.sweep_dir)
    state = read_state(plan.sweep_dir) or {}
    if interrupted or not state.get("finished"):
        tracker.close_interrupted()
        monitor.mark_interrupted()
        return {**(read_state(plan.sweep_dir) or {}), "interrupted": True}
    best = state.get("best")
    if best:
        best_path = os.path.join(plan.sweep_dir, BEST_RECIPE_FILE)
        with open(best_path, "w") as f:
            f.write(recipe_to_yaml(validate_recipe(best["recipe"])))
        files = {"recipe": best_path}
        checkpoint = trial_checkpoint(plan.sweep_dir, best["trial_id"]) if plan.spec.log_checkpoint else None
        if checkpoint:
            files["checkpoint"] = os.path.join(checkpoint, CHECKPOINT_FILE)
        tracker.log_best(best, files)
    _report(plan, out)
    return state


def _report(plan: SweepPlan, out) -> None:
    """The sweep's report; a sweep that ran is not failed by a report that could not be drawn."""
    try:
        paths = write_report(plan.sweep_dir, plan.tracking_uri, plan.spec.optuna_storage)
    except Exception as err:  # noqa: BLE001 - the sweep's results are saved; say why the report is missing
        logger.exception("the sweep report failed")
        print(f"report: not written ({type(err).__name__}: {str(err).splitlines()[0][:200]}); see {os.path.join(plan.sweep_dir, LOG_FILE)}", file=out)
        return
    print(f"report: {paths['report']} (also on the MLflow parent run)", file=out)


def _working_directory() -> Optional[str]:
    try:
        return os.getcwd()
    except FileNotFoundError:  # a Ray Job's working directory can be removed under the driver
        return None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
