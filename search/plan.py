"""Plan a sweep: every check that can fail on user input, before anything starts or is written.

``plan_sweep`` turns a ``SweepSpec`` (the CLI's flags) into a ``SweepPlan``: the
space, the base recipe with its overrides, data and checkpoints resolved to
absolute paths, the sweep's directory and tracking URI.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from spaces import DataError, Recipe, Space, SweepError, check_keys, load_space
from spaces.hyperrule import hyperrule, hyperrule_keys
from spaces.recipe import PRETRAINED, norm_family
from spaces.errors import short
from spaces.space import DEFAULT_METRICS
from trainables.report import Unit

from search.algorithms import check_names, grid_points
from search.confirm import check_request
from search.layout import (
    CONFIRM_DIR, OPTUNA_FILE, RUN_PREFIX, SPEC_FILE, SWEEP_FORMAT, DamagedFile, check_no_driver, check_private, read_run_map, read_state,
    resolve_run, sweep_storage,
)
from search.storage import Storage, is_uri, split_uri
from search.tracking import check_tracking_uri, database_url, resolve_tracking_uri, short_uri
from search.trial import LAUNCHERS

__all__ = ["SweepSpec", "SweepPlan", "plan_sweep", "load_sweep_spec", "needs_upstream", "UPSTREAM_RECIPE"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# The classification recipe whose run becomes the pretrained backbone of a detection sweep on digits-det.
UPSTREAM_RECIPE = "digits-backbone"
MAX_TRIALS = 100_000  # Tune keeps every trial in its experiment state, and the driver its record


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
    log_checkpoint: bool = True  # the winner's final checkpoint as an MLflow artifact (best/)
    optuna_storage: Optional[str] = None  # the searcher's study: an RDB URL [default: sqlite in the sweep's folder]
    confirm: int = 0  # after the search, train the best `confirm` recipes again on `confirm_seeds` fresh seeds
    confirm_seeds: int = 3  # also the seeds of each recipe of a study of seeds
    study: Optional[str] = None  # "rsb": a study of seeds over fixed recipes (search.study), not a search
    study_epochs: int = 20  # rsb: A3's epochs on the embedded data; A2 runs 3x, A1 6x

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
    sweep_dir: str  # its local folder: the sweep's own on a path, its mirror on object storage (search.storage)
    storage_root: str  # --storage: an absolute path, or a URI
    base: dict[str, Any]
    overrides: dict[str, Any]
    recipe: Recipe  # the base recipe with overrides: resources, data, epochs
    max_epochs: int
    tracking_uri: str
    grace_period: int = 1  # the scheduler's: the requested one, raised past the longest warmup (fair_grace)
    grace_note: str = ""  # why it is not the requested one

    @property
    def storage(self) -> Storage:
        """The storage root, opened (``pyarrow.fs``)."""
        return Storage.open(self.storage_root)


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
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a TLS cluster: the handshake below would need its certificates
    import grpc  # Ray's GCS and its client server speak gRPC: a port that takes TCP but not HTTP/2 is something else

    channel = grpc.insecure_channel(f"{host or '127.0.0.1'}:{port}", options=[("grpc.enable_http_proxy", 0)])  # as Ray connects
    try:
        grpc.channel_ready_future(channel).result(timeout=5)
        if not address.startswith("ray://"):
            _check_token(address, channel)
    except grpc.FutureTimeoutError:
        raise SweepError(f"Ray address {address!r} takes connections but is not Ray (no gRPC answer in 5 s)") from None
    finally:
        channel.close()


def _ray_token() -> tuple[Optional[str], str]:
    """The token this driver would send to a cluster with token authentication, as Ray documents it (sent only
    with ``RAY_AUTH_MODE=token``): ``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``;
    and where it came from."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None, "RAY_AUTH_MODE is not 'token'"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    path = os.path.expanduser(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token")
    try:
        with open(path) as f:
            return f.read().strip(), path
    except OSError:
        return None, f"no token in $RAY_AUTH_TOKEN or {path}"


def _check_token(address: str, channel) -> None:
    """One call to the GCS that token authentication guards: a cluster that refuses this driver's token (or
    its lack of one) fails here in one line, not after ``ray.init``'s 20 s of retries."""
    import grpc

    token, source = _ray_token()
    call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")  # an empty request: raw bytes, no stubs
    try:
        call(b"", timeout=5, metadata=[("authorization", f"Bearer {token}")] if token else None)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.UNAUTHENTICATED:
            return  # anything else is ray.init's to report
        what = f"refused the token from {source}" if token else f"needs a token ({source})"
        raise SweepError(
            f"the Ray cluster at {address!r} uses token authentication and {what}: set RAY_AUTH_MODE=token and the cluster's "
            "token in RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token); 'ray get-auth-token' on the head prints it"
        ) from None


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
    if recipe.schedule.iterations is not None:  # a step schedule: one Tune iteration per evaluation
        schedule = recipe.schedule
        iterations = _widest(space, "schedule.iterations", schedule.iterations) * _widest(space, "schedule.multiplier", schedule.multiplier)
        return math.ceil(round(iterations) / schedule.eval_period)
    return int(_widest(space, "schedule.epochs", recipe.schedule.epochs))


def _widest(space: Space, key: str, value: Any) -> Any:
    """The largest value ``key`` takes in the space (its base value when not searched; a null choice counts as it)."""
    param = space.params.get(key)
    if param is None:
        return value
    return max(value if v is None else v for v in param.edge_values(value))


def fair_grace(space: Space, recipe: Recipe, requested: int, max_t: int) -> tuple[int, str]:
    """The scheduler's grace period: at least one report after the longest warmup the space can
    sample, so that no trial is judged during (or at the very end of) its warmup against trials
    that trained at full LR; and at most ``max_t``. With why, when it is not the requested one."""
    schedule = recipe.schedule
    if schedule.iterations is not None:  # reports every eval_period updates
        warmup = _widest(space, "schedule.warmup_iters", schedule.warmup_iters or 0)
        if recipe.task == "classification":  # the HyperRule's multiplier stretches warmup too (step_schedule)
            warmup = round(warmup * _widest(space, "schedule.multiplier", schedule.multiplier or 1.0))
        unit, least = Unit.ITERATION, warmup // schedule.eval_period + 1
    else:
        warmup = _widest(space, "schedule.warmup_epochs", schedule.warmup_epochs)
        unit, least = Unit.EPOCH, int(warmup) + 1
    if requested >= least:
        grace, why = requested, ""
    else:
        grace = least
        why = f"raised from {requested}: the space samples warmups up to {warmup} {unit.value}s, and a trial is judged only after a report at full LR"
    if grace >= max_t:
        return max_t, (why + "; " if why else "") + f"no trial can be cut before its last report ({max_t}): no early stopping"
    return grace, why


def _hyperrule_keys(recipe: Recipe) -> dict[str, Any]:
    from trainables.data import dataset_stats  # torch: imported when a recipe derives the rule

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


def _check_model_and_data(recipe: Recipe) -> None:
    """What a trial would only find when it starts: a timm model that does not exist, classes or shots the
    data does not have, a single class, a batch larger than the training set."""
    if recipe.task != "classification":
        return
    import timm

    importlib.import_module("trainables.bit")  # registers this project's resnetv2_bit_tiny with timm, as a trial's import does

    if not timm.is_model(recipe.model.name):
        close = timm.list_models(f"*{recipe.model.name.split('_')[0][:12]}*")[:5]
        raise SweepError(f"model.name {short(recipe.model.name)}: timm has no such model" + (f" (similar: {', '.join(close)})" if close else ""))
    from trainables.data import check_training_set

    runtime = recipe.runtime
    check_training_set(recipe.data, runtime.seed, recipe.optim.batch_size, runtime.workers, recipe.schedule.iterations is None)


def needs_upstream(space: Space, recipe: Recipe) -> bool:
    """Whether a detection sweep may load ``model.pretrained`` on digits-det and none is given:
    then an upstream classification run on digits provides it (``search.upstream``)."""
    inits = {recipe.model.init}
    if "model.init" in space.params:
        inits |= set(space.params["model.init"].edge_values())
    return recipe.task == "detection" and recipe.data.name == "digits-det" and PRETRAINED in inits and not recipe.model.pretrained


def _checked_checkpoints(space: Space, recipe: Recipe, storage: str, given: Any = None) -> dict[str, Any]:
    """model.init / model.pretrained as absolute checkpoint paths (``run:NAME`` resolved); init=pretrained needs
    model.pretrained. ``given``: the overrides' model.pretrained; a map of norms to checkpoints stays a map
    (the recipe holds the base norm's), each path checked."""
    fixed: dict[str, Any] = {}
    for key in ("model.init", "model.pretrained"):
        _, field_name = key.split(".")
        value = getattr(recipe.model, field_name)
        if isinstance(value, str) and value.startswith(RUN_PREFIX):
            fixed[key] = resolve_run(value, storage)
            setattr(recipe.model, field_name, fixed[key])
    if isinstance(given, dict):
        by_norm = {}
        for norm, path in given.items():
            path = resolve_run(path, storage) if isinstance(path, str) and path.startswith(RUN_PREFIX) else path
            if not is_uri(path) and not os.path.exists(path):
                raise SweepError(f"model.pretrained of norm {norm}: checkpoint {path!r} does not exist")
            _check_checkpoint_file(f"model.pretrained of norm {norm}", path)
            by_norm[norm] = path if is_uri(path) else os.path.abspath(path)
        fixed["model.pretrained"] = by_norm
        recipe.model.pretrained = by_norm[norm_family(recipe.model.norm)]
    inits = {recipe.model.init}
    if "model.init" in space.params:
        inits |= set(space.params["model.init"].edge_values())
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
        if not is_uri(path) and not os.path.exists(path):
            raise SweepError(f"{key}: checkpoint {path!r} does not exist")
        _check_checkpoint_file(key, path)
        fixed[key] = path if is_uri(path) else os.path.abspath(path)
    return fixed


def _check_checkpoint_file(key: str, path: str) -> None:
    """The first bytes of a checkpoint (a path, or a URI on object storage): a torch file (zip or pickle),
    safetensors, or BiT's .npz (zip); a run's checkpoint directory holds one. Anything else (a text file,
    an image, nothing) fails before Ray starts."""
    from trainables.report import CHECKPOINT_FILE

    root, base = split_uri(path) if is_uri(path) else (os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path)))
    store = Storage.open(root or "/")
    file = [base, CHECKPOINT_FILE] if store.is_dir(base) else [base]
    try:
        with store.fs.open_input_stream(store.fs_path(*file)) as f:
            head = f.read(16)
    except OSError as err:
        raise SweepError(f"{key}: {short_uri(path)} is not a checkpoint ({str(err).splitlines()[0][:120]})") from None
    safetensors = len(head) > 8 and head[8:9] == b"{"
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or safetensors):
        raise SweepError(f"{key}: {short_uri(path)} is not a checkpoint (not a PyTorch, safetensors or .npz file, nor a run's checkpoint directory)")


def _check_flags(spec: SweepSpec) -> None:
    if not 1 <= spec.trials <= MAX_TRIALS:
        raise SweepError(f"--trials must be 1 to {MAX_TRIALS}, but got {spec.trials}")
    if spec.seed < 0:
        raise SweepError(f"--seed (the searcher's) must be >= 0, but got {spec.seed}")
    if spec.name is not None and not spec.name:
        raise SweepError("--name must not be empty (leave it out for SPACE-TIME)")
    for flag, value, default in (
        ("--storage", spec.storage, "runs"), ("--tracking-uri", spec.tracking_uri, "$MLFLOW_TRACKING_URI or sqlite:///mlflow.db"),
        ("--address", spec.address, "$RAY_ADDRESS or a local Ray"), ("--optuna-storage", spec.optuna_storage, "sqlite in the sweep's folder"),
    ):
        if value is not None and not value.strip():
            raise SweepError(f"{flag} must not be empty (leave it out for {default})")
    if spec.concurrency is not None and spec.concurrency < 1:
        raise SweepError(f"--concurrency must be at least 1, but got {spec.concurrency}")
    if spec.launcher not in LAUNCHERS:
        raise SweepError(f"unknown launcher {spec.launcher!r}; available: {', '.join(LAUNCHERS)}")
    if spec.grace_period < 1:
        raise SweepError(f"grace period must be at least 1 epoch, but got {spec.grace_period}")
    check_names(spec.searcher or "tpe", spec.scheduler)
    if spec.confirm:
        check_request(spec.confirm, spec.confirm_seeds)


def _space_of(spec: SweepSpec) -> tuple[SweepSpec, Space]:
    """The space to search (another base recipe with ``--recipe``); a grid's trials are its points."""
    space = spec.space if isinstance(spec.space, Space) else load_space(spec.space)
    if spec.searcher == "grid":
        spec = replace(spec, trials=grid_points(space))  # every point once
    if spec.recipe:
        space = space.model_copy(update={"recipe": spec.recipe})
    check_keys(spec.overrides)  # any task's key; space.check names the task of the recipe
    clash = sorted(set(spec.overrides) & set(space.params))
    if clash:
        # Overrides win over sampled values: the searched dimension would be dead.
        raise SweepError(f"--set {clash[0]} fixes a key that space {space.name!r} searches; drop one of them")
    return spec, space


def _sweep_dir(spec: SweepSpec, space: Space, resume: bool) -> tuple[str, Storage, str]:
    """The sweep's name, its (writable) storage root and its local folder; a new sweep may not take an
    existing name. On object storage the local folder is the sweep's mirror (pulled by ``find_sweep``
    for a resume, made by the launch for a new sweep)."""
    name = spec.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not _NAME.match(name):
        raise SweepError(f"--name must be letters, digits, '.', '_' or '-' (at most 128), but got {name!r}")
    store = Storage.open(spec.storage)
    if store.remote:
        store.check_writable()
    else:
        _check_storage(Path(store.path))
    if store.is_file(name, SPEC_FILE) and not resume:
        raise SweepError(f"sweep {name!r} already exists in {str(store)!r}: resume it (recipe-search resume {name}) or pick another --name")
    return name, store, store.mirror(name) if store.remote else store.fs_path(name)


def _optuna_storage(spec: SweepSpec, sweep_dir: Path, name: str, resume: bool) -> Optional[str]:
    """The RDB URL of the searcher's Optuna study (study name = sweep name); a new sweep may not reuse a study."""
    if spec.searcher is None:
        return None
    url = database_url(spec.optuna_storage or f"sqlite:///{sweep_dir / OPTUNA_FILE}")
    if not url.startswith(("sqlite:///", "postgresql", "mysql")):
        raise SweepError(f"--optuna-storage takes an RDB URL (sqlite:///PATH, postgresql://..., mysql://...), but got {short_uri(url)}")
    if spec.optuna_storage and not resume:
        import optuna

        try:
            names = optuna.study.get_all_study_names(storage=url)
        except Exception as err:  # noqa: BLE001 - any driver or connection error is the user's input
            raise SweepError(f"--optuna-storage {short_uri(url)} cannot be opened: {str(err).splitlines()[0][:200]}") from None
        if name in names:
            raise SweepError(f"--optuna-storage {short_uri(url)} already holds a study {name!r}: pick another --name")
    return url


def _check_services(spec: SweepSpec) -> str:
    """The tracking URI, answering; the Ray cluster to join answering, or no local Ray running yet."""
    tracking_uri = resolve_tracking_uri(spec.tracking_uri)
    check_tracking_uri(tracking_uri)
    address = spec.address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_address(address)
    else:
        _check_no_local_ray()
    return tracking_uri


def _check_local_resources(address: Optional[str], recipe: Recipe) -> None:
    """A local Ray gets this machine's CPUs and GPUs: a trial that needs more could never start."""
    if address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster's resources are checked when the driver has joined it
    runtime = recipe.runtime
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    need = runtime.workers * runtime.cpus_per_worker
    if need > cpus:
        raise SweepError(
            f"a trial needs {runtime.workers} worker(s) x {runtime.cpus_per_worker:g} CPU = {need:g} CPU, but this machine has {cpus} "
            "(lower --workers / --cpus-per-worker, or join a cluster with --address)"
        )
    if runtime.gpus_per_worker:
        import torch

        gpus = torch.cuda.device_count()
        if runtime.workers * runtime.gpus_per_worker > gpus:
            raise SweepError(f"a trial needs {runtime.workers} worker(s) x {runtime.gpus_per_worker:g} GPU, but this machine has {gpus} GPU")


def plan_sweep(spec: SweepSpec, resume: bool = False) -> SweepPlan:
    """Validate a sweep without side effects; raise a ``RecipeSearchError`` naming what is wrong.

    With ``resume``, the sweep must exist already (see ``load_sweep_spec``).
    """
    _check_flags(spec)
    spec, space = _space_of(spec)
    if spec.confirm > spec.trials:  # after a grid set the trials to its points
        raise SweepError(f"--confirm {spec.confirm} asks for more recipes than the sweep's {spec.trials} trial(s)")
    base = space.base_recipe()
    recipe = space.check(spec.overrides)
    _check_repeats(space, recipe)
    if space.metric is None:
        space = space.model_copy(update={"metric": DEFAULT_METRICS[recipe.task]})
    data_root = _checked_data(recipe)
    _check_model_and_data(recipe)
    if getattr(recipe.schedule, "hyperrule", None):
        # Under the user's --set, over the preset: the sampled keys then move around the rule's values.
        derived = {k: v for k, v in _hyperrule_keys(recipe).items() if k not in spec.overrides}
        base = {**base, **derived}
        recipe = space.check(spec.overrides, base=base)
    overrides = dict(spec.overrides)
    if data_root:
        # Workers may run on other nodes: they need the same path there (shared storage).
        recipe.data.name = overrides["data.name"] = data_root
    overrides.update(_checked_checkpoints(space, recipe, spec.storage, spec.overrides.get("model.pretrained")))
    name, store, sweep_dir = _sweep_dir(spec, space, resume)
    if resume:
        _check_resumable(Path(sweep_dir))
    spec = replace(spec, optuna_storage=_optuna_storage(spec, Path(sweep_dir), name, resume))
    _check_local_resources(spec.address, recipe)
    tracking_uri = _check_services(spec)
    max_epochs = _max_epochs(space, recipe)
    grace, note = fair_grace(space, recipe, spec.grace_period, max_epochs)
    return SweepPlan(
        spec=spec, space=space, name=name, sweep_dir=sweep_dir, storage_root=store.location,
        base=base, overrides=overrides, recipe=recipe, max_epochs=max_epochs, tracking_uri=tracking_uri,
        grace_period=grace, grace_note=note,
    )


def _check_resumable(sweep_dir: Path) -> None:
    """Before Ray starts: no other driver running it, the sweep's own format, and its state and run map
    readable, its pickles in folders no one else can write (one-line errors)."""
    check_no_driver(str(sweep_dir))
    check_private(str(sweep_dir))
    for directory in (sweep_dir, sweep_dir / CONFIRM_DIR):
        for reader in (read_state, read_run_map):
            with contextlib.suppress(DamagedFile):  # rebuilt by the resumed driver (sweep.repair_damaged)
                reader(str(directory))
    try:
        written = json.loads((sweep_dir / SPEC_FILE).read_text()).get("format", 1)
    except (OSError, ValueError, AttributeError):
        return  # load_sweep_spec says what is wrong with the file
    if written != SWEEP_FORMAT:
        raise SweepError(
            f"sweep {str(sweep_dir)!r} was written by another version of recipe-search (sweep format {written}, this one "
            f"reads {SWEEP_FORMAT}): status, best and report read it, but resume it with the version that started it"
        )


def _check_repeats(space: Space, recipe: Recipe) -> None:
    """Repeated augmentation needs several workers (timm refuses it on one): checked at launch, so
    that recipes stored by sweeps that ran it on one worker still load."""
    if recipe.task != "classification":
        return
    repeats = _widest(space, "data.repeated_aug", recipe.data.repeated_aug)
    workers = min(space.params["runtime.workers"].edge_values(recipe.runtime.workers)) if "runtime.workers" in space.params else recipe.runtime.workers
    if repeats and workers < 2:
        raise SweepError(f"data.repeated_aug={repeats} needs runtime.workers >= 2 (an image's repeats go to different workers), but a trial may run {workers}: use data.repeated_aug=0")


def load_sweep_spec(sweep_dir: str, tracking_uri: Optional[str] = None) -> SweepSpec:
    """The spec a sweep was launched with, to resume it (``tracking_uri`` overrides the saved one)."""
    try:
        with open(os.path.join(sweep_dir, SPEC_FILE)) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object but {type(data).__name__}: a crash or a full disk can leave it so")
        data.pop("format", None)  # checked by plan_sweep(resume=True)
        data["overrides"] = {**data.get("overrides", {}), **data.pop("resolved", {})}  # the checkpoints it started from
        store, data["name"] = sweep_storage(sweep_dir)
        data["storage"] = store.location
        optuna_url = data.get("optuna_storage") or ""
        if optuna_url.startswith("sqlite:///") and optuna_url.endswith(f"/{data['name']}/{OPTUNA_FILE}"):
            # The default study, in the sweep's folder: where that folder is now (moved, or a mirror on another machine).
            data["optuna_storage"] = f"sqlite:///{os.path.join(os.path.abspath(sweep_dir), OPTUNA_FILE)}"
        if tracking_uri:
            data["tracking_uri"] = tracking_uri
        return SweepSpec.from_json(data)
    except (OSError, ValueError, TypeError) as err:
        raise SweepError(f"cannot read {SPEC_FILE} of sweep {short(sweep_dir)}: {str(err)[:300]}") from None


