"""The CLI: listings and JSON contracts, and one-line errors with exit code 2 that leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from spaces import define_by_run, flatten, recipe_names, resolve_recipe, space_names, task_keys

CLI = [sys.executable, "-m", "search.cli"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(args, cwd, env=None):
    environment = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    environment.pop("MLFLOW_TRACKING_URI", None)
    environment.pop("RAY_ADDRESS", None)
    return subprocess.run(CLI + args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=120)


def test_recipes_json_is_the_resolved_nested_recipe(workdir):
    result = run(["recipes", "rsb-a3", "--json"], workdir)
    assert result.returncode == 0, result.stderr
    recipe = json.loads(result.stdout)
    assert recipe["optim"]["lr"] == 0.008 and recipe["data"]["train_size"] == 160
    flat = set(flatten(recipe))
    assert flat == set(flatten(resolve_recipe("rsb-a3").model_dump()))
    assert not flat & (task_keys("detection") - task_keys("classification"))  # no detection key
    assert "optim.momentum" not in flat  # LAMB takes none
    det = set(flatten(json.loads(run(["recipes", "scratch-det-digits", "--json"], workdir).stdout)))
    assert {"model.anchor_sizes", "schedule.iterations"} <= det and not det & (task_keys("classification") - task_keys("detection"))


def test_set_of_another_tasks_key_is_one_line_and_exit_2(workdir):
    result = run(["recipes", "rsb-digits", "--set", "model.anchor_sizes=[8,16,32,64,128]"], workdir)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: model.anchor_sizes is a detection key; recipe rsb-digits is classification\n"
    result = run(["recipes", "rsb-digits", "--set", "optim.momentum=0.95"], workdir)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --set optim.momentum does not apply to recipe rsb-digits (optim.name=lamb): it needs an optimizer with momentum")


def test_listings(workdir):
    assert all(name in run(["recipes"], workdir).stdout for name in recipe_names())
    assert all(name in run(["spaces"], workdir).stdout for name in space_names())
    shown = yaml.safe_load(run(["spaces", "rsb"], workdir).stdout)
    assert shown["recipe"] == "rsb-digits" and "optim.lr" in shown["params"]


def test_recipes_set_overrides(workdir):
    result = run(["recipes", "rsb-digits", "--set", "optim.lr=0.02", "--set", "reg.ema_decay=0.999"], workdir)
    recipe = yaml.safe_load(result.stdout)
    assert recipe["optim"]["lr"] == 0.02 and recipe["reg"]["ema_decay"] == 0.999


BAD_INPUT = [  # as real processes: the exit code and stderr a shell sees (the broad table: tests/search/test_bad_inputs.py)
    (["sweep", "nope"], "unknown space 'nope'; available: bit, det, rethinking, rsb"),
    (["sweep", "--address", "127.0.0.1:9"], "does not answer"),
    # in a fresh process (no test imported trainables.bit): the tiny BiT model is known to planning
    (["sweep", "bit", "--address", "127.0.0.1:9"], "does not answer"),
    (["train", "rsb-digits", "--set", "optim.lr=-0.1"], "optim.lr: input should be greater than 0, but got -0.1"),
    (["status", "nope"], "no sweep 'nope'"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workdir, args, message):
    result = run(args, workdir)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert sorted(os.listdir(workdir)) == []  # no runs/, no mlflow.db


def test_malformed_space_and_status_on_a_folder_that_is_not_a_sweep(workdir):
    (workdir / "bad.yaml").write_text("name: x\nrecipe: rsb-digits\nparams:\n  optim.lr: {loguniform: [0.1, 0.001]}\n")
    result = run(["sweep", "bad.yaml"], workdir)
    assert result.returncode == 2 and "low < high" in result.stderr
    (workdir / "plain" / "train").mkdir(parents=True)
    (workdir / "plain" / "val").mkdir()
    for command in (["status", "plain"], ["resume", "plain"]):
        result = run(command, workdir)
        assert result.returncode == 2 and "not a sweep directory" in result.stderr
    result = run(["train", "rsb-digits", "--data", "plain"], workdir)
    assert result.returncode == 2 and "has no class folders" in result.stderr


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    """A small digits-det ground truth and its perfect detections (boxes and RLE masks)."""
    from pycocotools.coco import COCO
    from pycocotools import mask as mask_utils

    from trainables.coco import write_digits_det

    root = write_digits_det(tmp_path_factory.mktemp("coco") / "digits-det", train_images=4, val_images=6)
    gt_path = root / "annotations" / "instances_val.json"
    coco = COCO(str(gt_path))
    dets = []
    for ann in coco.dataset["annotations"]:
        if not ann["iscrowd"]:
            rle = mask_utils.encode(np.asfortranarray(coco.annToMask(ann)))
            rle["counts"] = rle["counts"].decode()
            dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 0.9, "segmentation": rle})
    dets_path = root / "dets.json"
    dets_path.write_text(json.dumps(dets))
    return str(gt_path), str(dets_path)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_eval_prints_pycocotools_numbers(workdir, coco_files, iou_type):
    from trainables.coco import evaluate_files

    gt, dets = coco_files
    result = run(["coco-eval", gt, dets, "--iou-type", iou_type, "--json"], workdir)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == evaluate_files(gt, dets, iou_type)
    assert printed[f"{iou_type}_AP"] == pytest.approx(1.0)  # perfect detections
    table = run(["coco-eval", gt, dets, "--iou-type", iou_type], workdir).stdout
    assert f"{iou_type}_AP50" in table


def test_coco_eval_malformed_files_fail_in_one_line(workdir, coco_files):
    gt, dets = coco_files
    (workdir / "not.json").write_text("{oops")
    (workdir / "unknown_image.json").write_text(json.dumps([{"image_id": 999999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    (workdir / "no_bbox.json").write_text(json.dumps([{"image_id": 1, "category_id": 1, "score": 0.5}]))
    (workdir / "gt_without_images.json").write_text(json.dumps({"annotations": [], "categories": []}))
    ground_truth = json.loads((workdir / gt).read_text() if not os.path.isabs(gt) else open(gt).read())
    ground_truth["annotations"][0]["bbox"][2] = -5.0
    (workdir / "negative_width.json").write_text(json.dumps(ground_truth))
    cases = [
        (["negative_width.json", dets], "annotations[0] has bbox [" ),
        ([gt, "missing.json"], "missing.json"),
        ([gt, "not.json"], "not.json"),
        ([gt, "unknown_image.json"], "unknown_image.json"),
        ([gt, "no_bbox.json"], "no_bbox.json"),
        (["gt_without_images.json", dets], "gt_without_images.json"),
        ([gt, dets, "--iou-type", "keypoints"], "--iou-type must be one of bbox, segm"),
    ]
    for args, fragment in cases:
        result = run(["coco-eval", *args], workdir)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (args, result.stderr)


def test_grid_searcher_visits_every_point_once_and_never_stops_the_study(tmp_path):
    import optuna

    from search.algorithms import PruneAwareOptunaSearch, build_searcher
    from trainables.report import TrialReport, Unit
    from spaces import load_space, resolve_recipe
    from spaces.recipe import flatten

    space = load_space("rethinking")
    base = flatten(resolve_recipe(space.recipe, {"model.pretrained": "/ckpt"}).model_dump())
    searcher = build_searcher("grid", define_by_run(space, base), "val/bbox_AP", "max", seed=0, trials=4,
                              storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s")
    assert isinstance(searcher, PruneAwareOptunaSearch)
    seen = []
    for i in range(4):
        config = searcher.suggest(str(i))
        seen.append((config["model.init"], config["schedule.multiplier"]))
        searcher.on_trial_complete(str(i), TrialReport.period({"val/bbox_AP": 0.1 * i}, 1, 1, Unit.ITERATION).to_result())  # the last one used to raise
    assert sorted(seen) == [("pretrained", 1), ("pretrained", 2), ("scratch", 1), ("scratch", 2)]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in searcher.study.trials)


def test_a_grid_restored_after_a_lost_driver_still_visits_every_point(tmp_path):
    """A point asked after Tune last saved the searcher, then lost with the driver, is asked again on resume."""
    import optuna

    from search.algorithms import build_searcher
    from trainables.report import TrialReport, Unit
    from spaces import load_space, resolve_recipe
    from spaces.recipe import flatten

    space = load_space("rethinking")
    base = flatten(resolve_recipe(space.recipe, {"model.pretrained": "/ckpt"}).model_dump())
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def searcher():
        return build_searcher("grid", define_by_run(space, base), "val/bbox_AP", "max", seed=0, trials=4, storage=storage, study_name="s")

    def done(s, trial_id):
        s.on_trial_complete(trial_id, TrialReport.period({"val/bbox_AP": 0.1}, 1, 1, Unit.ITERATION).to_result())

    first = searcher()
    seen = [first.suggest("0")]
    done(first, "0")
    first.save(str(tmp_path / "searcher.pkl"))  # Tune's last save of the searcher
    lost = first.suggest("1")  # asked, then the driver dies
    resumed = searcher()
    resumed.restore(str(tmp_path / "searcher.pkl"))
    for trial_id in ("2", "3", "4"):
        seen.append(resumed.suggest(trial_id))
        done(resumed, trial_id)
    assert lost in seen[1:]  # the lost point comes back
    assert sorted((c["model.init"], c["schedule.multiplier"]) for c in seen) == [("pretrained", 1), ("pretrained", 2), ("scratch", 1), ("scratch", 2)]
    states = sorted(t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials)
    assert states == ["COMPLETE"] * 4 + ["FAIL"]  # the lost trial is FAIL, not RUNNING forever


def test_the_searcher_tells_optuna_what_happened_to_each_trial(tmp_path):
    """A trial cut by the scheduler is PRUNED at the value it was cut at, a failure FAIL, a full run COMPLETE."""
    import optuna
    from optuna.trial import TrialState

    from search.algorithms import build_searcher
    from trainables.report import TrialReport, Unit
    from spaces import load_space, resolve_recipe
    from spaces.recipe import flatten

    space = load_space("rsb")
    base = flatten(resolve_recipe(space.recipe, {}).model_dump())
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = build_searcher("tpe", define_by_run(space, base), "val/top1", "max", seed=0, trials=4, storage=storage, study_name="s")

    def result(epoch: int, value: float, total: int = 5) -> dict:
        return {**TrialReport.period({"val/top1": value}, epoch, total, Unit.EPOCH).to_result(), "training_iteration": epoch}

    for trial_id in "abc":
        assert "__optuna_trial_number__" not in searcher.suggest(trial_id)
    for epoch in (1, 2):
        searcher.on_trial_result("a", result(epoch, 0.1 * epoch))
    searcher.on_trial_complete("a", result(3, 0.35))  # the scheduler stops it with its third result
    for epoch in range(1, 6):
        searcher.on_trial_result("b", result(epoch, 0.1 * epoch))
    searcher.on_trial_complete("b", result(5, 0.5))
    searcher.on_trial_complete("c", TrialReport.failure("val/top1", ValueError("diverged")).to_result())
    searcher.on_trial_complete("a", result(3, 0.35))  # told twice: the first verdict stands
    searcher.suggest("d")
    searcher.on_trial_result("d", result(1, 0.2))
    searcher.on_trial_complete("d", None)  # HyperBand stops a paused trial without a result
    a, b, c, d = optuna.load_study(study_name="s", storage=storage).trials
    assert (d.state, d.intermediate_values) == (TrialState.PRUNED, {1: 0.2})
    assert (a.state, a.value, a.intermediate_values) == (TrialState.PRUNED, 0.35, {1: 0.1, 2: 0.2, 3: 0.35})
    assert (b.state, b.value) == (TrialState.COMPLETE, 0.5)
    assert c.state == TrialState.FAIL


def test_a_sweep_from_another_version_is_read_but_not_resumed(workdir):
    from search.layout import SPEC_FILE
    from search.plan import SweepSpec

    sweep_dir = workdir / "runs" / "old"
    (sweep_dir / os.path.dirname(SPEC_FILE)).mkdir(parents=True)
    written = {**SweepSpec(space="rsb", name="old", storage=str(workdir / "runs")).to_json(), "tracking_uri": "sqlite:///mlflow.db"}
    (sweep_dir / SPEC_FILE).write_text(json.dumps(written))  # no "format": written before it existed
    result = run(["resume", "old", "--storage", str(workdir / "runs")], workdir)
    assert result.returncode == 2, result.stderr
    assert "was written by another version of recipe-search (sweep format 1, this one reads 2)" in result.stderr


DAMAGE = {
    "truncated": b'{"name": "s", "trials": {"a": {"sta',
    "empty": b"",
    "random bytes": bytes(range(256)) * 4,
    "a list": b"[]",
    "an empty object": b"{}",
    "no trials": b'{"name": "s", "num_samples": 2, "metric": "val/top1", "mode": "max"}',
    "a bad record": b'{"name": "s", "trials": {"a": 3}, "num_samples": 2, "metric": "val/top1", "mode": "max"}',
    "a bad best": b'{"name": "s", "trials": {}, "num_samples": 2, "metric": "val/top1", "mode": "max", "best": {"trial_id": "a"}}',
    "a bad driver": b'{"name": "s", "trials": {}, "num_samples": 2, "metric": "val/top1", "mode": "max", "driver": "me"}',
    "a bad baseline": b'{"name": "s", "trials": {}, "num_samples": 2, "metric": "val/top1", "mode": "max", "baseline": [1]}',
    "a directory": None,
}


def _damaged_sweep(workdir, damage, file):
    from search.layout import SPEC_FILE, SWEEP_FORMAT
    from search.plan import SweepSpec

    sweep_dir = workdir / "runs" / "hurt"
    (sweep_dir / os.path.dirname(SPEC_FILE)).mkdir(parents=True, exist_ok=True)
    spec = {**SweepSpec(space="rsb", name="hurt", storage=str(workdir / "runs")).to_json(), "tracking_uri": "sqlite:///mlflow.db", "format": SWEEP_FORMAT}
    (sweep_dir / SPEC_FILE).write_text(json.dumps(spec))
    target = sweep_dir / file
    if DAMAGE[damage] is None:
        target.mkdir()
    else:
        target.write_bytes(DAMAGE[damage])
    return sweep_dir


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_state_or_run_map_is_a_one_line_error(workdir, damage):
    from search.layout import RUNS_FILE, STATE_FILE, read_run_map, read_state
    from spaces import SweepError

    sweep_dir = _damaged_sweep(workdir, damage, STATE_FILE)
    with pytest.raises(SweepError, match=rf"^{sweep_dir / STATE_FILE} is damaged \(.+\): a crash or a full disk") as err:
        read_state(str(sweep_dir))
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    if damage not in ("no trials", "a bad record", "a bad best", "a bad driver", "a bad baseline"):  # valid run maps
        _damaged_sweep(workdir, damage, RUNS_FILE)
        with pytest.raises(SweepError, match=rf"^{sweep_dir / RUNS_FILE} is damaged"):
            read_run_map(str(sweep_dir))


@pytest.mark.parametrize("command", ["status", "best"])
def test_commands_on_a_damaged_state_fail_in_one_line_before_ray_starts(workdir, command):
    """(``resume`` rebuilds it: tests/search/test_sweep.py)"""
    from search.layout import STATE_FILE

    _damaged_sweep(workdir, "truncated", STATE_FILE)
    result = run([command, "hurt", "--storage", str(workdir / "runs")], workdir)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is damaged (not JSON" in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr and not (workdir / "runs" / "hurt" / "ray.log").exists()


def _lease(sweep_dir, host, pid, age_s):
    import socket
    import time

    from search.layout import LEASE_FILE

    lease = {"host": host or socket.gethostname(), "pid": pid, "started": time.time() - age_s, "heartbeat": time.time() - age_s}
    (sweep_dir / LEASE_FILE).write_text(json.dumps(lease))


def test_a_sweep_another_live_driver_runs_is_refused_before_anything_starts(workdir):
    """A second driver on a running sweep would relaunch its live trials and drop finished ones on the next resume."""
    sweep_dir = _damaged_sweep(workdir, "a bad driver", "recipe-search/unused.json")  # a sweep with no state yet
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    cases = [
        (None, os.getpid(), 2, True),  # this host, a live process (the test's own), fresh heartbeat
        ("another-host", 12345, 5, True),  # another host, heartbeat 5 s ago: alive as far as anyone can tell
        ("another-host", 12345, 600, False),  # heartbeat 10 minutes ago: stale
        (None, int(dead), 2, False),  # this host, its process gone: stale at once
    ]
    (sweep_dir / "recipe-search" / "sweep.json").write_text(
        (sweep_dir / "recipe-search" / "sweep.json").read_text().replace('"format": 2', '"format": 1')
    )  # past the lease, resume stops at the format check: nothing starts either way
    for host, pid, age, refused in cases:
        _lease(sweep_dir, host, pid, age)
        for command in (["resume", "hurt"], ["confirm", "hurt", "--top", "2", "--seeds", "2"]):
            result = run([*command, "--storage", str(workdir / "runs")], workdir)
            assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
            if refused:
                assert f"is being run by another driver (pid {pid} on {host or ''}" in result.stderr, result.stderr
            else:
                assert "another version of recipe-search" in result.stderr, result.stderr


def _one_class_folder(root):
    from PIL import Image

    for split in ("train", "val"):
        (root / split / "only").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / split / "only" / "x.png")
    return str(root)


def _broken_folder(root, damage):
    """An ImageFolder whose images are text files, or PNGs cut in half."""
    import io

    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                png = io.BytesIO()
                Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png, format="PNG")
                data = b"not an image\n" if damage == "text" else png.getvalue()[: len(png.getvalue()) * 2 // 3]
                (root / split / label / f"{i}.png").write_bytes(data)
    return str(root)


BAD_INPUTS = [
    ({"overrides": {"model.name": "resnet_nope"}}, "model.name 'resnet_nope': timm has no such model"),
    ({"overrides": {"model.init": "TEXT"}}, "is not a checkpoint (not a PyTorch, safetensors or .npz file"),
    ({"overrides": {"optim.batch_size": 100000}}, "optim.batch_size 100000 exceeds the 1437 training images"),
    ({"overrides": {"data.classes": [0, 1, 99]}}, "names class 99, but the dataset has classes 0..9"),
    ({"overrides": {"data.shots_per_class": 100000}}, "fewer than shots=100000"),
    ({"overrides": {"data.name": "TEXT_IMAGES"}}, "8 of 8 sampled images in train/ cannot be decoded (first: "),
    ({"overrides": {"data.name": "TRUNCATED"}}, "image file is truncated"),
    ({"overrides": {"data.classes": [3]}}, "gives 1 class: a classifier needs at least 2"),
    ({"overrides": {"data.name": "ONE_CLASS"}}, "gives 1 class: a classifier needs at least 2"),
    ({"overrides": {"runtime.workers": 64}}, "64 CPU, but this machine has"),
    ({"overrides": {"runtime.gpus_per_worker": 1}}, "GPU, but this machine has 0 GPU"),
    ({"space": "digits-smoke-lr", "overrides": {"data.rand_augment": "rand-mgarbage"}}, "must be a timm RandAugment string"),
    ({"seed": -1}, "--seed (the searcher's) must be >= 0"),
    ({"trials": 1_000_000_000}, "--trials must be 1 to 100000"),
    ({"name": ""}, "--name must not be empty"),
    ({"tracking_uri": "bogus://x"}, "unknown scheme 'bogus'"),
    ({"tracking_uri": "sqlite:///DIR"}, "is a directory, not a database file"),
    ({"tracking_uri": "postgresql://me:secret@127.0.0.1:1/db"}, "postgresql://me:***@127.0.0.1:1/db': the database server does not answer"),
    ({"tracking_uri": "mysql://me:secret@127.0.0.1:1/db"}, "mysql+pymysql://me:***@127.0.0.1:1/db': the database server does not answer"),
    ({"tracking_uri": "mssql+pyodbc://me:secret@127.0.0.1:1/db"}, "needs the Python driver 'pyodbc': pip install pyodbc"),
    ({"confirm": 2, "confirm_seeds": 1}, "--seeds must be 2 to 100"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[m[:40] for _, m in BAD_INPUTS])
def test_bad_input_a_trial_would_meet_is_refused_before_ray_in_one_line(workdir, args, message):
    """Inputs that used to fail only inside the trials (or never): refused while planning, nothing written."""
    from search.plan import SweepSpec, plan_sweep
    from spaces import RecipeSearchError, parse_space

    if args.get("overrides", {}).get("runtime.gpus_per_worker") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    (workdir / "notes.txt").write_text("not weights")
    fill = {
        "TEXT": str(workdir / "notes.txt"),
        "ONE_CLASS": _one_class_folder(workdir / "one") if "ONE_CLASS" in str(args) else "",
        "TEXT_IMAGES": _broken_folder(workdir / "text", "text") if "TEXT_IMAGES" in str(args) else "",
        "TRUNCATED": _broken_folder(workdir / "cut", "truncated") if "TRUNCATED" in str(args) else "",
    }
    args = json.loads(json.dumps(args).replace("sqlite:///DIR", f"sqlite:///{workdir}"))
    args["overrides"] = {k: fill.get(v, v) if isinstance(v, str) else v for k, v in args.get("overrides", {}).items()}
    space = args.pop("space", None)
    if space:  # a space that does not search the key the case sets
        args["space"] = parse_space({"name": space, "recipe": "digits-smoke", "params": {"optim.lr": {"choice": [0.1, 0.01]}}}, "test")
    spec = SweepSpec(**{"space": "rsb", "name": "bad", "storage": str(workdir / "runs"), **args})
    with pytest.raises(RecipeSearchError) as err:
        plan_sweep(spec)
    assert message in str(err.value) and "\n" not in str(err.value) and len(str(err.value)) < 400, str(err.value)
    assert not (workdir / "runs").exists() and not (workdir / "mlflow.db").exists()


def test_a_launch_that_fails_before_its_first_trial_leaves_its_name_free(tmp_path):
    from search.layout import LEASE_FILE, SPEC_FILE, STATE_FILE, live_lease
    from search.sweep import hold_lease

    sweep = tmp_path / "runs" / "s"
    with pytest.raises(RuntimeError):
        with hold_lease(str(sweep)):
            (sweep / SPEC_FILE).write_text("{}")
            assert live_lease(str(sweep))["pid"] == os.getpid()
            raise RuntimeError("the cluster refused the driver")
    assert not sweep.exists()  # the next launch may take the name
    with pytest.raises(RuntimeError):
        with hold_lease(str(sweep)):
            (sweep / SPEC_FILE).write_text("{}")
            (sweep / STATE_FILE).write_text("{}")  # a trial started: the sweep is kept, to resume
            raise RuntimeError("lost the head node")
    assert (sweep / SPEC_FILE).exists() and not (sweep / LEASE_FILE).exists() and live_lease(str(sweep)) is None


RACE = """
import os, sys, time
from search.sweep import hold_lease
from spaces import SweepError
sweep_dir, barrier = sys.argv[1], sys.argv[2]
open(os.path.join(barrier, f"ready.{os.getpid()}"), "w").close()
while not os.path.exists(os.path.join(barrier, "go")):  # every driver imported and waiting: they start together
    time.sleep(0.001)
try:
    with hold_lease(sweep_dir):
        while not os.path.exists(os.path.join(barrier, "release")):  # held until every other driver has tried
            time.sleep(0.1)
    print("held")
except SweepError as err:
    print("refused", err)
"""


@pytest.mark.parametrize("before", ["no lease", "a stale lease"])
def test_drivers_launched_at_the_same_instant_get_the_lease_once(workdir, before):
    """Taking the lease is atomic: of six drivers started in the same instant, one runs the sweep."""
    import time

    sweep_dir, barrier = workdir / "runs" / "race", workdir / "barrier"
    (sweep_dir / "recipe-search").mkdir(parents=True)
    barrier.mkdir()
    (sweep_dir / "recipe-search" / "state.json").write_text("{}")  # a sweep that exists (kept after the race)
    if before == "a stale lease":
        _lease(sweep_dir, "another-host", 4242, 600)
    env = {**os.environ, "PYTHONPATH": ROOT}
    drivers = [subprocess.Popen([sys.executable, "-c", RACE, str(sweep_dir), str(barrier)], env=env, stdout=subprocess.PIPE, text=True) for _ in range(6)]
    deadline = time.time() + 120
    while len([f for f in os.listdir(barrier) if f.startswith("ready.")]) < 6 and time.time() < deadline:
        assert all(d.poll() is None for d in drivers)
        time.sleep(0.1)
    (barrier / "go").write_text("")
    while sum(d.poll() is not None for d in drivers) < 5 and time.time() < deadline:
        time.sleep(0.1)
    (barrier / "release").write_text("")
    outputs = [d.communicate(timeout=60)[0] for d in drivers]
    assert sum(o.startswith("held") for o in outputs) == 1, outputs
    assert all(o.startswith("refused") and "is being run by another driver" in o for o in outputs if not o.startswith("held")), outputs
    assert sorted(os.listdir(sweep_dir / "recipe-search")) == ["state.json"]  # the lease released, no lock or temporary left


def test_an_address_that_takes_tcp_but_is_not_ray_is_one_line_within_seconds(workdir):
    """Such an address used to hang ``ray.init`` for minutes, or end in an 85-line traceback."""
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    threading.Thread(target=lambda: [server.accept() for _ in range(100)], daemon=True).start()  # takes, never answers
    address = f"127.0.0.1:{server.getsockname()[1]}"
    started = time.monotonic()
    result = run(["sweep", "--address", address, "--trials", "1"], workdir)
    assert result.returncode == 2 and result.stderr == f"error: Ray address {address!r} takes connections but is not Ray (no gRPC answer in 5 s)\n"
    assert time.monotonic() - started < 60 and os.listdir(workdir) == []
    server.close()


def test_resume_refuses_to_unpickle_from_a_folder_others_can_write(workdir):
    """Resume loads Tune's and the searcher's pickles from the sweep folder: on shared storage, whoever can
    write them could run code as the user who resumes."""
    from search.layout import STATE_FILE

    sweep_dir = _damaged_sweep(workdir, "a bad driver", STATE_FILE)
    spec_file = sweep_dir / "recipe-search" / "sweep.json"
    spec_file.write_text(spec_file.read_text().replace('"format": 2', '"format": 1'))  # past this check: "another version"
    os.chmod(sweep_dir, 0o755)
    os.chmod(sweep_dir / "recipe-search", 0o755)
    pickle = sweep_dir / "tuner.pkl"
    pickle.write_bytes(b"\x80\x04N.")
    cases = [
        (sweep_dir, 0o777, f"{str(sweep_dir)!r} is writable by other users (mode 777)"),
        (pickle, 0o646, f"{str(pickle)!r} is writable by other users (mode 646)"),
        (pickle, 0o644, "another version of recipe-search"),
    ]
    for path, mode, message in cases:
        os.chmod(path, mode)
        commands = [["resume", "hurt"]] + [["confirm", "hurt", "--top", "2", "--seeds", "2"]] * (path == sweep_dir)
        for command in commands:
            result = run([*command, "--storage", str(workdir / "runs")], workdir)
            assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
        os.chmod(path, 0o755)
    if os.getuid() == 0:  # another group's and another user's files: only root can make them here
        os.chmod(pickle, 0o664)
        os.chown(pickle, 0, 65534)  # writable by the group nogroup
        result = run(["resume", "hurt", "--storage", str(workdir / "runs")], workdir)
        assert result.returncode == 2 and f"{str(pickle)!r} is writable by other users (mode 664)" in result.stderr, result.stderr
        os.chmod(pickle, 0o644)
        os.chown(pickle, 65534, 65534)
        result = run(["resume", "hurt", "--storage", str(workdir / "runs")], workdir)
        assert result.returncode == 2 and f"{str(pickle)!r} belongs to another user (uid 65534)" in result.stderr, result.stderr


def test_database_uris_as_users_write_them_and_a_missing_driver_names_the_extra(monkeypatch):
    import importlib.util

    from search.tracking import check_tracking_uri, resolve_tracking_uri
    from spaces import SweepError

    assert resolve_tracking_uri("postgres://me@db:5432/runs") == "postgresql://me@db:5432/runs"
    assert resolve_tracking_uri("mysql://me@db/runs") == "mysql+pymysql://me@db/runs"  # the [mysql] extra's driver
    find_spec, drivers = importlib.util.find_spec, ("psycopg", "psycopg2", "pymysql", "MySQLdb")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name in drivers else find_spec(name, *args))
    for name in drivers:  # not installed: importing them fails
        monkeypatch.setitem(sys.modules, name, None)
    cases = [
        ("postgresql://me:pw@127.0.0.1:1/runs", "'psycopg': pip install 'recipe-search[postgres]'"),
        ("postgresql+psycopg2://me:pw@127.0.0.1:1/runs", "'psycopg2': pip install 'recipe-search[postgres]'"),
        ("mysql://me:pw@127.0.0.1:1/runs", "'MySQLdb': pip install 'recipe-search[mysql]' and write mysql+pymysql://"),
        ("mysql+pymysql://me:pw@127.0.0.1:1/runs", "'pymysql': pip install 'recipe-search[mysql]'"),
    ]
    for uri, message in cases:
        with pytest.raises(SweepError, match="needs the Python driver") as err:
            check_tracking_uri(resolve_tracking_uri(uri))
        assert message in str(err.value) and "pw" not in str(err.value), str(err.value)
