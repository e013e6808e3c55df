"""The CLI: listings and JSON contracts, and one-line errors with exit code 2 that leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from spaces import known_keys, recipe_names, space_names

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
    flat = {f"{s}.{k}" for s, v in recipe.items() if isinstance(v, dict) for k in v} | {"task"}
    assert flat == set(known_keys())


def test_listings(workdir):
    assert all(name in run(["recipes"], workdir).stdout for name in recipe_names())
    assert all(name in run(["spaces"], workdir).stdout for name in space_names())
    shown = yaml.safe_load(run(["spaces", "rsb"], workdir).stdout)
    assert shown["recipe"] == "rsb-digits" and "optim.lr" in shown["params"]


def test_recipes_set_overrides(workdir):
    result = run(["recipes", "rsb-digits", "--set", "optim.lr=0.02", "--set", "reg.ema_decay=0.999"], workdir)
    recipe = yaml.safe_load(result.stdout)
    assert recipe["optim"]["lr"] == 0.02 and recipe["reg"]["ema_decay"] == 0.999


BAD_INPUT = [
    (["sweep", "nope"], "unknown space 'nope'; available: rsb"),
    (["sweep", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["sweep", "--trials", "0"], "--trials must be at least 1, but got 0"),
    (["sweep", "--workers", "0"], "runtime.workers"),
    (["sweep", "--searcher", "grid"], "unknown searcher 'grid'; available: tpe, random, cmaes"),
    (["sweep", "--scheduler", "pbt"], "unknown scheduler 'pbt'; available: asha"),
    (["sweep", "--set", "optim.lrr=1"], "unknown recipe key 'optim.lrr'"),
    (["sweep", "--set", "optim.weight_decay=-1"], "optim.weight_decay"),
    (["sweep", "--set", "data.fraction=2"], "data.fraction"),
    (["sweep", "--set", "optim.lr=0.1"], "--set optim.lr fixes a key that space 'rsb' searches"),
    (["train", "rsb-a3", "--set", "optim.name=lamb2"], "unknown optimizer 'lamb2'"),
    (["sweep", "--set", "model.norm=syncbn"], "SyncBatchNorm layers only work with GPU modules"),
    (["sweep", "--data", "/nonexistent/data"], "does not exist"),
    (["sweep", "--storage", "/proc/forbidden"], "cannot be written"),
    (["sweep", "--tracking-uri", "http://127.0.0.1:9"], "does not answer"),
    (["sweep", "--address", "127.0.0.1:9"], "does not answer"),
    (["train", "nope"], "unknown recipe 'nope'"),
    (["train", "rsb-digits", "--set", "optim.lr=-0.1"], "optim.lr: input should be greater than 0, but got -0.1"),
    (["resume", "nope"], "no sweep 'nope'"),
    (["recipes", "nope"], "unknown recipe 'nope'"),
    (["status", "nope"], "no sweep 'nope'"),
    (["best", "nope"], "no sweep 'nope'"),
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
