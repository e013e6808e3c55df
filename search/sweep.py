"""Assemble and run a sweep: validate everything, start or join Ray, build the Tuner, fit.

``plan_sweep`` does every check that can fail on user input before anything is
started or written; ``run_sweep`` then joins Ray, fits the Tuner and returns
the sweep's recorded state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from spaces import (
    DataError,
    Recipe,
    Space,
    SweepError,
    check_keys,
    define_by_run,
    flatten,
    load_space,
    recipe_to_yaml,
    resolve_recipe,
)
from spaces.recipe import PRETRAINED
from spaces.space import DEFAULT_METRICS

__all__ = ["SweepSpec", "SweepPlan", "plan_sweep", "run_sweep", "init_ray", "SPEC_FILE", "BEST_RECIPE_FILE", "LOG_FILE"]

# The sweep's own files live in a subfolder: on resume, Tune copies the top-level .json
# files of the experiment folder to its staging folder and syncs them back over and over,
# which would overwrite these with the copies it took at restore time.
META_DIR = "recipe-search"
SPEC_FILE = f"{META_DIR}/sweep.json"
BEST_RECIPE_FILE = "best_recipe.yaml"
LOG_FILE = "ray.log"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
logger = logging.getLogger("recipe_search")


@dataclass
class SweepSpec:
    """Everything a sweep is launched with (the CLI's flags)."""

    space: str | Space = "rsb"
    name: Optional[str] = None
    recipe: Optional[str] = None  # base recipe; defaults to the space's
    overrides: dict[str, Any] = field(default_factory=dict)  # --set and resource flags, dotted keys
    trials: int = 12
    searcher: Optional[str] = "tpe"  # None: no searcher (a single ``train`` run)
    scheduler: str = "asha"
    grace_period: int = 3
    concurrency: Optional[int] = None
    storage: str = "runs"
    tracking_uri: Optional[str] = None
    address: Optional[str] = None
    seed: int = 0
    max_failures: int = 2
    launcher: str = "auto"  # "train": Ray Train even for one worker (see search.trial)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if isinstance(self.space, Space):
            data["space"] = self.space.model_dump(mode="json")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SweepSpec":
        data = dict(data)
        if isinstance(data.get("space"), dict):
            data["space"] = Space.model_validate(data["space"])
        return cls(**data)


@dataclass
class SweepPlan:
    """A validated sweep, ready to start."""

    spec: SweepSpec
    space: Space
    name: str
    sweep_dir: str
    storage_root: str
    base: dict[str, Any]
    overrides: dict[str, Any]
    recipe: Recipe  # the base recipe with overrides: resources, data, epochs
    max_epochs: int
    tracking_uri: str


def _check_storage(root: Path) -> None:
    probe = root
    while not probe.exists():
        probe = probe.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".recipe-search-probe-", dir=probe))  # permissions alone can lie (root, /proc)
    except OSError as err:
        raise SweepError(f"storage path {str(root)!r} cannot be written ({str(probe)!r}: {err.strerror})") from None


def _check_address(address: str) -> None:
    """Fail within seconds when a Ray address does not answer (``ray.init`` would retry for long)."""
    host_port = address.removeprefix("ray://")
    if address in ("auto", "local") or ":" not in host_port:
        return
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as err:
        raise SweepError(f"Ray address {address!r} does not answer: {err}") from None


def _check_no_local_ray() -> None:
    """Refuse to start a second local Ray: Train V2's state-API calls then cannot tell
    which instance is theirs, and trials after the first wait forever for workers."""
    import ray
    from ray._private.services import find_gcs_addresses  # what ray.init(address="auto") scans

    if ray.is_initialized():
        return
    running = sorted(find_gcs_addresses())
    if running:
        raise SweepError(
            f"a Ray instance is already running on this machine ({', '.join(running)}): "
            f"join it with --address {running[0]}, or stop it with 'ray stop'"
        )


def _max_epochs(space: Space, recipe: Recipe) -> int:
    """The most Tune iterations a trial can report: epochs, or evaluations of a detection schedule."""
    def widest(key: str, value: float) -> float:
        param = space.params.get(key)
        return max(param.edge_values()) if param is not None else value

    if recipe.schedule.iterations is not None:  # a step schedule: one Tune iteration per evaluation
        schedule = recipe.schedule
        iterations = widest("schedule.iterations", schedule.iterations) * widest("schedule.multiplier", schedule.multiplier)
        return math.ceil(round(iterations) / schedule.eval_period)
    return int(widest("schedule.epochs", recipe.schedule.epochs))


def _hyperrule_keys(recipe: Recipe) -> dict[str, Any]:
    from spaces.hyperrule import hyperrule, hyperrule_keys
    from trainables.data import dataset_stats

    examples, image_size = dataset_stats(recipe.data, recipe.runtime.seed)
    rule = hyperrule(examples, image_size, recipe.optim.batch_size)
    return hyperrule_keys(rule, resolution=recipe.schedule.hyperrule == "full")


def _checked_data(recipe: Recipe) -> Optional[str]:
    """The dataset root as an absolute path (workers on other nodes need it there too), None if embedded."""
    from trainables.data import EMBEDDED_DATASETS

    if recipe.data.name in EMBEDDED_DATASETS or recipe.data.name == "digits-det":
        return None
    try:
        if recipe.task == "detection":
            from trainables.coco import coco_layout

            coco_layout(recipe.data.name)
        else:
            from trainables.data import check_image_folder

            check_image_folder(recipe.data.name)
    except DataError as err:
        raise DataError(f"{err} (set with --data or --set data.name=...)") from None
    return os.path.abspath(recipe.data.name)


RUN_PREFIX = "run:"


def resolve_run(reference: str, storage: str) -> str:
    """``run:NAME``: the best checkpoint of sweep (or ``train`` run) NAME under ``storage``, or a path to one."""
    from search.results import best_checkpoint, find_sweep

    return best_checkpoint(find_sweep(reference[len(RUN_PREFIX):], storage))


def _checked_checkpoints(space: Space, recipe: Recipe, storage: str) -> dict[str, str]:
    """model.init / model.pretrained as absolute checkpoint paths (``run:NAME`` resolved); init=pretrained needs model.pretrained."""
    fixed: dict[str, str] = {}
    for key in ("model.init", "model.pretrained"):
        _, field_name = key.split(".")
        value = getattr(recipe.model, field_name)
        if isinstance(value, str) and value.startswith(RUN_PREFIX):
            fixed[key] = resolve_run(value, storage)
            setattr(recipe.model, field_name, fixed[key])
    inits = {recipe.model.init}
    if "model.init" in space.params:
        inits |= set(space.params["model.init"].edge_values())
    from search.upstream import needs_upstream

    if PRETRAINED in inits and not recipe.model.pretrained and not needs_upstream(space, recipe):
        raise SweepError(
            "model.init=pretrained needs a checkpoint: --set model.pretrained=PATH "
            "(a ResNet .pt/.pth/.safetensors file, or a run's checkpoint directory)"
        )
    paths = {"model.pretrained": recipe.model.pretrained} if recipe.model.pretrained else {}
    if recipe.model.init not in ("scratch", PRETRAINED):
        paths["model.init"] = recipe.model.init
    for key, path in paths.items():
        if key in fixed:
            continue
        if not os.path.exists(path):
            raise SweepError(f"{key}: checkpoint {path!r} does not exist")
        fixed[key] = os.path.abspath(path)
    return fixed


def plan_sweep(spec: SweepSpec, resume: bool = False) -> SweepPlan:
    """Validate a sweep without side effects; raise a ``RecipeSearchError`` naming what is wrong.

    With ``resume``, the sweep must exist already (see ``load_sweep_spec``).
    """
    from search.algorithms import check_names
    from search.tracking import check_tracking_uri, resolve_tracking_uri
    if spec.trials < 1:
        raise SweepError(f"--trials must be at least 1, but got {spec.trials}")
    if spec.concurrency is not None and spec.concurrency < 1:
        raise SweepError(f"--concurrency must be at least 1, but got {spec.concurrency}")
    from search.trial import LAUNCHERS

    if spec.launcher not in LAUNCHERS:
        raise SweepError(f"unknown launcher {spec.launcher!r}; available: {', '.join(LAUNCHERS)}")
    if spec.grace_period < 1:
        raise SweepError(f"grace period must be at least 1 epoch, but got {spec.grace_period}")
    if spec.searcher is not None:
        check_names(spec.searcher, spec.scheduler)
    else:
        check_names("tpe", spec.scheduler)
    space = spec.space if isinstance(spec.space, Space) else load_space(spec.space)
    if spec.searcher == "grid":
        from search.algorithms import grid_points

        spec = replace(spec, trials=grid_points(space))  # every point once
    if spec.recipe:
        space = space.model_copy(update={"recipe": spec.recipe})
    check_keys(spec.overrides)
    clash = sorted(set(spec.overrides) & set(space.params))
    if clash:
        # Overrides win over sampled values: the searched dimension would be dead.
        raise SweepError(f"--set {clash[0]} fixes a key that space {space.name!r} searches; drop one of them")
    base = space.base_recipe()
    recipe = space.check(spec.overrides)
    if space.metric is None:
        space = space.model_copy(update={"metric": DEFAULT_METRICS[recipe.task]})
    data_root = _checked_data(recipe)
    if recipe.schedule.hyperrule:
        # Under the user's --set, over the preset: the sampled keys then move around the rule's values.
        derived = {k: v for k, v in _hyperrule_keys(recipe).items() if k not in spec.overrides}
        base = {**base, **derived}
        recipe = space.check(spec.overrides, base=base)
    if data_root:
        # Workers may run on other nodes: they need the same path there (shared storage).
        recipe.data.name = data_root
    checkpoints = _checked_checkpoints(space, recipe, spec.storage)
    name = spec.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not _NAME.match(name):
        raise SweepError(f"--name must be letters, digits, '.', '_' or '-' (at most 128), but got {name!r}")
    storage_root = Path(spec.storage).expanduser().absolute()
    _check_storage(storage_root)
    sweep_dir = storage_root / name
    if (sweep_dir / SPEC_FILE).exists() and not resume:
        raise SweepError(f"sweep {name!r} already exists in {str(storage_root)!r}: resume it (recipe-search resume {name}) or pick another --name")
    tracking_uri = resolve_tracking_uri(spec.tracking_uri)
    check_tracking_uri(tracking_uri)
    address = spec.address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_address(address)
    else:
        _check_no_local_ray()
    overrides = {**spec.overrides, **checkpoints}
    if data_root:
        overrides["data.name"] = data_root
    return SweepPlan(
        spec=spec,
        space=space,
        name=name,
        sweep_dir=str(sweep_dir),
        storage_root=str(storage_root),
        base=base,
        overrides=overrides,
        recipe=recipe,
        max_epochs=_max_epochs(space, recipe),
        tracking_uri=tracking_uri,
    )


def load_sweep_spec(sweep_dir: str, tracking_uri: Optional[str] = None) -> SweepSpec:
    """The spec a sweep was launched with, to resume it (``tracking_uri`` overrides the saved one)."""
    try:
        with open(os.path.join(sweep_dir, SPEC_FILE)) as f:
            data = json.load(f)
        data["storage"] = os.path.dirname(os.path.abspath(sweep_dir))
        data["name"] = os.path.basename(os.path.abspath(sweep_dir))
        if tracking_uri:
            data["tracking_uri"] = tracking_uri
        return SweepSpec.from_json(data)
    except (OSError, ValueError, TypeError) as err:
        raise SweepError(f"cannot read {SPEC_FILE} of sweep {sweep_dir!r}: {err}") from None


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

    from search.algorithms import build_scheduler, build_searcher
    from search.trial import run_trial, trial_resources, uses_ray_train

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
            points_to_evaluate=points,
        )
    tune_config = tune.TuneConfig(
        metric=plan.space.metric,
        mode=plan.space.mode,
        search_alg=searcher,
        scheduler=build_scheduler(spec.scheduler, plan.max_epochs, spec.grace_period),
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


def run_sweep(plan: SweepPlan, out=None, resume: bool = False) -> dict[str, Any]:
    """Start Ray (or join it), run the sweep to its end, and return its recorded state.

    With ``resume``, the sweep continues from its directory: finished trials stay
    finished, interrupted ones go on from their last checkpoint, the searcher's
    Optuna study is restored, and MLflow runs are reopened, not duplicated.
    If the driver is interrupted (Ctrl-C), the state is saved, open runs are
    marked KILLED and the returned state has ``"interrupted": true``.
    """
    import sys

    from ray.tune.error import TuneError

    from search.monitor import SweepMonitor, read_state
    from search.tracking import MlflowTracking
    from search.upstream import needs_upstream, upstream_checkpoint

    out = out or sys.stdout
    if needs_upstream(plan.space, plan.recipe):
        checkpoint = upstream_checkpoint(plan.recipe, plan.storage_root, plan.tracking_uri, plan.spec.address, out)
        plan.overrides["model.pretrained"] = checkpoint
        plan.recipe.model.pretrained = checkpoint
    os.makedirs(plan.sweep_dir, exist_ok=True)
    if not resume:
        os.makedirs(os.path.join(plan.sweep_dir, META_DIR), exist_ok=True)
        with open(os.path.join(plan.sweep_dir, SPEC_FILE), "w") as f:
            json.dump({**plan.spec.to_json(), "name": plan.name, "tracking_uri": plan.tracking_uri}, f, indent=1)
    _route_ray_logs(plan.sweep_dir)
    init_ray(plan.spec.address)
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
        resumed=resume,
    )
    monitor = SweepMonitor(
        plan.sweep_dir,
        plan.name,
        plan.spec.trials,
        plan.space.metric,
        plan.space.mode,
        recipe_of=recipe_of,
        run_id_of=lambda trial_id: tracker.run_ids.get(trial_id),
        out=out,
        resumed=resume,
        baseline_config=_baseline_config(plan),
    )
    verb = "resuming" if resume else "sweep"
    print(f"{verb} {plan.name}: {plan.spec.trials} trial(s) of space {plan.space.name!r} on recipe {plan.space.recipe!r}", file=out)
    print(f"  directory {plan.sweep_dir} (Ray logs: {os.path.join(plan.sweep_dir, LOG_FILE)})", file=out, flush=True)
    tuner = build_tuner(plan, [tracker, monitor], restore=resume)
    if resume:
        # Tune restores the run config it pickled; this driver's callbacks replace its stale copies.
        tuner._local_tuner.get_run_config().callbacks = [tracker, monitor]
    interrupted = False
    # Tune prints its banners whatever the verbosity: they go to the log with the rest.
    with open(os.path.join(plan.sweep_dir, LOG_FILE), "a") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            tuner.fit()
        except (KeyboardInterrupt, TuneError):
            interrupted = True
    state = read_state(plan.sweep_dir) or {}
    if interrupted or not state.get("finished"):
        tracker.close_interrupted()
        monitor.mark_interrupted()
        state = {**(read_state(plan.sweep_dir) or {}), "interrupted": True}
        return state
    best = state.get("best")
    if best:
        recipe = Recipe.model_validate(best["recipe"])
        best_path = os.path.join(plan.sweep_dir, BEST_RECIPE_FILE)
        with open(best_path, "w") as f:
            f.write(recipe_to_yaml(recipe))
        tracker.log_best(best["value"], best_path)
    return state
