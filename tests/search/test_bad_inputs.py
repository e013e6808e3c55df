"""Bad input to every command: one line ``error: ...`` on stderr, exit 2, nothing on stdout, nothing written, no Ray.

One table, run in-process (``search.cli.main`` with ``sys.argv`` set) so that a hundred and more cases cost
seconds, not a Python start each. Every case must be refused before Ray could start: planning that accepts
a case fails the test instead of going on (see ``no_launch``).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import pytest

from search import cli

MAX_SECONDS = 20  # per case: a bound against hangs (a retrying connection, an alias bomb), not a benchmark
MAX_LINE = 1100  # characters: main() bounds what the library says, and usage errors tighter still
HUGE = "x" * 100_000  # an argument as long as a shell passes
LONG = "x" * 300  # a path component longer than a file name may be (255)


# --------------------------------------------------------------------------- files a case sets up


def _write(root: Path, files: dict[str, Any]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content))  # NaN and Infinity as Python's json writes them


def _image_folder(root: Path, name: str, classes: dict[str, list[str]], png: bool) -> None:
    """An ImageFolder: split/class/file, real PNGs or text named as images."""
    from PIL import Image

    for where, files in classes.items():
        folder = root / name / where
        folder.mkdir(parents=True, exist_ok=True)
        for file in files:
            if png:
                Image.new("RGB", (8, 8)).save(folder / file)
            else:
                (folder / file).write_text("not an image")


def one_class(root: Path) -> None:
    _image_folder(root, "one", {"train/only": ["a.png"], "val/only": ["b.png"]}, png=True)


def no_val(root: Path) -> None:
    _image_folder(root, "img", {"train/a": ["a.png"], "train/b": ["b.png"]}, png=True)


def empty_class(root: Path) -> None:
    _image_folder(root, "img", {"train/a": ["a.txt"], "train/b": ["b.txt"], "val/a": ["c.txt"], "val/b": ["d.txt"]}, png=False)


def undecodable(root: Path) -> None:
    _image_folder(root, "img", {"train/a": ["a.png"], "train/b": ["b.png"], "val/a": ["c.png"], "val/b": ["d.png"]}, png=False)


def no_classes(root: Path) -> None:
    (root / "plain" / "train").mkdir(parents=True)
    (root / "plain" / "val").mkdir()


def alias_bomb(root: Path) -> None:
    """Billion laughs: 9 levels of 9 aliases, 387 million strings once expanded."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    (root / "bomb.yaml").write_text("\n".join(lines) + "\n")


def huge_yaml(root: Path) -> None:
    (root / "huge.yaml").write_text("# padding\n" * 120_000)  # 1.2 MB


STATE = {"name": "s", "trials": {}, "num_samples": 2, "metric": "val/top1", "mode": "max"}
BEST = {"trial_id": "t1", "metric": "val/top1", "mode": "max", "value": 0.5, "mlflow_run_id": "r1", "recipe": {"task": "classification"}}


def sweep_dir(name: str = "s", state: Any = None, spec: Any = None) -> Callable[[Path], None]:
    """A sweep folder under runs/: its spec as a launch writes it (or ``spec``), and ``state.json`` if given."""

    def build(root: Path) -> None:
        from search.layout import SPEC_FILE, STATE_FILE, SWEEP_FORMAT
        from search.plan import SweepSpec

        folder = root / "runs" / name
        (folder / SPEC_FILE).parent.mkdir(parents=True)
        written = spec if spec is not None else {
            **SweepSpec(space="rsb", name=name, storage=str(root / "runs")).to_json(),
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "format": SWEEP_FORMAT,
        }
        (folder / SPEC_FILE).write_text(written if isinstance(written, str) else json.dumps(written))
        if state is not None:
            (folder / STATE_FILE).write_text(state if isinstance(state, str) else json.dumps(state))

    return build


DONE = sweep_dir("done", {**STATE, "finished": True, "best": BEST})
NOTES = {"notes.txt": "not weights\n"}

# A ground truth (two images, categories 1 and 3) and a detection that fits it.
GT = {
    "images": [{"id": 1, "file_name": "1.png", "height": 80, "width": 100}, {"id": 2, "file_name": "2.png", "height": 80, "width": 100}],
    "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100.0, "iscrowd": 0,
         "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]]},
        {"id": 11, "image_id": 2, "category_id": 3, "bbox": [5, 5, 20, 10], "area": 200.0, "iscrowd": 0,
         "segmentation": [[5, 5, 25, 5, 25, 15, 5, 15]]},
    ],
}
DET = {"image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "score": 0.9, "segmentation": {"size": [80, 100], "counts": "PPYo1"}}


def gt_with(annotation: dict[str, Any] | None = None, image: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """GT with its second annotation (id 11) or first image changed, or top-level keys replaced."""
    gt = copy.deepcopy(GT)
    gt["annotations"][1].update(annotation or {})
    gt["images"][0].update(image or {})
    gt.update(top)
    return gt


def coco(gt: Any = None, dets: Any = None) -> dict[str, Any]:
    return {"gt.json": GT if gt is None else gt, "dets.json": [DET] if dets is None else dets}


def space_yaml(params: str, head: str = "name: s\nrecipe: digits-smoke\n") -> dict[str, str]:
    return {"s.yaml": head + "params:\n" + params}


ONE_CHOICE = "  optim.lr: {choice: [0.1, 0.01]}\n"


# --------------------------------------------------------------------------- the table

CASES: list[tuple[list[str], str, tuple[Any, ...]]] = [
    # typer's own parsing: one line through main(), with where to find help
    (["nope"], "No such command 'nope'", ()),
    ([HUGE], "No such command 'xxxx", ()),
    (["--version"], "No such option: --version", ()),
    (["-h"], "No such option: -h", ()),
    (["sweep", "--bogus"], "No such option: --bogus (see '", ()),
    (["sweep", "--" + HUGE], "No such option: --xxxx", ()),
    (["sweep", "--trials", "x"], "Invalid value for '--trials'", ()),
    (["sweep", "--trials", "1.5"], "Invalid value for '--trials'", ()),
    (["sweep", "--trials"], "Option '--trials' requires an argument", ()),
    (["sweep", "--seed", HUGE], "Invalid value for '--seed'", ()),
    (["sweep", "--gpus-per-worker", "abc"], "Invalid value for '--gpus-per-worker'", ()),
    (["sweep", "--log-checkpoint=yes"], "does not take a value", ()),
    (["sweep", "rsb", "extra"], "Got unexpected extra argument(s) (extra)", ()),
    (["train"], "Missing argument 'recipe'", ()),
    (["train", "rsb-digits", "--cpus-per-worker", "abc"], "Invalid value for '--cpus-per-worker'", ()),
    (["resume"], "Missing argument 'NAME_OR_PATH'", ()),
    (["status", "s", "--json=1"], "does not take a value", ()),
    (["confirm", "nope", "--top", "x"], "Invalid value for '--top'", ()),
    (["study"], "Missing argument 'STUDY'", ()),
    (["recipes", "a", "b"], "Got unexpected extra argument(s) (b)", ()),
    (["spaces", "--json"], "No such option: --json", ()),
    (["report"], "Missing argument 'NAME_OR_PATH'", ()),
    (["dashboard", "nope", "--port", "x"], "Invalid value for '--port'", ()),
    (["hyperrule"], "Missing option '--examples'", ()),
    (["hyperrule", "--examples", "100"], "Missing option '--image-size'", ()),
    (["hyperrule", "--examples", "x", "--image-size", "32"], "Invalid value for '--examples'", ()),
    (["coco-eval", "gt.json"], "Missing argument 'DETS.json'", ()),
    (["ui", "--port", "x"], "Invalid value for '--port'", ()),
    (["ui", "extra"], "Got unexpected extra argument(s) (extra)", ()),
    # sweep flags, refused while planning
    (["sweep", "--trials", "-5"], "--trials must be 1 to 100000, but got -5", ()),
    (["sweep", "--trials", "100001"], "--trials must be 1 to 100000, but got 100001", ()),
    (["sweep", "--trials", "99999999999999999999999"], "--trials must be 1 to 100000", ()),
    (["sweep", "--concurrency", "0"], "--concurrency must be at least 1, but got 0", ()),
    (["sweep", "--grace-period", "0"], "grace period must be at least 1", ()),
    (["sweep", "--seed", "-1"], "--seed (the searcher's) must be >= 0", ()),
    (["sweep", "--name", "a b"], "--name must be letters, digits", ()),
    (["sweep", "--name", "../escape"], "--name must be letters, digits", ()),
    (["sweep", "--name", "n" * 129], "(at most 128)", ()),
    (["sweep", "--name", HUGE], "--name must be letters, digits", ()),
    (["sweep", "--name", ""], "--name must not be empty", ()),
    (["sweep", "--confirm", "5", "--trials", "2"], "--confirm 5 asks for more recipes than the sweep's 2 trial(s)", ()),
    (["sweep", "--confirm", "2", "--seeds", "1"], "--seeds must be 2 to 100", ()),
    (["sweep", "--confirm", "-1"], "--top (--confirm) must be at least 1", ()),
    (["sweep", "--optuna-storage", "redis://127.0.0.1"], "--optuna-storage takes an RDB URL", ()),
    (["sweep", "--optuna-storage", HUGE], "--optuna-storage takes an RDB URL", ()),
    (["sweep", "--scheduler", ""], "unknown scheduler ''", ()),
    (["sweep", "--searcher", "TPE"], "unknown searcher 'TPE'", ()),
    (["sweep", "--searcher", HUGE], "unknown searcher 'xxxx", ()),
    (["sweep", "--workers", "-1"], "runtime.workers: input should be greater than or equal to 1", ()),
    (["sweep", "--cpus-per-worker", "0"], "runtime.cpus_per_worker: input should be greater than 0", ()),
    (["sweep", "--cpus-per-worker", "nan"], "runtime.cpus_per_worker", ()),
    (["sweep", "--gpus-per-worker", "-1"], "runtime.gpus_per_worker", ()),
    (["sweep", "--cpus-per-worker", "1000"], "x 1000 CPU = 1000 CPU, but this machine has", ()),
    (["sweep", "--storage", "notes.txt"], "cannot be written", (NOTES,)),
    (["sweep", "--tracking-uri", "bogus://x"], "unknown scheme 'bogus'", ()),
    (["sweep", "--tracking-uri", "sqlite:///."], "is a directory, not a database file", ()),
    (["sweep", "--tracking-uri", "sqlite:///nodir/mlflow.db"], "cannot write in", ()),
    (["sweep", "--tracking-uri", "https://127.0.0.1:9"], "does not answer", ()),
    (["sweep", "--tracking-uri", "http://" + HUGE], "MLflow tracking URI 'http://xxxx", ()),  # main() cuts the line
    (["sweep", "--tracking-uri", "postgresql://me:hush@127.0.0.1:1/runs"], "'postgresql://me:***@127.0.0.1:1/runs'", ()),
    (["sweep", "--address", "127.0.0.1:notaport"], "does not answer", ()),
    (["sweep", "--address", "ray://127.0.0.1:9"], "does not answer", ()),
    # data folders
    (["sweep", "--data", "digits-det"], "is a detection dataset", ()),
    (["sweep", "--data", "notes.txt"], "dataset path 'notes.txt'", (NOTES,)),
    (["sweep", "--data", "plain"], "has no class folders", (no_classes,)),
    (["sweep", "--data", "one"], "gives 1 class: a classifier needs at least 2", (one_class,)),
    (["sweep", "--data", "img"], "has no val/ folder", (no_val,)),
    (["sweep", "--data", "img"], "holds no images", (empty_class,)),
    (["sweep", "--data", "img"], "cannot be decoded", (undecodable,)),
    (["sweep", "det", "--data", "coco"], "has no train split", ({"coco/annotations/instances_train.json": {}},)),
    (["sweep", "det", "--set", "data.name=/no/coco/root"], "has no annotations/ folder", ()),
    (["sweep", "rethinking", "--data", "digits"], "is a classification dataset", ()),
    # bad --set values
    (["sweep", "--set", "model.init=notes.txt"], "is not a checkpoint", (NOTES,)),
    (["sweep", "--set", "model.init=pretrained"], "model.init=pretrained needs a checkpoint", ()),
    (["sweep", "--set", "model.pretrained=run:nope"], "no sweep 'nope'", ()),
    (["sweep", "--set", "model.name=resnet_nope"], "timm has no such model", ()),
    (["sweep", "--set", "model.name=[1,2]"], "model.name: input should be a valid string", ()),
    (["sweep", "--set", "data.classes=[0,1,99]"], "names class 99", ()),
    (["sweep", "--set", "data.classes=[3]"], "gives 1 class", ()),
    (["sweep", "--set", "data.shots_per_class=100000"], "fewer than shots=100000", ()),
    (["sweep", "--set", "data.name="], "data.name: string should have at least 1 character", ()),
    (["sweep", "--set", "optim.batch_size=100000"], "exceeds the 1437 training images", ()),
    (["sweep", "--set", "optim.batch_size=0"], "optim.batch_size: input should be greater than or equal to 1", ()),
    (["sweep", "--set", "optim.batch_size=abc"], "optim.batch_size: input should be a valid integer", ()),
    (["sweep", "--set", "schedule.epochs=-3"], "schedule.epochs: input should be greater than or equal to 1", ()),
    (["sweep", "--set", "schedule.epochs=1e9"], "schedule.epochs: input should be a valid integer", ()),
    (["sweep", "--set", "runtime.seed=-1"], "runtime.seed", ()),
    (["sweep", "--set", "runtime.workers=64"], "64 worker(s)", ()),
    (["sweep", "--set", "runtime.gpus_per_worker=64"], "x 64 GPU, but this machine has", ()),
    (["sweep", "--set", "optim.lr"], "--set takes KEY=VALUE, but got 'optim.lr'", ()),
    (["sweep", "--set", "=1"], "--set takes KEY=VALUE", ()),
    (["sweep", "--set", "optim..lr=1"], "unknown recipe key 'optim..lr'", ()),
    (["sweep", "--set", HUGE + "=1"], "unknown recipe key 'xxxx", ()),
    (["sweep", "--set", "reg.label_smoothing=nan"], "fixes a key that space 'rsb' searches", ()),
    (["sweep", "--set", "task=segmentation"], "task must be one of classification, detection", ()),
    (["sweep", "--set", "task=detection"], "is a classification key", ()),
    (["sweep", "det", "--set", "model.anchor_sizes=[8]"], "must be 5 positive sizes", ()),
    (["sweep", "det", "--set", "schedule.iterations=0"], "schedule.iterations", ()),
    (["sweep", "s.yaml", "--set", "data.rand_augment=rand-mgarbage"], "must be a timm RandAugment string", (space_yaml(ONE_CHOICE),)),
    # space and recipe files
    (["sweep", "missing.yaml"], "space file 'missing.yaml' does not exist", ()),
    (["sweep", "bomb.yaml"], "invalid space 'bomb.yaml'", (alias_bomb,)),
    (["sweep", "huge.yaml"], "is over 1 MB", (huge_yaml,)),
    (["sweep", "s.yaml", "--searcher", "grid", "--confirm", "3"], "--confirm 3 asks for more recipes than the sweep's 2 trial(s)", (space_yaml(ONE_CHOICE),)),
    (["sweep", "s.yaml"], "uniform bounds must have low < high", (space_yaml("  optim.lr: {uniform: [0.1, 0.01]}\n"),)),
    (["sweep", "--recipe", "missing.yaml"], "recipe file 'missing.yaml' does not exist", ()),
    (["sweep", "--recipe", "bomb.yaml"], "unknown recipe key 'a0'", (alias_bomb,)),
    (["sweep", "--recipe", "scratch-det-digits"], "recipe scratch-det-digits is detection", ()),
    (["spaces", "nope"], "unknown space 'nope'", ()),
    (["spaces", "bomb.yaml"], "invalid space 'bomb.yaml'", (alias_bomb,)),
    (["spaces", "s.yaml"], "must be a mapping with name, recipe and params", ({"s.yaml": "- a\n- b\n"},)),
    (["spaces", "s.yaml"], "must be a mapping with name, recipe and params", ({"s.yaml": ""},)),
    (["spaces", "s.yaml"], "is not valid YAML", ({"s.yaml": "name: [\n"},)),
    (["spaces", "s.yaml"], "could not determine a constructor", ({"s.yaml": "!!python/object/apply:os.system [echo hi]\n"},)),
    (["spaces", "s.yaml"], "params: Input should be a valid dictionary", (space_yaml(" 3\n"),)),
    (["spaces", "s.yaml"], "gauss: Extra inputs are not permitted", (space_yaml("  optim.lr: {gauss: [1, 2]}\n"),)),
    (["spaces", "s.yaml"], "unknown recipe key 'optim.nope'", (space_yaml("  optim.nope: {uniform: [0.1, 0.2]}\n"),)),
    (["spaces", "s.yaml"], "bogus: Extra inputs are not permitted", (space_yaml(ONE_CHOICE, "name: s\nrecipe: digits-smoke\nbogus: 1\n"),)),
    (["spaces", "s.yaml"], "name: Input should be a valid string", (space_yaml(ONE_CHOICE, "name: 5\nrecipe: digits-smoke\n"),)),
    (["spaces", "s.yaml"], "recipe: Input should be a valid string", (space_yaml(ONE_CHOICE, "name: s\nrecipe: [1]\n"),)),
    (["spaces", "s.yaml"], "unknown recipe 'nope'", (space_yaml(ONE_CHOICE, "name: s\nrecipe: nope\n"),)),
    (["spaces", "s.yaml"], "mode: Input should be 'max' or 'min'", (space_yaml(ONE_CHOICE, "name: s\nrecipe: digits-smoke\nmode: maximize\n"),)),
    (["spaces", "s.yaml"], "choice needs at least one value", (space_yaml("  optim.lr: {choice: []}\n"),)),
    (["spaces", "s.yaml"], "choice takes at most 1000 values", (space_yaml("  optim.lr: {choice: [" + ", ".join(["0.1"] * 1001) + "]}\n"),)),
    (["spaces", "s.yaml"], "Input should be a valid number", (space_yaml("  optim.lr: {uniform: [a, b]}\n"),)),
    (["spaces", "s.yaml"], "loguniform needs low > 0", (space_yaml("  optim.lr: {loguniform: [0, 1]}\n"),)),
    (["spaces", "s.yaml"], "uniform bounds must have low < high, but got [nan", (space_yaml("  optim.lr: {uniform: [.nan, 0.01]}\n"),)),
    (["spaces", "s.yaml"], "allows inf, which the recipe rejects", (space_yaml("  optim.lr: {uniform: [0.1, .inf]}\n"),)),
    (["spaces", "s.yaml"], "takes one distribution", (space_yaml("  optim.lr: {int: [1, 5], uniform: [1, 2]}\n"),)),
    (["spaces", "s.yaml"], "must be a mapping such as {uniform: [0, 1]}", (space_yaml("  optim.lr: 0.1\n"),)),
    (["spaces", "s.yaml"], "unknown optimizer 'sgd2'", (space_yaml("  optim.lr: {uniform: [0.1, 0.2], when: {optim.name: [sgd2]}}\n"),)),
    (["spaces", "s.yaml"], "when: unknown recipe key 'optim.nope'",
     (space_yaml(ONE_CHOICE + "  optim.momentum: {choice: [0.9], when: {optim.nope: [1]}}\n"),)),
    (["recipes", "nope", "--json"], "unknown recipe 'nope'", ()),
    (["recipes", "nope.yml"], "recipe file 'nope.yml' does not exist", ()),
    (["recipes", "bomb.yaml"], "unknown recipe key 'a0'", (alias_bomb,)),
    (["recipes", "huge.yaml"], "is over 1 MB", (huge_yaml,)),
    (["recipes", "r.yaml"], "must hold a mapping of recipe keys", ({"r.yaml": "- a\n"},)),
    (["recipes", "r.yaml"], "could not determine a constructor", ({"r.yaml": "!!python/object/apply:os.system [echo hi]\n"},)),
    (["recipes", "r.yaml"], "optim.lr: input should be greater than 0", ({"r.yaml": "optim: {lr: -1}\n"},)),
    (["recipes", "r.yaml"], "optim.lr", ({"r.yaml": "optim: {lr: .nan}\n"},)),
    (["recipes", "r.yaml"], "unknown recipe key 'optim.lrr'", ({"r.yaml": "optim: {lrr: 1}\n"},)),
    (["recipes", "r.yaml"], "unknown recipe key 'optim'", ({"r.yaml": "optim: 3\n"},)),
    (["recipes", "r.yaml"], "input should be 'mask_rcnn' or 'faster_rcnn'", ({"r.yaml": "task: detection\nmodel: {name: resnet18}\n"},)),
    (["recipes", "r.yaml"], "schedule.epochs: input should be a valid integer", ({"r.yaml": "schedule: {epochs: ten}\n"},)),
    (["recipes", "r.yaml"], "data.classes: must be distinct class indices", ({"r.yaml": "data: {name: digits, classes: [1, 1]}\n"},)),
    (["recipes", "r.yaml"], "runtime.workers: input should be a finite number", ({"r.yaml": "runtime: {workers: .inf}\n"},)),
    (["recipes", "rsb-digits", "--set", "optim.lr=-1"], "optim.lr: input should be greater than 0", ()),
    (["recipes", "rsb-digits", "--set", "noequals"], "--set takes KEY=VALUE", ()),
    (["recipes", "rsb-digits", "--set", "optim.lr=[[[[[[[[[[[[1]]]]]]]]]]]]"], "optim.lr: input should be a valid number", ()),
    (["recipes", "scratch-det-digits", "--set", "schedule.epochs=5"], "schedule.epochs is a classification key", ()),
    # train
    (["train", "rsb-digits", "--name", "bad name"], "--name must be letters, digits", ()),
    (["train", "rsb-digits", "extra-arg"], "Got unexpected extra argument(s) (extra-arg)", ()),
    (["train", "scratch-det-digits", "--data", "digits"], "is a classification dataset", ()),
    (["train", "rsb-digits", "--storage", "/proc/nope"], "cannot be written", ()),
    (["train", "rsb-digits", "--tracking-uri", "http://127.0.0.1:9/mlflow"], "does not answer", ()),
    (["train", "rsb-digits", "--set", "schedule.epochs=1.5"], "fractional part", ()),
    (["train", "rsb-digits", "--set", "optim.name=lamb", "--set", "optim.momentum=0.9"], "does not apply to recipe rsb-digits", ()),
    (["train", "scratch-det-digits", "--set", "model.anchor_sizes=[8,16,32,64,-1]"], "must be 5 positive sizes", ()),
    (["train", "scratch-det-digits", "--set", "data.fraction=0"], "data.fraction", ()),
    (["train", "bit-digits", "--set", "model.name=nope_nope"], "timm has no such model", ()),
    (["train", "huge.yaml"], "is over 1 MB", (huge_yaml,)),
    (["train", "r.yaml"], "must hold a mapping of recipe keys", ({"r.yaml": ""},)),
    # study
    (["study", "rethinking", "--seeds", "5"], "are options of study rsb", ()),
    (["study", "rsb", "--recipe", "rsb-a3"], "are options of study rethinking", ()),
    (["study", "rsb", "--schedules", "1,3"], "are options of study rethinking", ()),
    (["study", "rethinking", "--schedules", ""], "--schedules takes multipliers", ()),
    (["study", "rethinking", "--schedules", "-1"], "--schedules takes multipliers", ()),
    (["study", "rethinking", "--schedules", "nan"], "--schedules takes multipliers", ()),
    (["study", "rethinking", "--fractions", "1.5"], "--fractions takes data fractions in (0, 1]", ()),
    (["study", "rethinking", "--fractions", "a"], "--fractions takes comma-separated numbers", ()),
    (["study", "rethinking", "--recipe", "rsb-digits"], "does not apply to recipe rsb-digits", ()),
    (["study", "rethinking", "--pretrained", "notes.txt"], "is not a checkpoint", (NOTES,)),
    (["study", "rsb", "--seeds", "1"], "--seeds must be 2 to 100", ()),
    (["study", "rsb", "--epochs", "0"], "--epochs (A3's", ()),
    (["study", "rsb", "--data", "digits-det"], "is a detection dataset", ()),
    (["study", "rsb", "--name", "a/b"], "--name must be letters, digits", ()),
    (["study", "rsb", "--tracking-uri", "bogus://x"], "unknown scheme 'bogus'", ()),
    # sweeps on disk: resume, status, best, confirm, report, dashboard
    (["resume", "plain"], "is not a sweep directory", (no_classes,)),
    (["best", "s"], "is damaged (not JSON", (sweep_dir(state='{"name": "s", "trials": {"a": {"sta'),)),
    (["best", "s", "--json"], "is damaged (a JSON list", (sweep_dir(state=[]),)),
    (["resume", "s", "--tracking-uri", "bogus://x"], "unknown scheme 'bogus'", (sweep_dir(),)),
    (["resume", "s"], "cannot read recipe-search/sweep.json", (sweep_dir(spec="{not json"),)),
    (["resume", "s"], "unexpected keyword argument 'bogus'", (sweep_dir(spec={"space": "rsb", "bogus": 1}),)),
    (["resume", "s"], "unknown space 'nope'", (sweep_dir(spec={"space": "nope", "format": 2}),)),
    (["status", "nope", "--json"], "no sweep 'nope'", ()),
    (["status", "s"], "trial 'a' has no status or config", (sweep_dir(state={**STATE, "trials": {"a": 3}}),)),
    (["status", "s", "--json"], "is damaged (a JSON list", (sweep_dir(state=[]),)),
    (["status", "s"], "has no recorded state yet", (sweep_dir(),)),
    (["status", "s"], "is damaged (no str 'metric')", (sweep_dir(state={**STATE, "metric": 3}),)),
    (["best", "nope", "--json"], "no sweep 'nope'", ()),
    (["best", "s"], "has no finished trial with a result yet", (sweep_dir(state=STATE),)),
    (["best", "s"], "its best trial has no recipe or value", (sweep_dir(state={**STATE, "best": {"trial_id": "a"}}),)),
    (["best", "done", "-o", "."], "-o/--output '.' is a directory", (DONE,)),
    (["best", "done", "-o", "nodir/best.yaml"], "its folder", (DONE,)),
    (["best", "done", "-o", "notes.txt/best.yaml"], "its folder", (DONE, NOTES)),
    (["best", "done", "-o", "/proc/best.yaml"], "cannot be written", (DONE,)),
    (["best", "done", "-o", HUGE], "cannot be written (File name too long)", (DONE,)),
    (["best", "done", "-o", ""], "-o/--output takes a file path, but got an empty one", (DONE,)),
    (["best", "done", "-o"], "Option '-o' requires an argument", (DONE,)),
    (["confirm", "nope", "--top", "0"], "--top (--confirm) must be at least 1", ()),
    (["confirm", "nope", "--seeds", "101"], "--seeds must be 2 to 100", ()),
    (["status", "s", "--json"], "is damaged (not JSON", (sweep_dir(state='{"name"'),)),
    (["report", "nope"], "no sweep 'nope'", ()),
    (["report", "s"], "is damaged (not JSON", (sweep_dir(state="\x00\x01"),)),
    (["report", "s"], "has no recorded state yet", (sweep_dir(),)),
    (["report", "s"], "cannot read recipe-search/sweep.json", (sweep_dir(spec=[]),)),
    (["dashboard", "nope"], "no sweep 'nope'", ()),
    (["dashboard", "s"], "has no Optuna study", (sweep_dir(spec={"space": "rsb", "optuna_storage": None}),)),
    # hyperrule
    (["hyperrule", "--examples", "0", "--image-size", "32"], "hyperrule examples must be >= 1, but got 0", ()),
    (["hyperrule", "--examples", "-1", "--image-size", "32"], "hyperrule examples must be >= 1, but got -1", ()),
    (["hyperrule", "--examples", "100", "--image-size", "0"], "hyperrule image_size must be >= 1", ()),
    (["hyperrule", "--examples", "100", "--image-size", "32", "--batch-size", "0"], "hyperrule batch_size must be >= 1", ()),
    # coco-eval: the files, then each box, id and mask
    (["coco-eval", "gt.json", "dets.json", "--iou-type", "keypoints"], "--iou-type must be one of bbox, segm", (coco(),)),
    (["coco-eval", "missing.json", "dets.json"], "ground truth file 'missing.json' does not exist", (coco(),)),
    (["coco-eval", ".", "dets.json"], "is a directory, not a JSON file", (coco(),)),
    (["coco-eval", HUGE, "dets.json"], "cannot be read: File name too long", (coco(),)),
    (["coco-eval", "gt.json", "dets.json"], "is not JSON text", (coco(gt=bytes(range(256))),)),
    (["coco-eval", "gt.json", "dets.json"], "nests its JSON too deeply", (coco(gt="[" * 100_000 + "]" * 100_000),)),
    (["coco-eval", "gt.json", "dets.json"], "'annotations' is missing", (coco(gt={"images": [], "categories": []}),)),
    (["coco-eval", "gt.json", "dets.json"], "annotations[1] has bbox [1, 1, -1, 5], with a width or height < 0 (annotation id 11)",
     (coco(gt=gt_with({"bbox": [1, 1, -1, 5]})),)),
    (["coco-eval", "gt.json", "dets.json"], "annotations[1] has bbox [1, 1, 5, -5], with a width or height < 0",
     (coco(gt=gt_with({"bbox": [1, 1, 5, -5]})),)),
    (["coco-eval", "gt.json", "dets.json"], "has bbox [1, 1, nan, 5], with a value that is not a finite number (annotation id 11)",
     (coco(gt=gt_with({"bbox": [1, 1, float("nan"), 5]})),)),
    (["coco-eval", "gt.json", "dets.json"], "with a value that is not a finite number", (coco(gt=gt_with({"bbox": [1, float("inf"), 5, 5]})),)),
    (["coco-eval", "gt.json", "dets.json"], "with a value that is not a finite number", (coco(gt=gt_with({"bbox": [True, 1, 5, 5]})),)),
    (["coco-eval", "gt.json", "dets.json"], "has bbox [1, 1, 5], not a list of 4 numbers (annotation id 11)", (coco(gt=gt_with({"bbox": [1, 1, 5]})),)),
    (["coco-eval", "gt.json", "dets.json"], "not a list of 4 numbers", (coco(gt=gt_with({"bbox": "1,1,5,5"})),)),
    (["coco-eval", "gt.json", "dets.json"], "with a value that is not a finite number", (coco(gt=gt_with({"bbox": [1, 1, 5, HUGE]})),)),
    (["coco-eval", "gt.json", "dets.json"], "has area 'big', not a number >= 0", (coco(gt=gt_with({"area": "big"})),)),
    (["coco-eval", "gt.json", "dets.json"], "has area -5, not a number >= 0", (coco(gt=gt_with({"area": -5})),)),
    (["coco-eval", "gt.json", "dets.json"], "has iscrowd 'yes', not 0 or 1", (coco(gt=gt_with({"iscrowd": "yes"})),)),
    (["coco-eval", "gt.json", "dets.json"], "has iscrowd 2, not 0 or 1", (coco(gt=gt_with({"iscrowd": 2})),)),
    (["coco-eval", "gt.json", "dets.json"], "annotations[1] has id 10, as annotations[0] does; ids are unique", (coco(gt=gt_with({"id": 10})),)),
    (["coco-eval", "gt.json", "dets.json"], "annotations[1] has id [1]; ids are integers", (coco(gt=gt_with({"id": [1]})),)),
    (["coco-eval", "gt.json", "dets.json"], "names image_id None, which is not in images (annotation id 11)", (coco(gt=gt_with({"image_id": None})),)),
    (["coco-eval", "gt.json", "dets.json"], "names category_id 99, which is not in categories", (coco(gt=gt_with({"category_id": 99})),)),
    (["coco-eval", "gt.json", "dets.json"], "images[0] has height '80'", (coco(gt=gt_with(image={"height": "80"})),)),
    (["coco-eval", "gt.json", "dets.json"], "images[0] has width 0", (coco(gt=gt_with(image={"width": 0})),)),
    (["coco-eval", "gt.json", "dets.json"], "images[2] has id 1, as images[0] does", (coco(gt={**GT, "images": GT["images"] + GT["images"][:1]}),)),
    (["coco-eval", "gt.json", "dets.json"], "categories[2] has id 1, as categories[0] does", (coco(gt={**GT, "categories": GT["categories"] + GT["categories"][:1]}),)),
    (["coco-eval", "gt.json", "dets.json", "--iou-type", "segm"], "a segmentation that is not an RLE object with size and counts, nor a list of polygons",
     (coco(gt=gt_with({"segmentation": "poly"})),)),
    (["coco-eval", "gt.json", "dets.json", "--iou-type", "segm"], "nor a list of polygons", (coco(gt=gt_with({"segmentation": [[1, 1, 5, 5]]})),)),
    (["coco-eval", "gt.json", "dets.json", "--iou-type", "segm"], "an RLE whose counts do not cover 80x100 pixels",
     (coco(gt=gt_with({"segmentation": {"size": [80, 100], "counts": [5, 5]}})),)),
    (["coco-eval", "gt.json", "dets.json"], "detection 0 has bbox [1, 1, -2, 5], with a width or height < 0", (coco(dets=[{**DET, "bbox": [1, 1, -2, 5]}]),)),
    (["coco-eval", "gt.json", "dets.json"], "detection 1 has bbox [1, 1, 5, -1]", (coco(dets=[DET, {**DET, "bbox": [1, 1, 5, -1]}]),)),
    (["coco-eval", "gt.json", "dets.json"], "detection 0 has bbox [1, nan, 10, 10]", (coco(dets=[{**DET, "bbox": [1, float("nan"), 10, 10]}]),)),
    (["coco-eval", "gt.json", "dets.json"], "detection 0 has bbox [1, 1, 5, 5, 5], not a list of 4 numbers", (coco(dets=[{**DET, "bbox": [1, 1, 5, 5, 5]}]),)),
    (["coco-eval", "gt.json", "dets.json"], "detection 0 has bbox [1, 1, 1, 1, 1, 1, ...]", (coco(dets=[{**DET, "bbox": [1] * 100_000}]),)),
    (["coco-eval", "gt.json", "dets.json"], "detection 0 has score inf, not a number", (coco(dets=[{**DET, "score": float("inf")}]),)),
    (["coco-eval", "gt.json", "dets.json"], "detection 0 names image_id 99", (coco(dets=[{**DET, "image_id": 99}]),)),
    (["coco-eval", "gt.json", "dets.json"], "detection 0 names image_id '1'", (coco(dets=[{**DET, "image_id": "1"}]),)),
    (["coco-eval", "gt.json", "dets.json"], "detection 0 names image_id 'xxxx", (coco(dets=[{**DET, "image_id": HUGE}]),)),
    (["coco-eval", "gt.json", "dets.json"], "detection 0 names category_id 2", (coco(dets=[{**DET, "category_id": 2}]),)),
    (["coco-eval", "gt.json", "dets.json"], "detection 0 names category_id True", (coco(dets=[{**DET, "category_id": True}]),)),
    (["coco-eval", "gt.json", "dets.json"], "detection 0 is a list, not an object", (coco(dets=[[DET]]),)),
    (["coco-eval", "gt.json", "dets.json"], "detections must be a JSON list of objects, but got a JSON NoneType", (coco(dets="null"),)),
    (["coco-eval", "gt.json", "dets.json", "--iou-type", "segm"], "detection 0 has an RLE whose counts are not pycocotools' compressed string",
     (coco(dets=[{**DET, "segmentation": {"size": [80, 100], "counts": "!!!!"}}]),)),
    (["coco-eval", "gt.json", "dets.json", "--iou-type", "segm"], "detection 0 has an RLE whose counts are not pycocotools' compressed string",
     (coco(dets=[{**DET, "segmentation": {"size": [80, 100], "counts": [8000]}}]),)),
    (["coco-eval", "gt.json", "dets.json", "--iou-type", "segm"], "detection 0 has a mask of size '80x100', but image 1 is [80, 100]",
     (coco(dets=[{**DET, "segmentation": {"size": "80x100", "counts": "PPYo1"}}]),)),
    # paths longer than a file name may be: one line from the OS error, not a traceback
    (["status", LONG], "File name too long", ()),
    (["best", LONG], "File name too long", ()),
    (["resume", LONG], "File name too long", ()),
    (["recipes", LONG], "File name too long", ()),
    (["train", LONG], "File name too long", ()),
    (["spaces", LONG], "File name too long", ()),
    (["sweep", LONG], "File name too long", ()),
    (["sweep", "--storage", LONG], "File name too long", ()),
    (["sweep", "--data", LONG], "File name too long", ()),
    (["study", LONG], "unknown study 'xxx", ()),
    (["study", "rethinking", "--schedules", "1," + LONG], "--schedules takes comma-separated numbers, e.g. 1,2; got '1,xxx", ()),
    # empty values are refused, not taken as "the default"
    (["sweep", "--storage", ""], "--storage must not be empty (leave it out for runs)", ()),
    (["sweep", "--tracking-uri", " "], "--tracking-uri must not be empty", ()),
    (["sweep", "--address", ""], "--address must not be empty", ()),
    (["sweep", "--optuna-storage", ""], "--optuna-storage must not be empty", ()),
    (["sweep", "--data", ""], "--data must not be empty", ()),
    (["train", "digits-smoke", "--data", ""], "--data must not be empty", ()),
    # wrong types and shapes in files the project reads
    (["recipes", "r.yaml"], "task must be one of classification, detection, but got ['classification']", ({"r.yaml": "task: [classification]\n"},)),
    (["spaces", "s.yaml"], "format '{} {}' takes one value as {}", (space_yaml('  optim.lr: {int: [1, 5], format: "{} {}"}\n'),)),
    (["resume", "s"], "cannot read recipe-search/sweep.json of sweep", (sweep_dir("s", spec="[]"),)),
    (["sweep", "--data", "notes.txt"], "dataset path 'notes.txt' is not a folder", (NOTES,)),
    # the first table of one-line errors (once subprocesses in tests/search/test_cli.py)
    (["sweep", "nope"], "unknown space 'nope'; available: bit, det, rethinking, rsb", ()),
    (["sweep", "--recipe", "nope"], "unknown recipe 'nope'", ()),
    (["sweep", "--trials", "0"], "--trials must be 1 to 100000, but got 0", ()),
    (["sweep", "--workers", "0"], "runtime.workers", ()),
    (["sweep", "--searcher", "bayes"], "unknown searcher 'bayes'; available: tpe, grid, random, cmaes", ()),
    (["sweep", "--searcher", "grid"], "searcher grid takes choice params without when/format, but optim.lr is loguniform", ()),
    (["sweep", "det", "--data", "digits"], "data.name=digits is a classification dataset", ()),
    (["sweep", "det", "--set", "model.pretrained=/no/such.pt"], "model.pretrained: checkpoint '/no/such.pt' does not exist", ()),
    (["sweep", "det", "--data", "/no/coco"], "/no/coco", ()),
    (["study", "nope"], "unknown study 'nope'; available: rethinking", ()),
    (["study", "rethinking", "--schedules", "1,x"], "--schedules takes comma-separated numbers", ()),
    (["study", "rethinking", "--fractions", "0"], "--fractions takes data fractions in (0, 1]", ()),
    (["study", "rethinking", "--data", "/no/coco"], "/no/coco", ()),
    (["sweep", "--scheduler", "pbt"], "unknown scheduler 'pbt'; available: asha", ()),
    (["sweep", "--set", "optim.lrr=1"], "unknown recipe key 'optim.lrr'", ()),
    (["sweep", "--set", "optim.weight_decay=-1"], "optim.weight_decay", ()),
    (["sweep", "--set", "data.fraction=2"], "data.fraction", ()),
    (["sweep", "--set", "optim.lr=0.1"], "--set optim.lr fixes a key that space 'rsb' searches", ()),
    (["train", "rsb-a3", "--set", "optim.name=lamb2"], "unknown optimizer 'lamb2'", ()),
    (["sweep", "--set", "model.norm=syncbn"], "SyncBatchNorm layers only work with GPU modules", ()),
    (["sweep", "--set", "data.repeated_aug=3"], "data.repeated_aug=3 needs runtime.workers >= 2", ()),
    (["train", "rsb-digits", "--set", "data.repeated_aug=3"], "data.repeated_aug=3 needs runtime.workers >= 2", ()),
    (["sweep", "--data", "/nonexistent/data"], "does not exist", ()),
    (["sweep", "--storage", "/proc/forbidden"], "cannot be written", ()),
    (["sweep", "--tracking-uri", "http://127.0.0.1:9"], "does not answer", ()),
    (["sweep", "--address", "127.0.0.1:9"], "does not answer", ()),
    (["train", "nope"], "unknown recipe 'nope'", ()),
    (["train", "rsb-digits", "--set", "optim.lr=-0.1"], "optim.lr: input should be greater than 0, but got -0.1", ()),
    (["resume", "nope"], "no sweep 'nope'", ()),
    (["recipes", "nope"], "unknown recipe 'nope'", ()),
    (["status", "nope"], "no sweep 'nope'", ()),
    (["best", "nope"], "no sweep 'nope'", ()),
    (["ui", "--host", "0.0.0.0"], "--host '0.0.0.0' serves the tracking store to other machines, and MLflow's UI has no login", ()),
    # object storage, and a sweep as a Ray Job: nothing relative to the job's temporary working directory
    (["sweep", "--storage", "nope://x/y"], "--storage 'nope://x/y' cannot be opened: Unrecognized filesystem type", ()),
    (["status", "x", "--storage", "nope://x/y"], "--storage 'nope://x/y' cannot be opened", ()),
    (["submit"], "give the command to run after '--'", ()),
    (["submit", "--", "status", "x"], "'status' does not run a driver", ()),
    (["submit", "--", "sweep", "--bogus"], "No such option: --bogus", ()),
    (["submit", "--", "sweep", "--storage", "runs"], "--storage 'runs' is relative, and a Ray Job runs in a temporary working directory", ()),
    (["submit", "--", "resume", "s"], "--storage 'runs' is relative", ()),
    (["submit", "--", "sweep", "--storage", "/no/runs"], "--tracking-uri is needed", ()),
    (["submit", "--", "sweep", "--storage", "/no/runs", "--optuna-storage", "sqlite:///o.db"], "--optuna-storage 'sqlite:///o.db' is relative", ()),
    (["submit", "--", "train", "rsb-digits", "--storage", "/no/runs", "--tracking-uri", "sqlite:///mlflow.db"], "--tracking-uri 'sqlite:///mlflow.db' is relative", ()),
    (["submit", "--", "sweep", "--storage", "/no/runs", "--tracking-uri", "sqlite:////no/m.db", "--data", "img"], "--data 'img' is relative", ()),
    (["submit", "--address", "http://127.0.0.1:9", "--", "sweep", "--storage", "/no/runs", "--tracking-uri", "sqlite:////no/m.db"],
     "the Ray dashboard at 'http://127.0.0.1:9' did not answer as a job server", ()),
    # secrets stay out of error lines
    (["sweep", "--optuna-storage", "postgresql://me:secret@127.0.0.1:1/db"], "--optuna-storage 'postgresql://me:***@127.0.0.1:1/db' cannot be opened", ()),
    (["sweep", "--tracking-uri", "http://me:secret@127.0.0.1:9"], "MLflow tracking URI 'http://me:***@127.0.0.1:9' does not answer", ()),
]


def _ids(cases: list[tuple[list[str], str, tuple[Any, ...]]]) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for args, message, _ in cases:
        shown = " ".join(a if len(a) < 30 else a[:12] + "..." for a in args) + f" [{message[:40]}]"
        seen[shown] = seen.get(shown, 0) + 1
        ids.append(shown if seen[shown] == 1 else f"{shown} #{seen[shown]}")
    return ids


# --------------------------------------------------------------------------- the test


@pytest.fixture
def no_launch(monkeypatch):
    """Whatever a case gets past, it never reaches Ray, a server or a sweep: planning that accepts it fails the test."""
    import ray

    import search.plan

    def never(*args, **kwargs):
        pytest.fail("a bad input got past every check: this would launch something")

    plan_sweep = search.plan.plan_sweep

    def refusing_plan(*args, **kwargs):
        plan_sweep(*args, **kwargs)
        pytest.fail("planning accepted a bad input: the sweep would start Ray")

    monkeypatch.setattr(search.plan, "plan_sweep", refusing_plan)
    monkeypatch.setattr(cli, "_run", never)
    monkeypatch.setattr(cli, "_confirm", never)
    monkeypatch.setattr(ray, "init", never)
    monkeypatch.setattr(os, "execvp", never)  # ui
    monkeypatch.setitem(sys.modules, "optuna_dashboard", types.SimpleNamespace(wsgi=never))


def _tree(root: Path) -> dict[str, Any]:
    """Every path under ``root``: files with size and modification time, folders as None."""
    found: dict[str, Any] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            stat = os.lstat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """recipe-search's cache (timm's metadata, digits-det) for these cases: not the user's, not the working folder.

    Planning's heavy imports happen here, once, so that each case's time is its own.
    """
    for module in ("timm", "trainables.data", "search.plan"):
        importlib.import_module(module)
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("args, message, setup", CASES, ids=_ids(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, no_launch, cache_dir, args, message, setup):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RECIPE_SEARCH_CACHE", str(cache_dir))
    for part in setup:
        part(tmp_path) if callable(part) else _write(tmp_path, part)
    before = _tree(tmp_path)
    monkeypatch.setattr(sys, "argv", ["recipe-search", *args])
    started = time.monotonic()
    with pytest.raises(SystemExit) as exited:
        cli.main()
    seconds = time.monotonic() - started
    out, err = capsys.readouterr()
    assert exited.value.code == 2, (exited.value.code, out[:300], err[:300])
    assert "Traceback" not in out + err
    assert out == ""
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err[:500]
    assert message in err, err[:500]
    assert "secret" not in err  # passwords in URIs are masked
    assert len(err) <= MAX_LINE, err[:200]
    assert _tree(tmp_path) == before
    assert seconds < MAX_SECONDS
