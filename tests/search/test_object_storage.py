"""Sweeps on object storage: a real S3 API (moto in server mode) on 127.0.0.1, started by the fixture.

What a user with ``--storage s3://...`` relies on: everything of the sweep lands in the bucket (nothing in a
local folder named after the URI), a stopped sweep resumes from the bucket, and ``status``/``best``/``report``
and ``model.init=run:NAME`` work from another working directory with an empty cache.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from search.cli import app
from search.plan import SweepSpec, load_sweep_spec, plan_sweep
from search.sweep import hold_lease, run_sweep
from spaces import parse_space, validate_recipe
from tests.s3server import bucket_uri, delete_object, objects, read_object

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOOD_OR_BAD = {"name": "good-or-bad", "recipe": "digits-smoke", "params": {"optim.lr": {"choice": [0.1, 1.0e-7]}}}


def _elsewhere(tmp_path, monkeypatch, name: str):
    """Another working directory with an empty cache: what another machine sees."""
    other = tmp_path / name
    other.mkdir()
    monkeypatch.chdir(other)
    monkeypatch.setenv("RECIPE_SEARCH_CACHE", str(other / "cache"))
    return other


def test_a_sweep_on_s3_is_kept_in_the_bucket_resumed_and_read_from_anywhere(ray_session, workdir, s3, tmp_path, monkeypatch):
    storage = bucket_uri(s3)
    monkeypatch.setenv("RECIPE_SEARCH_CACHE", str(workdir / "cache"))
    space_file = workdir / "space.yaml"
    space_file.write_text(yaml.safe_dump(GOOD_OR_BAD))
    address = ray_session.get_runtime_context().gcs_address
    # Enough trials that the sweep is still running when a finished one reaches the bucket (pushed every 5 s;
    # a trial after the first takes about 3 s).
    trials = 8
    driver = subprocess.Popen(
        [sys.executable, "-m", "search.cli", "sweep", str(space_file), "--name", "s3sweep", "--trials", str(trials), "--searcher", "random",
         "--scheduler", "fifo", "--concurrency", "1", "--set", "schedule.epochs=2", "--storage", storage, "--address", address, "--seed", "0"],
        cwd=workdir, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # Ctrl-C once the bucket's state (pushed every few seconds) shows a finished trial.
    deadline = time.time() + 240
    while time.time() < deadline:
        keys = objects(s3, "runs/s3sweep/recipe-search/")
        if "runs/s3sweep/recipe-search/state.json" in keys:
            state = json.loads(read_object(s3, "runs/s3sweep/recipe-search/state.json"))
            if any(r["status"] == "TERMINATED" for r in state["trials"].values()):
                break
        assert driver.poll() is None, driver.communicate()[0]
        time.sleep(1)
    else:
        pytest.fail("no finished trial reached the bucket in time")
    # `status` on this machine while the driver runs reads a copy of its own: the driver's mirror is not touched.
    from search.storage import Storage

    optuna_db = os.path.join(Storage.open(storage).mirror("s3sweep"), "recipe-search", "optuna.db")
    inode = os.stat(optuna_db).st_ino
    result = CliRunner().invoke(app, ["status", "s3sweep", "--storage", storage])
    assert result.exit_code == 0 and "s3sweep" in result.output, result.output
    assert os.stat(optuna_db).st_ino == inode
    driver.send_signal(signal.SIGINT)
    output, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, output
    # The resume command it prints names the storage (without the credentials), not this machine's mirror.
    assert "resume it with: recipe-search resume s3sweep --storage 's3://sweeps/runs?endpoint_override=" in output, output
    assert not any(p.startswith("s3") for p in os.listdir(workdir)), os.listdir(workdir)  # no local folder named after the URI
    assert not (workdir / "runs").exists()
    # The lease went with the driver; the stopped state is in the bucket.
    assert "runs/s3sweep/recipe-search/driver.json" not in objects(s3, "runs/s3sweep/")
    stopped = json.loads(read_object(s3, "runs/s3sweep/recipe-search/state.json"))
    assert stopped["finished"] is False and 1 <= len(stopped["trials"]) < trials

    # Resume on "another machine": an empty cache, another working directory, the same tracking store.
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    other = _elsewhere(tmp_path, monkeypatch, "resumer")
    result = CliRunner().invoke(app, ["status", "s3sweep", "--storage", storage])
    assert result.exit_code == 0 and "s3sweep" in result.output and "test:test" not in result.output, result.output
    result = CliRunner().invoke(app, ["resume", "s3sweep", "--storage", storage, "--tracking-uri", tracking])
    assert result.exit_code == 0, result.output
    assert not (other / "runs").exists() and not (other / "mlflow.db").exists()

    keys = objects(s3, "runs/s3sweep/")
    state = json.loads(read_object(s3, "runs/s3sweep/recipe-search/state.json"))
    assert state["finished"] is True and len(state["trials"]) == trials
    assert all(r["status"] == "TERMINATED" for r in state["trials"].values())
    for key in ("recipe-search/sweep.json", "recipe-search/mlflow_runs.json", "recipe-search/optuna.db", "best_recipe.yaml", "report.html", "ray.log", "tuner.pkl"):
        assert f"runs/s3sweep/{key}" in keys, key
    checkpoints = [k for k in keys if k.endswith("/checkpoint.pt")]
    assert len(checkpoints) == trials, checkpoints  # one per trial (Tune keeps the last), in the bucket
    assert "test:test" not in read_object(s3, "runs/s3sweep/recipe-search/sweep.json").decode()  # no credentials stored
    runs = json.loads(read_object(s3, "runs/s3sweep/recipe-search/mlflow_runs.json"))
    assert sorted(runs["trials"]) == sorted(state["trials"])

    # Read from a third place: status, best (the bucket's best recipe), report (written back to the bucket).
    _elsewhere(tmp_path, monkeypatch, "reader")
    result = CliRunner().invoke(app, ["best", "s3sweep", "--storage", storage, "--json"])
    assert result.exit_code == 0, result.output
    best = json.loads(result.output)
    assert best["trial_id"] == state["best"]["trial_id"] and best["value"] == state["best"]["value"]
    assert validate_recipe(yaml.safe_load(read_object(s3, "runs/s3sweep/best_recipe.yaml"))) == validate_recipe(best["recipe"])
    delete_object(s3, "runs/s3sweep/report.html")
    result = CliRunner().invoke(app, ["report", "s3sweep", "--storage", storage])
    assert result.exit_code == 0 and "s3://sweeps/runs/s3sweep/report.html" in result.output, result.output
    assert f"{trials} of {trials} trials" in read_object(s3, "runs/s3sweep/report.html").decode()  # written back to the bucket

    # model.init=run:NAME from the bucket, under Ray Train (its run's checkpoints go to the bucket too).
    spec = SweepSpec(
        space=parse_space({"name": "from-s3", "recipe": "digits-smoke", "params": {}}, "test"), name="from-s3", trials=1, searcher=None,
        scheduler="fifo", storage=storage, launcher="train", tracking_uri=tracking,
        overrides={"schedule.epochs": 1, "model.init": "run:s3sweep"},
    )
    plan = plan_sweep(spec)
    assert plan.overrides["model.init"].startswith("s3://test:test@sweeps/runs/s3sweep/")
    with hold_lease(plan.sweep_dir, storage=plan.storage, name=plan.name):
        done = run_sweep(plan, out=io.StringIO())
    assert done["best"] and not done.get("interrupted")
    trained = [k for k in objects(s3, "runs/from-s3/train/") if k.endswith("/checkpoint.pt")]
    assert len(trained) == 1, trained
    assert load_sweep_spec(plan.sweep_dir).overrides["model.init"] == plan.overrides["model.init"]


def test_object_storage_errors_are_one_line(s3, workdir, monkeypatch):
    monkeypatch.setenv("RECIPE_SEARCH_CACHE", str(workdir / "cache"))
    missing = bucket_uri(s3).replace("@sweeps/", "@nobucket/")
    result = subprocess.run([sys.executable, "-m", "search.cli", "status", "nope", "--storage", missing], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "test:test" not in result.stderr and "nobucket" in result.stderr
    result = subprocess.run([sys.executable, "-m", "search.cli", "sweep", "rsb", "--trials", "1", "--storage", missing], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "cannot be written" in result.stderr, result.stderr
    assert "test:test" not in result.stderr
