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
import shutil
import signal
import socket
import sys
import threading
import time
from typing import Any, Optional

import yaml

from spaces import Recipe, SweepError, define_by_run, flatten, recipe_to_yaml, resolve_recipe, validate_recipe
from trainables.report import CHECKPOINT_FILE

from search.algorithms import build_scheduler, build_searcher
from search.confirm import (
    ConfirmationPlan, confirm_dir, confirmation_summary, format_confirmation, plan_confirmation, write_confirmation,
)
from search.layout import (
    BEST_RECIPE_FILE, LOG_FILE, META_DIR, RUNS_FILE, SPEC_FILE, STATE_FILE, SWEEP_FORMAT, check_no_driver, read_run_map,
    disk_full, read_state, release_lease, renew_lease, set_aside_damaged, take_lease, trial_checkpoint,
)
from search.monitor import SweepMonitor
from search.plan import SweepPlan
from search.report import write_report
from search.storage import MirrorSync, Storage, join, mark_mirror
from search.tracking import TAG_CONFIRMS, TAG_SEED, MlflowTracking, provenance_tags, rebuild_run_map, run_name
from search.trial import ConfirmationResources, confirmation_recipe, run_confirmation_trial, run_trial, trial_resources, uses_ray_train

__all__ = ["hold_lease", "init_ray", "build_tuner", "run_confirmation", "run_replicates", "run_sweep", "sweep_trainable", "write_spec"]

logger = logging.getLogger("recipe_search")


class _LogFile(logging.FileHandler):
    """``ray.log``: a record that cannot be written (a full disk) is dropped, not printed with a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's hook
        pass


def _route_ray_logs(sweep_dir: str) -> None:
    """Ray's and Tune's log records go to ``ray.log`` in the sweep directory, not the terminal."""
    handler = _LogFile(os.path.join(sweep_dir, LOG_FILE))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "ray.tune", "ray.train", "ray.air", "ray.data", "optuna", "mlflow", "alembic", "search"):
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

    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        # Nodes of a remote cluster may not have this project installed: ship it. A driver running as a Ray Job
        # (recipe-search submit) has the job's runtime env, which ships it already (Ray refuses a second one).
        modules = [os.path.dirname(m.__file__) for m in (spaces, trainables, search)]
        runtime_env = None if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ else {"py_modules": modules}
        try:
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as err:  # not a Ray head, a token it refused, another version
            raise SweepError(f"the Ray cluster at {address!r} did not take this driver: {str(err).strip().splitlines()[0][:300]}") from None
    else:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING)
    if callable(on_sigterm):  # the CLI's (SIGTERM as Ctrl-C), which ray.init replaced with its own
        signal.signal(signal.SIGTERM, on_sigterm)


def _fit_concurrency(plan: SweepPlan, runtime=None, trials: Optional[int] = None) -> int:
    """Trials at once: what the cluster fits of ``runtime`` (the base recipe's), within --concurrency and the trials."""
    import ray

    runtime = runtime or plan.recipe.runtime
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
    return min(fit, plan.spec.concurrency or fit, trials or plan.spec.trials)


def _recipe_of(plan: SweepPlan):
    def recipe_of(config: dict[str, Any]) -> Recipe:
        return resolve_recipe(plan.base, config, plan.overrides)

    return recipe_of


def sweep_trainable(plan: SweepPlan):
    """The Tune trainable of a plan's trials: ``run_trial`` on the plan's recipe, with its resources."""
    from ray import tune

    spec = plan.spec
    return tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=plan.base,
            overrides=plan.overrides,
            train_storage=plan.storage.tune_args(plan.name, "train"),
            metric=plan.space.metric,
            launcher=spec.launcher,
        ),
        trial_resources(plan.recipe, spec.launcher),
    )


def _experiment(store: Storage, *parts: str) -> dict[str, Any]:
    """``Tuner.restore``'s and ``Tuner.can_restore``'s location of the Tune experiment at ``parts`` under ``store``."""
    args = store.tune_args(*parts)
    return {"path": args["storage_path"], "storage_filesystem": args["storage_filesystem"]}


def _experiment_parts(plan: SweepPlan, directory: str) -> list[str]:
    """The storage path parts of the experiment whose local folder is ``directory`` (the sweep's, or its confirmation's)."""
    return [plan.name, *([os.path.relpath(directory, plan.sweep_dir)] if directory != plan.sweep_dir else [])]


def build_tuner(plan: SweepPlan, callbacks: list, restore: bool = False):
    """The Ray Tune ``Tuner`` of a plan (fresh, or restored from its directory)."""
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig

    spec = plan.spec
    trainable = sweep_trainable(plan)
    if restore:
        return tune.Tuner.restore(
            **_experiment(plan.storage, plan.name), trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False,
        )
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
        **plan.storage.tune_args(),
        callbacks=callbacks,
        verbose=0,
        log_to_file=True,
        checkpoint_config=CheckpointConfig(num_to_keep=1),
        # A crashed trial is retried; under Ray Train its TorchTrainer run goes on from its latest checkpoint.
        failure_config=FailureConfig(max_failures=spec.max_failures),
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


INTERRUPTED = "interrupted"


def _fit(tuner, sweep_dir: str) -> Optional[str]:
    """Run the Tuner with Tune's banners sent to the log; None when it ran to its end, else why it stopped:
    ``INTERRUPTED`` (Ctrl-C, SIGTERM, a Tune abort), or what said the disk is full."""
    from ray.tune.error import TuneError

    sink = open(os.path.join(sweep_dir, LOG_FILE), "a")
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), _sigterm_as_ctrl_c():
            tuner.fit()
    except (KeyboardInterrupt, TuneError) as err:
        return disk_full(err) or INTERRUPTED
    except Exception as err:  # noqa: BLE001 - a full disk stops the sweep like an interrupt; anything else is a bug
        full = disk_full(err)
        if full is None:
            raise
        return full
    finally:
        with contextlib.suppress(OSError):  # the log's last lines may not fit on a full disk
            sink.close()
    return None


def _stopped(stopped: Optional[str], tracker: MlflowTracking, monitor: SweepMonitor) -> dict[str, Any]:
    """After a stop: open MLflow runs KILLED, running trials back to pending (each as far as a full disk
    lets it); what the caller returns, with ``"disk_full"`` when that stopped it."""
    for close in (monitor.mark_interrupted, tracker.close_interrupted):
        try:
            close()
        except Exception as err:  # noqa: BLE001 - a full disk, a tracking store that does not answer: resume reopens the runs
            full = disk_full(err)
            if full is None:
                logger.warning("could not mark the sweep's open MLflow runs KILLED: %s", str(err).splitlines()[0][:300] if str(err) else type(err).__name__)
                continue
            stopped = stopped if stopped not in (None, INTERRUPTED) else full
    return {"interrupted": True, **({"disk_full": stopped} if stopped not in (None, INTERRUPTED) else {})}


def _heartbeat(sweep_dir: str, lease: dict[str, Any], period_s: float):
    """Renew ``lease`` every ``period_s`` from a daemon thread; the returned function stops it (a beat under
    way finishes first, so that releasing the lease afterwards is final)."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(period_s):
            try:
                if not renew_lease(sweep_dir, lease):
                    logger.warning("sweep %s: another driver took over this sweep's lease; this driver no longer holds it", sweep_dir)
                    return
            except OSError:  # a full disk: the next beat tries again
                pass

    thread = threading.Thread(target=renew, name="recipe-search-lease", daemon=True)
    thread.start()

    def end() -> None:
        stop.set()
        thread.join(timeout=5)

    return end


def _make_folder(sweep_dir: str) -> bool:
    """The sweep's folder, created here unless it exists; True when this driver created it (of two launched
    with the same name, only one does)."""
    os.makedirs(os.path.dirname(os.path.abspath(sweep_dir)), exist_ok=True)
    try:
        os.mkdir(sweep_dir)
        created = True
    except FileExistsError:
        created = False
    os.makedirs(os.path.join(sweep_dir, META_DIR), exist_ok=True)
    return created


@contextlib.contextmanager
def hold_lease(sweep_dir: str, period_s: float = 10.0, storage: Optional[Storage] = None, name: Optional[str] = None):
    """This driver's lease on the sweep while it runs (``runs/NAME/recipe-search/driver.json``): checked
    (another live driver: a one-line error), written, its heartbeat renewed every ``period_s`` by a
    daemon thread, removed at the end. A driver that dies leaves a lease that goes stale: at once on
    its own host (its process is gone), after ``LEASE_TIMEOUT_S`` elsewhere.

    On object storage (``storage`` remote) ``sweep_dir`` is the sweep's mirror: made here for a new
    sweep, pushed to the storage every few seconds while the driver runs, and at the end. A launch that
    fails before its first trial leaves nothing (locally or there): its name stays free."""
    remote = storage is not None and storage.remote
    if remote and not storage.is_file(name, SPEC_FILE):
        storage.new_mirror(name)  # a new sweep: whatever an earlier sweep of that name left in the cache goes
    check_no_driver(sweep_dir)
    # Files the sweep writes are writable by this user alone, whatever the umask: resume refuses to unpickle
    # from folders others can write (layout.check_private).
    umask = os.umask(0o022)
    os.umask(umask | 0o022)
    created = _make_folder(sweep_dir)
    sync = None
    if remote:
        mark_mirror(sweep_dir, storage, name)
        sync = MirrorSync(sweep_dir, storage, name).start()
    now = time.time()
    lease = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now}
    failed = True
    try:
        take_lease(sweep_dir, lease)
        if sync is not None:
            sync.push(logs=False)  # the lease in the storage at once, not 5 s later: other machines see this driver
        end_heartbeat = _heartbeat(sweep_dir, lease, period_s)
        try:
            yield
            failed = False
        finally:
            end_heartbeat()
            release_lease(sweep_dir, lease)
    finally:
        os.umask(umask)
        abandoned = created and (failed or not os.path.exists(os.path.join(sweep_dir, SPEC_FILE))) and not os.path.exists(os.path.join(sweep_dir, STATE_FILE))
        if sync is not None:
            if abandoned:
                sync.remove_all()
            elif not sync.stop():
                logger.warning("sweep %s: not all of its files reached storage %s; they are kept in %s", name, storage, sweep_dir)
        if abandoned:
            shutil.rmtree(sweep_dir, ignore_errors=True)


def repair_damaged(plan: SweepPlan, out=None) -> None:
    """Under the resume's lease: a damaged state or run map is kept as ``*.damaged``; the run map is rebuilt
    from the MLflow runs' tags now, the state from the trials Tune restores when it runs (``SweepMonitor``)."""
    out = out or sys.stdout
    for path in set_aside_damaged(plan.sweep_dir):
        directory = os.path.dirname(os.path.dirname(path))
        print(f"{path} was damaged: kept as {os.path.basename(path)}.damaged, rebuilt from Tune's experiment and MLflow", file=out)
        if path.endswith(os.path.basename(RUNS_FILE)):
            phase = "search" if directory == plan.sweep_dir else "confirm"
            if plan.spec.study:
                phase = "study"
            rebuild_run_map(directory, plan.tracking_uri, plan.name, phase, plan.space.metric)


def write_spec(plan: SweepPlan) -> None:
    """``sweep.json``: how the sweep was launched, what ``resume`` reads (the first file of a sweep)."""
    os.makedirs(os.path.join(plan.sweep_dir, META_DIR), exist_ok=True)
    path = os.path.join(plan.sweep_dir, SPEC_FILE)
    # The checkpoints model.init / model.pretrained resolved to (run:NAME follows that sweep's winner, which a
    # later confirmation of it can change): a resume trains from the same ones.
    resolved = {k: plan.overrides[k] for k in ("model.init", "model.pretrained") if k in plan.overrides}
    with open(path + ".tmp", "w") as f:
        json.dump({**plan.spec.to_json(), "storage": plan.storage.public, "name": plan.name, "tracking_uri": plan.tracking_uri, "format": SWEEP_FORMAT,
                   "resolved": resolved}, f, indent=1)
    os.replace(path + ".tmp", path)


def run_sweep(plan: SweepPlan, out=None, resume: bool = False) -> dict[str, Any]:
    """Start Ray (or join it), run the sweep to its end, and return its recorded state.

    With ``resume``, the sweep continues from its directory: finished trials stay
    finished, interrupted ones go on from their last checkpoint, the searcher's
    Optuna study is restored, and MLflow runs are reopened, not duplicated.
    If the driver is interrupted (Ctrl-C), the state is saved, open runs are
    marked KILLED and the returned state has ``"interrupted": true``.
    """
    out = out or sys.stdout
    if not resume:
        write_spec(plan)
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
    stopped = _fit(tuner, plan.sweep_dir)
    state = read_state(plan.sweep_dir) or {}
    if stopped or not state.get("finished"):
        how = _stopped(stopped, tracker, monitor)
        return {**(read_state(plan.sweep_dir) or {}), **how}
    best = state.get("best")
    if best:
        tracker.log_best(best, _winner_files(plan, best["trial_id"], best["recipe"]))
    _report(plan, out)
    return state


def _winner_files(plan: SweepPlan, trial_id: str, recipe: dict[str, Any]) -> dict[str, str]:
    """The winner's files to log to MLflow: its recipe (written as ``best_recipe.yaml``), and with
    ``--log-checkpoint`` its checkpoint file (a local copy when the sweep is on object storage)."""
    from trainables.checkpoints import local_checkpoint

    files = {"recipe": _write_best(plan, recipe)}
    checkpoint = trial_checkpoint(plan.sweep_dir, trial_id) if plan.spec.log_checkpoint else None
    if checkpoint:
        files["checkpoint"] = local_checkpoint(join(checkpoint, CHECKPOINT_FILE))
    return files


def _write_best(plan: SweepPlan, recipe: dict[str, Any]) -> str:
    path = os.path.join(plan.sweep_dir, BEST_RECIPE_FILE)
    with open(path, "w") as f:
        f.write(recipe_to_yaml(validate_recipe(recipe)))
    return path


def _replicate_callbacks(plan: SweepPlan, replicates: ConfirmationPlan, directory: str, out, resume: bool, phase: str,
                         parent_run_id: Optional[str]) -> tuple[MlflowTracking, SweepMonitor]:
    """A replicate experiment's Tune callbacks: its runs nested under ``parent_run_id`` (a new parent when
    None), named and tagged by the recipe they replicate and their seed; its own state in ``directory``."""
    recipes, entries = replicates.recipes(), {e["trial_id"]: e for e in replicates["recipes"]}
    base_of = _recipe_of(plan)

    def recipe_of(config: dict[str, Any]):
        return confirmation_recipe(recipes, config) if config else base_of({})

    def name_of(ordinal: int, config: dict[str, Any]) -> str:
        return f"{entries[config['confirms']]['name'].split()[0]} seed={config['runtime.seed']}" + (" (confirm)" if phase == "confirm" else "")

    def tags_of(config: dict[str, Any]) -> dict[str, str]:
        searched_run = entries[config["confirms"]].get("mlflow_run_id")
        return {TAG_CONFIRMS: config["confirms"], TAG_SEED: str(config["runtime.seed"]), **({"recipe_search.confirms_run": searched_run} if searched_run else {})}

    tracker = MlflowTracking(
        tracking_uri=plan.tracking_uri, sweep_name=plan.name, sweep_dir=directory, recipe_name=plan.space.recipe,
        sweep_params={"study": plan.spec.study, "seeds": json.dumps(replicates["seeds"]), "recipes": ",".join(recipes)},
        parent_files={"sweep.json": _read(os.path.join(plan.sweep_dir, SPEC_FILE))},
        recipe_of=recipe_of, metric=plan.space.metric, mode=plan.space.mode, searched=["confirms", "runtime.seed"],
        parent_tags=provenance_tags(_working_directory()), resumed=resume, phase=phase,
        parent_run_id=parent_run_id, name_of=name_of, tags_of=tags_of,
    )
    monitor = SweepMonitor(
        directory, plan.name if directory == plan.sweep_dir else f"{plan.name} {phase}", replicates.total, plan.space.metric,
        plan.space.mode, recipe_of=recipe_of, run_id_of=lambda trial_id: tracker.run_ids.get(trial_id), out=out, resumed=resume, ranks=False,
        describe=lambda config: entries[config["confirms"]]["name"] + (f" (trial {config['confirms']})" if phase == "confirm" else "") + f", seed {config['runtime.seed']}",
    )
    return tracker, monitor


def _replicate_tuner(plan: SweepPlan, replicates: ConfirmationPlan, directory: str, callbacks: list, restore: bool):
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig

    spec, recipes = plan.spec, replicates.recipes()
    trainable = tune.with_resources(
        tune.with_parameters(
            run_confirmation_trial, recipes=recipes, train_storage=plan.storage.tune_args(*_experiment_parts(plan, directory), "train"),
            metric=plan.space.metric, launcher=spec.launcher,
        ),
        ConfirmationResources(recipes, spec.launcher),
    )
    if restore:
        # A crashed run starts again (a recipe that fails ends TERMINATED with a failed report, not ERROR).
        tuner = tune.Tuner.restore(
            **_experiment(plan.storage, *_experiment_parts(plan, directory)), trainable=trainable, resume_unfinished=True, resume_errored=False,
            restart_errored=True,
        )
        tuner._local_tuner.get_run_config().callbacks = callbacks  # this driver's callbacks, not the pickled copies
        return tuner
    runtimes = [confirmation_recipe(recipes, {"confirms": t, "runtime.seed": 0}) for t in recipes]
    widest = max(runtimes, key=lambda r: r.runtime.workers * r.runtime.cpus_per_worker).runtime
    ray_train = any(uses_ray_train(r, spec.launcher) for r in runtimes)
    return tune.Tuner(
        trainable,
        param_space={"confirms": tune.grid_search(list(recipes)), "runtime.seed": tune.grid_search(replicates["seeds"])},
        tune_config=tune.TuneConfig(
            num_samples=1, max_concurrent_trials=_fit_concurrency(plan, widest, replicates.total), reuse_actors=not ray_train,
        ),
        run_config=tune.RunConfig(
            name=os.path.basename(directory), **plan.storage.tune_args(*_experiment_parts(plan, directory)[:-1]), callbacks=callbacks,
            verbose=0, log_to_file=True,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=spec.max_failures),
        ),
    )


def run_replicates(plan: SweepPlan, replicates: ConfirmationPlan, directory: str, phase: str, out, parent_run_id: Optional[str] = None):
    """Train each recipe of ``replicates`` on each of its seeds (full schedules, no early stopping) as the
    Tune experiment in ``directory``, or finish it; return the tracker, and how it stopped (empty: it finished;
    else ``{"interrupted": True}``, with ``"disk_full"`` when a full disk stopped it)."""
    from ray import tune

    restore = tune.Tuner.can_restore(**_experiment(plan.storage, *_experiment_parts(plan, directory)))
    os.makedirs(os.path.join(directory, META_DIR), exist_ok=True)
    _route_ray_logs(plan.sweep_dir)
    init_ray(plan.spec.address)
    tracker, monitor = _replicate_callbacks(plan, replicates, directory, out, restore or read_state(directory) is not None, phase, parent_run_id)
    names = ", ".join(e["name"].split()[0] for e in replicates["recipes"])
    seeds = ", ".join(map(str, replicates["seeds"]))
    label = {"confirm": "confirmation"}.get(phase, phase)
    print(f"\n{'resuming the ' if restore else ''}{label} of {plan.name}: {names} on seeds {seeds}: {replicates.total} runs of the full schedule", file=out)
    out.flush()
    stopped = _fit(_replicate_tuner(plan, replicates, directory, [tracker, monitor], restore), plan.sweep_dir)
    if stopped or not (read_state(directory) or {}).get("finished"):
        return tracker, _stopped(stopped, tracker, monitor)
    return tracker, {}


def run_confirmation(plan: SweepPlan, top: int, seeds: int, out=None) -> dict[str, Any]:
    """Train the ``top`` recipes of the finished search ``plan`` again on ``seeds`` fresh seeds each
    (``search.confirm``), or finish such a confirmation; return its summary (``"interrupted": true``
    when the driver was stopped: resume continues it with its finished seeds kept)."""
    out = out or sys.stdout
    searched = list(plan.space.params)
    confirmation = plan_confirmation(
        plan.sweep_dir, top, seeds, _recipe_of(plan), lambda ordinal, config: run_name(ordinal, config, [k for k in searched if k in config]),
    )
    parent = read_run_map(plan.sweep_dir).get("parent_run_id")
    tracker, stopped = run_replicates(plan, confirmation, confirm_dir(plan.sweep_dir), "confirm", out, parent_run_id=parent)
    if stopped:
        return stopped
    summary = confirmation_summary(plan.sweep_dir)
    # confirmation.json last: once it exists the confirmation is done, and resume has nothing left to redo.
    winner = next((r for r in summary["recipes"] if r["trial_id"] == summary["winner"]), None)
    files = _winner_files(plan, winner["trial_id"], winner["recipe"]) if winner else {}
    tracker.log_confirmed(summary, format_confirmation(summary), files)
    write_confirmation(plan.sweep_dir, summary)
    _report(plan, out)
    return summary


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
