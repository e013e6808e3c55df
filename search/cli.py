"""``recipe-search``: a thin CLI over the library. It parses and prints; errors become one line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any, Optional

import typer
import yaml

from spaces import (
    RECIPE_PRESETS,
    RecipeSearchError,
    Space,
    SPACES_DIR,
    load_recipe,
    load_space,
    parse_overrides,
    recipe_names,
    recipe_to_yaml,
    resolve_recipe,
    space_names,
    validate_recipe,
)
from spaces.errors import short
from spaces.recipe import check_applies

app = typer.Typer(
    name="recipe-search",
    help="Search training recipes of vision models with Ray Train, Ray Tune + Optuna, and MLflow.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)

EXIT_USAGE = 2


def _fail(message: str) -> None:
    typer.echo(f"error: {_one_line(message, MAX_ERROR_LINE)}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _overrides(sets: list[str], data: Optional[str], **runtime: Any) -> dict[str, Any]:
    overrides = parse_overrides(sets or [])
    if data is not None and not data.strip():
        _fail("--data must not be empty (leave it out for the recipe's data)")
    if data:
        overrides["data.name"] = data
    for key, value in runtime.items():
        if value is not None:
            overrides[f"runtime.{key}"] = value
    return overrides


SetOption = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="override a recipe key, e.g. optim.lr=0.01 (repeatable)")
DataOption = typer.Option(None, "--data", help="'digits' or an ImageFolder root with train/ and val/")
StorageOption = typer.Option("runs", "--storage", help="root folder of sweeps (a shared path on a cluster)")
TrackingOption = typer.Option(None, "--tracking-uri", help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db]")
AddressOption = typer.Option(None, "--address", help="Ray cluster to join [default: $RAY_ADDRESS or a local Ray]")
WorkersOption = typer.Option(None, "--workers", help="Ray Train workers per trial (DDP when > 1)")
CpusOption = typer.Option(None, "--cpus-per-worker")
GpusOption = typer.Option(None, "--gpus-per-worker")
LogCheckpointOption = typer.Option(
    True, "--log-checkpoint/--no-log-checkpoint",
    help="log the winner's final checkpoint to MLflow under best/ (model + optimizer state: ~3x the weights)",
)


EXIT_INTERRUPTED = 130
EXIT_ALL_FAILED = 1  # the sweep ran, and no trial produced a result


def _launch(spec, resume: bool = False) -> None:
    from search.plan import plan_sweep
    from search.sweep import hold_lease, repair_damaged

    plan = plan_sweep(spec, resume=resume)
    with hold_lease(plan.sweep_dir, storage=plan.storage, name=plan.name):
        if resume:
            repair_damaged(plan)
        _run(plan, resume)


def _run(plan, resume: bool) -> None:
    from search.confirm import pending_confirmation
    from search.layout import BEST_RECIPE_FILE, read_state
    from search.upstream import run_with_upstream  # Ray, Tune, MLflow: imported when a sweep runs

    if plan.spec.study == "rsb":
        _rsb_study(plan, resume)
        return
    started = time.time()
    state = read_state(plan.sweep_dir) if resume else None
    ended = state and state.get("finished") and (not state.get("best") or os.path.exists(os.path.join(plan.sweep_dir, BEST_RECIPE_FILE)))
    if ended:  # its best recipe written, logged, reported: nothing of the search left to run
        print(f"sweep {plan.name}: its search has finished")
    else:
        state = run_with_upstream(plan, resume=resume)
        _searched(plan, state, started)
    pending = pending_confirmation(plan.sweep_dir, plan.spec.confirm, plan.spec.confirm_seeds)
    if pending and state.get("best"):
        _confirm(plan, *pending)


def _searched(plan, state: dict[str, Any], started: float) -> None:
    """What the search phase says when it ends: its counts, the winner, or how it was stopped."""
    from search.layout import BEST_RECIPE_FILE, count_states
    from search.results import sweep_best
    from search.study import GRID_STUDIES

    best = state.get("best")
    study = plan.spec.searcher == "grid" and plan.space.name in GRID_STUDIES
    minutes = (time.time() - started) / 60
    counts = count_states(state)
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    if state.get("interrupted"):
        _interrupted(plan, f"sweep {plan.name} interrupted after {minutes:.1f} min ({summary}); its state is saved.", state)
    print(f"\nsweep {plan.name} done in {minutes:.1f} min: {summary}")
    if study:
        _report_study(plan, state)
    elif best:
        print(f"best trial {best['trial_id']}: {best['metric']}={best['value']:.4f} (MLflow run {best['mlflow_run_id']})")
        _print_gain(sweep_best(plan.sweep_dir, follow_confirmation=False))
        print(recipe_to_yaml(validate_recipe(best["recipe"])).rstrip())
        print(f"best recipe written to {os.path.join(plan.sweep_dir, BEST_RECIPE_FILE)}")
    if not study:  # the study's report says it
        print(f"compare runs in MLflow: recipe-search ui --tracking-uri {plan.tracking_uri}")
    if not best:
        errors = [r["error"] for r in state["trials"].values() if r.get("error")]
        typer.echo(f"error: no trial ran its whole schedule with a result ({len(errors)} failed" + (f"; the first: {errors[0][:300]})" if errors else ")"), err=True)
        raise typer.Exit(EXIT_ALL_FAILED)


def _interrupted(plan, line: str, stopped: Optional[dict[str, Any]] = None) -> None:
    from search.layout import sweep_ref

    if stopped and stopped.get("disk_full"):  # stopped as an interrupt is, and said in one line
        typer.echo(f"error: {plan.name} stopped as if interrupted, the disk is full: {stopped['disk_full']}; free space, then resume it", err=True)
    print(f"\n{line}")
    print(f"resume it with: recipe-search resume {sweep_ref(plan.sweep_dir)}")
    raise typer.Exit(EXIT_INTERRUPTED)


def _confirm(plan, top: int, seeds: int) -> None:
    """The confirmation phase: its table, the confirmed winner written as the best recipe."""
    from search.confirm import format_confirmation
    from search.layout import BEST_RECIPE_FILE
    from search.sweep import run_confirmation

    started = time.time()
    summary = run_confirmation(plan, top, seeds)
    minutes = (time.time() - started) / 60
    if summary.get("interrupted"):
        _interrupted(plan, f"confirmation of {plan.name} interrupted after {minutes:.1f} min; its finished seeds are kept.", summary)
    print(f"\nconfirmation of {plan.name} done in {minutes:.1f} min")
    print(format_confirmation(summary))
    if summary["winner"] is None:
        raise typer.Exit(EXIT_ALL_FAILED)
    print(f"confirmed winner's recipe written to {os.path.join(plan.sweep_dir, BEST_RECIPE_FILE)}")


def _rsb_study(plan, resume: bool) -> None:
    from search.study import run_rsb_study

    started = time.time()
    summary = run_rsb_study(plan, sys.stdout, resume=resume)
    minutes = (time.time() - started) / 60
    if summary.get("interrupted"):
        _interrupted(plan, f"study {plan.name} interrupted after {minutes:.1f} min; its finished runs are kept.", summary)
    print(f"\nstudy {plan.name} done in {minutes:.1f} min")
    print(summary["table"])
    print(f"{plan.space.metric} vs budget: {summary['plot']} (also in MLflow: the parent run of experiment {plan.name}, artifacts study/)")
    print(f"compare runs in MLflow: recipe-search ui --tracking-uri {plan.tracking_uri}")
    if not any(r["n"] for r in summary["recipes"]):
        errors = [run["error"] for r in summary["recipes"] for run in r["runs"] if run.get("error")]
        typer.echo("error: no run of the study gave a result" + (f"; the first error: {errors[0][:300]}" if errors else ""), err=True)
        raise typer.Exit(EXIT_ALL_FAILED)


def _report_study(plan, state: dict[str, Any]) -> None:
    from search.study import study_report

    report = study_report(plan.sweep_dir, state, plan.tracking_uri, plan.space.metric)
    print(report["table"])
    print(f"{plan.space.metric} vs iterations: {report['plot']} (also in MLflow: the parent run of experiment {plan.name}, artifacts study/)")
    print(f"compare runs in MLflow: recipe-search ui --tracking-uri {plan.tracking_uri}")


def _print_gain(info: Optional[dict[str, Any]], prefix: str = "") -> None:
    if info and "gain" in info:
        base = info["baseline"]
        print(f"{prefix}base recipe (trial {base['trial_id']}): {info['metric']}={base['value']:.4f}; the best beats it by {info['gain']:+.4f}")


@app.command()
def sweep(
    space: str = typer.Argument("rsb", help=f"a space preset ({', '.join(space_names())}) or a YAML file"),
    name: Optional[str] = typer.Option(None, "--name", help="sweep name (MLflow experiment) [default: SPACE-TIME]"),
    trials: int = typer.Option(12, "--trials", help="number of trials"),
    searcher: str = typer.Option("tpe", "--searcher", help="tpe, random, cmaes or grid (Optuna samplers)"),
    scheduler: str = typer.Option("asha", "--scheduler", help="asha, hyperband, median or fifo"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="max trials at once [default: what the cluster fits]"),
    workers: Optional[int] = WorkersOption,
    cpus_per_worker: Optional[float] = CpusOption,
    gpus_per_worker: Optional[float] = GpusOption,
    recipe: Optional[str] = typer.Option(None, "--recipe", help="base recipe instead of the space's (preset or YAML)"),
    data: Optional[str] = DataOption,
    sets: list[str] = SetOption,
    storage: str = StorageOption,
    tracking_uri: Optional[str] = TrackingOption,
    address: Optional[str] = AddressOption,
    seed: int = typer.Option(0, "--seed", help="seed of the searcher"),
    grace_period: int = typer.Option(3, "--grace-period", help="epochs (detection: evaluations) every trial gets before early stopping"),
    log_checkpoint: bool = LogCheckpointOption,
    optuna_storage: Optional[str] = typer.Option(
        None, "--optuna-storage", help="RDB URL of the searcher's Optuna study [default: sqlite in runs/NAME/recipe-search/]"
    ),
    confirm: int = typer.Option(0, "--confirm", metavar="K", help="then train the K best recipes again on fresh seeds (0: no confirmation)"),
    seeds: int = typer.Option(3, "--seeds", metavar="S", help="seeds of each recipe in the confirmation"),
) -> None:
    """Search a recipe space: Optuna proposes, ASHA stops weak trials early, MLflow records every trial."""
    from search.plan import SweepSpec

    overrides = _overrides(sets, data, workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    spec = SweepSpec(
        space=space, name=name, recipe=recipe, overrides=overrides, trials=trials, searcher=searcher,
        scheduler=scheduler, grace_period=grace_period, concurrency=concurrency, storage=storage,
        tracking_uri=tracking_uri, address=address, seed=seed, log_checkpoint=log_checkpoint, optuna_storage=optuna_storage,
        confirm=confirm, confirm_seeds=seeds,
    )
    _launch(spec)


@app.command()
def train(
    recipe: str = typer.Argument(..., help="a recipe preset or YAML file (e.g. one written by 'best -o')"),
    name: Optional[str] = typer.Option(None, "--name", help="run name [default: train-RECIPE-TIME]"),
    data: Optional[str] = DataOption,
    sets: list[str] = SetOption,
    workers: Optional[int] = WorkersOption,
    cpus_per_worker: Optional[float] = CpusOption,
    gpus_per_worker: Optional[float] = GpusOption,
    storage: str = StorageOption,
    tracking_uri: Optional[str] = TrackingOption,
    address: Optional[str] = AddressOption,
    log_checkpoint: bool = LogCheckpointOption,
) -> None:
    """Train one recipe, no search; tracked in MLflow like a sweep."""
    from search.plan import SweepSpec

    overrides = _overrides(sets, data, workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    load_recipe(recipe)  # fail on an unknown recipe before anything else
    stem = os.path.splitext(os.path.basename(recipe))[0]
    space = Space(name=f"train-{stem}", recipe=recipe, params={})
    spec = SweepSpec(
        space=space, name=name or f"train-{stem}-{time.strftime('%Y%m%d-%H%M%S')}", overrides=overrides, trials=1,
        searcher=None, scheduler="fifo", storage=storage, tracking_uri=tracking_uri, address=address,
        log_checkpoint=log_checkpoint,
    )
    _launch(spec)


@app.command()
def resume(
    sweep_name: str = typer.Argument(..., metavar="NAME_OR_PATH"),
    storage: str = StorageOption,
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI [default: the sweep's own]"),
) -> None:
    """Continue a stopped sweep: finished trials stay done, interrupted ones go on from their checkpoints."""
    from search.layout import find_sweep
    from search.plan import load_sweep_spec

    _launch(load_sweep_spec(find_sweep(sweep_name, storage, for_driver=True), tracking_uri), resume=True)


@app.command()
def confirm(
    sweep_name: str = typer.Argument(..., metavar="NAME_OR_PATH"),
    top: int = typer.Option(3, "--top", metavar="K", help="how many of the best recipes to train again"),
    seeds: int = typer.Option(3, "--seeds", metavar="S", help="fresh seeds per recipe"),
    storage: str = StorageOption,
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI [default: the sweep's own]"),
) -> None:
    """Train the K best recipes of a finished sweep again on S fresh seeds: mean ± std, and whether the winner beats the runner-up beyond the noise."""
    from search.confirm import check_request
    from search.layout import find_sweep, read_confirmation
    from search.plan import load_sweep_spec, plan_sweep

    check_request(top, seeds)
    sweep_dir = find_sweep(sweep_name, storage, for_driver=True)
    done = read_confirmation(sweep_dir)
    if done is not None:
        from search.confirm import format_confirmation

        if (done.get("top"), len(done["seeds"])) != (top, seeds):
            _fail(f"sweep {sweep_dir!r} is confirmed already, its top {done.get('top')} over {len(done['seeds'])} seeds (recipe-search status shows it)")
        print(format_confirmation(done))
        return
    from search.sweep import hold_lease, repair_damaged

    spec = load_sweep_spec(sweep_dir, tracking_uri)
    if spec.study or spec.searcher is None:
        _fail(f"{sweep_dir!r} is {'a study of seeds' if spec.study else 'a single run'}, not a search: it has no recipes to confirm")
    plan = plan_sweep(spec, resume=True)
    with hold_lease(plan.sweep_dir, storage=plan.storage, name=plan.name):
        repair_damaged(plan)
        _confirm(plan, top, seeds)


@app.command()
def status(
    sweep_name: str = typer.Argument(..., metavar="NAME_OR_PATH"),
    storage: str = StorageOption,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Trials by state and the best so far (also while the sweep runs)."""
    from search.layout import driver_gone, find_sweep, read_state, sweep_ref
    from search.results import sweep_status, trial_rows

    sweep_dir = find_sweep(sweep_name, storage)
    info = sweep_status(sweep_dir)
    if as_json:
        print(json.dumps(info, indent=1))
        return
    print(f"sweep {info['name']} ({info['path']}): " + ", ".join(f"{n} {s.lower()}" for s, n in info["trials"].items()))
    if driver_gone(read_state(sweep_dir)):
        print(f"  its driver has stopped: recipe-search resume {sweep_ref(sweep_dir)}")
    metric = read_state(sweep_dir)["metric"]
    for row in trial_rows(sweep_dir):
        value = row["value"]
        shown = f"{metric}={value:.4f}" if isinstance(value, float) else ""
        print(f"  {row['trial_id']}  {row['status']:<28} {row['progress']:<16} {shown} {row['error'] or ''}".rstrip())
    best = info["best"]
    if best:
        print(f"best: trial {best['trial_id']} {best['metric']}={best['value']:.4f}")
    _print_phase(sweep_dir, info["phase"])


def _print_phase(sweep_dir: str, phase: dict[str, Any]) -> None:
    from search.confirm import format_confirmation
    from search.layout import read_confirmation, sweep_ref

    if phase["phase"] == "search":
        print("phase: search")
    elif phase["phase"] == "study":
        print(f"phase: study of seeds, {phase['done']} of {phase['total']} runs done" + (f", {phase['failed']} failed" if phase["failed"] else ""))
    elif phase["phase"] == "confirmation":
        failed = f", {phase['failed']} failed" if phase["failed"] else ""
        print(f"phase: confirmation over seeds, {phase['done']} of {phase['total']} runs done{failed}")
        if not phase["driver"]:
            print(f"  no driver runs it: recipe-search resume {sweep_ref(sweep_dir)}")
    elif phase.get("confirmation"):
        print("phase: done, " + ("confirmed over seeds" if phase["confirmed"] else "no confirmation run gave a result"))
        print(format_confirmation(read_confirmation(sweep_dir)))
    elif phase.get("confirmable"):
        print(f"phase: done (one seed per recipe; confirm the best: recipe-search confirm {sweep_ref(sweep_dir)} --top 3 --seeds 3)")
    else:
        print("phase: done")


def _check_output_file(path: str, flag: str) -> None:
    """Fail in one line, before any work, when ``path`` cannot be written as a file."""
    import tempfile

    if not path:
        _fail(f"{flag} takes a file path, but got an empty one")
    if os.path.isdir(path):
        _fail(f"{flag} {short(path)} is a directory; give a file path, e.g. {short(os.path.join(path, 'best.yaml'))}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        _fail(f"{flag} {short(path)}: its folder {short(folder)} does not exist")
    try:
        if os.path.isfile(path):
            open(path, "a").close()  # appends nothing: the file is left as it is
        elif not os.path.exists(path):  # a probe, since permissions alone can lie (root, /proc)
            os.rmdir(tempfile.mkdtemp(prefix=".recipe-search-probe-", dir=folder))
    except OSError as err:
        _fail(f"{flag} {short(path)} cannot be written ({err.strerror})")


@app.command()
def best(
    sweep_name: str = typer.Argument(..., metavar="NAME_OR_PATH"),
    storage: str = StorageOption,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="write the best recipe to this YAML file"),
) -> None:
    """The best trial's recipe (reusable with 'train' or '--recipe')."""
    from search.layout import find_sweep
    from search.results import sweep_best

    if output is not None:
        _check_output_file(output, "-o/--output")
    sweep_dir = find_sweep(sweep_name, storage)
    info = sweep_best(sweep_dir)
    if info is None:
        _fail(f"sweep {sweep_dir!r} has no finished trial with a result yet")
    text = recipe_to_yaml(validate_recipe(info["recipe"]))
    if output is not None:
        try:
            with open(output, "w") as f:
                f.write(text)
        except OSError as err:
            _fail(f"-o/--output {short(output)} cannot be written ({err.strerror})")
    if as_json:
        print(json.dumps(info, indent=1))
        return
    print(f"# best trial {info['trial_id']}: {info['metric']}={info['value']:.4f} (MLflow run {info['mlflow_run_id']})")
    confirmed = info.get("confirmed")
    if confirmed:
        from search.confirm import verdict
        from search.layout import read_confirmation

        print(f"# {verdict(read_confirmation(sweep_dir))}")
    _print_gain(info, prefix="# ")
    print(text.rstrip())
    if output:
        print(f"# written to {output}")


@app.command()
def recipes(
    name: Optional[str] = typer.Argument(None, help="a preset name or YAML file: print it resolved"),
    as_json: bool = typer.Option(False, "--json", help="print nested JSON"),
    sets: list[str] = SetOption,
) -> None:
    """List recipe presets, or print one resolved."""
    if name is None:
        if as_json:
            print(json.dumps({n: RECIPE_PRESETS[n][2] for n in recipe_names()}, indent=1))
            return
        for preset in recipe_names():
            base, _, description = RECIPE_PRESETS[preset]
            print(f"{preset:<34} {description}" + (f" [base: {base}]" if base else ""))
        return
    overrides = parse_overrides(sets or [])
    recipe = resolve_recipe(name, overrides)
    check_applies(recipe, list(overrides), f"recipe {name}", "--set ")
    if as_json:
        print(recipe.model_dump_json(indent=1))
    else:
        print(recipe_to_yaml(recipe).rstrip())


@app.command(name="spaces")
def spaces_(name: Optional[str] = typer.Argument(None, help="a space preset name or YAML file: print it")) -> None:
    """List search-space presets, or print one."""
    if name is None:
        for preset in space_names():
            space = load_space(preset)
            print(f"{preset:<10} on {space.recipe}: {space.description}")
        return
    space = load_space(name)
    space.check()
    path = SPACES_DIR / f"{name}.yaml"
    print(path.read_text().rstrip() if path.is_file() else yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False).rstrip())


@app.command()
def study(
    which: str = typer.Argument(
        ..., metavar="STUDY",
        help="rethinking: scratch vs pretrained detectors (Rethinking ImageNet Pre-training); rsb: A1/A2/A3 over seeds (ResNet strikes back)",
    ),
    schedules: str = typer.Option("1,2", "--schedules", help="schedule multipliers of the recipe, comma-separated"),
    fractions: str = typer.Option("1.0", "--fractions", help="training-data fractions, comma-separated (less-data study)"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="base detection recipe [default: scratch-det-digits]"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="backbone checkpoint of the pretrained arm [default on digits-det: an upstream run on digits]"),
    name: Optional[str] = typer.Option(None, "--name", help="study name (MLflow experiment) [default: STUDY-TIME]"),
    data: Optional[str] = typer.Option(None, "--data", help="'digits-det' or a COCO root (annotations/instances_train*.json, train*/, val*/)"),
    sets: list[str] = SetOption,
    workers: Optional[int] = WorkersOption,
    cpus_per_worker: Optional[float] = CpusOption,
    gpus_per_worker: Optional[float] = GpusOption,
    storage: str = StorageOption,
    tracking_uri: Optional[str] = TrackingOption,
    address: Optional[str] = AddressOption,
    seeds: int = typer.Option(3, "--seeds", help="rsb: seeds per procedure"),
    epochs: int = typer.Option(20, "--epochs", help="rsb: A3's epochs (A2 runs 3x, A1 6x: the paper's 100/300/600)"),
) -> None:
    """rethinking: paired scratch and pretrained trials, AP vs iterations. rsb: A1/A2/A3 over seeds, accuracy vs budget with error bars."""
    from search.plan import SweepSpec
    from search.study import STUDIES, rethinking_spec, rsb_spec

    if which not in STUDIES:
        _fail(f"unknown study {short(which)}; available: {', '.join(STUDIES)}")
    overrides = _overrides(sets, data, workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    if which == "rethinking" and (seeds != 3 or epochs != 20):
        _fail("--seeds and --epochs are options of study rsb; rethinking takes --schedules, --fractions, --recipe, --pretrained")
    if which == "rsb":
        if recipe or pretrained or schedules != "1,2" or fractions != "1.0":
            _fail("--recipe, --pretrained, --schedules and --fractions are options of study rethinking; rsb takes --seeds and --epochs")
        name = name or f"rsb-{time.strftime('%Y%m%d-%H%M%S')}"
        spec = SweepSpec(space="rsb", name=name, overrides=overrides, storage=storage, tracking_uri=tracking_uri, address=address)
        _launch(rsb_spec(spec, seeds, epochs))
        return
    if pretrained:
        overrides["model.pretrained"] = pretrained
    spec = SweepSpec(
        space="rethinking", name=name or f"{which}-{time.strftime('%Y%m%d-%H%M%S')}", recipe=recipe, overrides=overrides,
        storage=storage, tracking_uri=tracking_uri, address=address,
    )
    _launch(rethinking_spec(spec, _numbers(schedules, "--schedules"), _numbers(fractions, "--fractions")))


def _numbers(text: str, flag: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        _fail(f"{flag} takes comma-separated numbers, e.g. 1,2; got {short(text)}")
        raise


@app.command()
def hyperrule(
    examples: int = typer.Option(..., "--examples", help="number of training examples"),
    image_size: int = typer.Option(..., "--image-size", help="side of the dataset's images, in pixels"),
    batch_size: int = typer.Option(512, "--batch-size", help="batch size (the LR scales linearly from 0.003 at 512)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """The BiT-HyperRule: the fine-tuning recipe BiT picks from dataset size and image size."""
    from spaces.hyperrule import hyperrule as rule_for

    rule = rule_for(examples, image_size, batch_size).as_dict()
    if as_json:
        print(json.dumps(rule, indent=1))
        return
    for key, value in rule.items():
        print(f"{key:<14} {value}")


@app.command(name="coco-eval")
def coco_eval(
    ground_truth: str = typer.Argument(..., metavar="GT.json", help="COCO ground truth (images, annotations, categories)"),
    detections: str = typer.Argument(..., metavar="DETS.json", help="COCO results: a list of {image_id, category_id, score, bbox|segmentation}"),
    iou_type: str = typer.Option("bbox", "--iou-type", help="bbox or segm"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """COCO AP of a detection result file, with pycocotools (the numbers sweeps report as val/...)."""
    from trainables.coco import IOU_TYPES, evaluate_files

    if iou_type not in IOU_TYPES:
        _fail(f"--iou-type must be one of {', '.join(IOU_TYPES)}, but got {iou_type!r}")
    metrics = evaluate_files(ground_truth, detections, iou_type)
    if as_json:
        print(json.dumps(metrics, indent=1))
        return
    for key, value in metrics.items():
        print(f"{key:<12} {value:.4f}")


@app.command()
def ui(
    tracking_uri: Optional[str] = TrackingOption,
    host: str = typer.Option("127.0.0.1", "--host", help="bind address (127.0.0.1: this machine only)"),
    port: int = typer.Option(5000, "--port"),
    public: bool = typer.Option(False, "--public", help="allow a --host other machines reach (MLflow's UI has no login)"),
) -> None:
    """Open the MLflow UI on the tracking store."""
    import ipaddress

    from search.tracking import resolve_tracking_uri

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not public:
        _fail(
            f"--host {host[:100]!r} serves the tracking store to other machines, and MLflow's UI has no login: anyone who reaches "
            "it can read, change and delete these runs and their artifacts; add --public to do so (or tunnel: ssh -L)"
        )
    uri = resolve_tracking_uri(tracking_uri)
    if not loopback:
        typer.echo(f"warning: serving {uri} to anyone who reaches {host}:{port}, without a login", err=True)
    print(f"MLflow UI for {uri} on http://{host}:{port}", flush=True)
    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)])


@app.command()
def report(
    sweep_name: str = typer.Argument(..., metavar="NAME_OR_PATH"),
    storage: str = StorageOption,
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI [default: the sweep's own]"),
) -> None:
    """Write runs/NAME/report.html (winner, importance, history, parallel coordinates, curves, cost) and log it to MLflow."""
    from search.layout import find_sweep
    from search.plan import load_sweep_spec
    from search.report import write_report
    from search.storage import storage_of

    sweep_dir = find_sweep(sweep_name, storage)
    spec = load_sweep_spec(sweep_dir, tracking_uri)
    paths = write_report(sweep_dir, spec.tracking_uri, spec.optuna_storage)
    mirrored = storage_of(sweep_dir)
    if mirrored:  # the sweep is on object storage: the report goes there too
        for path in paths.values():  # the page and its figures (report/*.png)
            mirrored[0].upload(path, mirrored[1], *os.path.relpath(path, sweep_dir).split(os.sep))
        print(f"report: {paths['report']} (and {mirrored[0]}/{mirrored[1]}/{os.path.basename(paths['report'])})")
        return
    print(f"report: {paths['report']}")


@app.command()
def dashboard(
    sweep_name: str = typer.Argument(..., metavar="NAME_OR_PATH"),
    storage: str = StorageOption,
    port: int = typer.Option(8080, "--port"),
) -> None:
    """Open optuna-dashboard on the sweep's Optuna study (history, importance, parallel coordinates) on 127.0.0.1."""
    from search.layout import find_sweep
    from search.plan import load_sweep_spec

    sweep_dir = find_sweep(sweep_name, storage)
    url = load_sweep_spec(sweep_dir).optuna_storage
    if not url:
        _fail(f"sweep {sweep_dir!r} has no Optuna study (it ran without a searcher, or before studies were stored)")
    import threading
    from wsgiref.simple_server import make_server

    from optuna_dashboard import wsgi

    server = make_server("127.0.0.1", port, wsgi(url))
    print(f"optuna-dashboard for {url} (study {os.path.basename(sweep_dir)}) on http://127.0.0.1:{port}", flush=True)
    # Served from a thread: Ctrl-C and SIGTERM land in this one, and stop it. In the serving thread, wsgiref
    # answers an interrupt that arrives during a request with a 500 and serves on.
    stopped = threading.Event()

    def serve() -> None:
        try:
            server.serve_forever()
        finally:
            stopped.set()

    threading.Thread(target=serve, name="optuna-dashboard", daemon=True).start()
    try:
        stopped.wait()
    except KeyboardInterrupt:
        closing = threading.Thread(target=server.shutdown, daemon=True)  # waits for the request in progress
        closing.start()
        closing.join(5)
        print("optuna-dashboard stopped", flush=True)
    server.server_close()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    address: Optional[str] = typer.Option(
        None, "--address", help="the cluster's dashboard, http://HEAD:8265 [default: $RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265]",
    ),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow the job's output here (Ctrl-C detaches; the job goes on)"),
) -> None:
    """Run a driver on a Ray cluster as a Ray Job: recipe-search submit --address http://HEAD:8265 -- sweep ARGS... (storage, tracking store and files by absolute path or URI)."""
    from search.jobs import JOB_COMMANDS, job_argv, submit as submit_job

    if not ctx.args:
        _fail(f"give the command to run after '--': recipe-search submit -- sweep SPACE ... (one of {', '.join(JOB_COMMANDS)})")
    command, *rest = ctx.args
    group = typer.main.get_command(app)
    target = group.get_command(ctx, command) if command in JOB_COMMANDS else None
    if target is None:
        _fail(f"'{command}' does not run a driver: submit one of {', '.join(JOB_COMMANDS)}")
    params = target.make_context(command, list(rest), parent=ctx).params  # its usage errors, here and now
    argv = job_argv(command, params, rest)
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or "http://127.0.0.1:8265"
    code = submit_job(address, argv, wait)
    if code:
        raise typer.Exit(code)


MAX_USAGE_LINE = 300  # characters of click's message: a huge argument value must not make a huge line
MAX_ERROR_LINE = 1000  # the library's messages bound user values themselves (spaces.errors.short); a backstop


def _one_line(message: str, limit: int) -> str:
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _usage_error(err: typer.TyperException) -> str:
    """A usage error of typer's click (unknown command or option, bad or missing value) as one bounded line."""
    ctx = getattr(err, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {_one_line(err.format_message(), MAX_USAGE_LINE)}{where}"


def _terminate_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Run the CLI: every error a user can cause is one line on stderr and exit 2; ``typer.Exit`` codes pass through.

    typer 0.29 carries its own copy of click (``typer._click``): its exceptions derive from the public
    ``typer.TyperException``, not from ``click.ClickException``. Without standalone mode typer returns the
    code of a ``typer.Exit`` (0 after ``--help``) and raises the usage errors and ``typer.Abort``.
    """
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # SIGTERM (kill, a batch scheduler) as Ctrl-C, from the start
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        code = app(standalone_mode=False)
    except KeyboardInterrupt:  # before Tune ran (planning, Ray starting), or after: nothing of a trial to keep
        typer.echo("error: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except RecipeSearchError as err:
        typer.echo(f"error: {_one_line(str(err), MAX_ERROR_LINE)}", err=True)
        sys.exit(EXIT_USAGE)
    except OSError as err:  # a path too long, a full disk before the sweep started, a folder not allowed
        from search.layout import disk_full

        where = f" ({short(os.fsdecode(err.filename))})" if err.filename is not None else ""
        typer.echo(f"error: {_one_line(disk_full(err) or err.strerror or str(err), MAX_ERROR_LINE)}{where}", err=True)
        sys.exit(EXIT_USAGE)
    except typer.Abort:  # Ctrl-D at a prompt
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    except typer.TyperException as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # no arguments: the help, printed when it was raised (rich)
            if err.format_message().strip():  # without rich, it carries the help instead
                typer.echo(err.format_message(), err=True)
        else:
            typer.echo(_usage_error(err), err=True)
        sys.exit(err.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
