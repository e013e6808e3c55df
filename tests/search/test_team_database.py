"""A team database as the tracking store and the searcher's study: a real PostgreSQL server on 127.0.0.1,
started by the test where PostgreSQL is installed (Debian's ``postgresql``), skipped where it is not."""

from __future__ import annotations

import glob
import io
import os
import pwd
import shutil
import socket
import subprocess
import tempfile

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search.plan import SweepSpec, plan_sweep
from search.sweep import run_sweep
from spaces import parse_space

pytestmark = pytest.mark.slow


def _postgres_bin() -> str | None:
    """The folder of PostgreSQL's server programs (Debian keeps them off PATH, in /usr/lib/postgresql/N/bin)."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    found = versions[-1] if versions else shutil.which("initdb")
    return os.path.dirname(os.path.realpath(found)) if found else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free port of 127.0.0.1 (trust authentication), stopped at the end."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    user = None
    if os.getuid() == 0:  # the server refuses to run as root: run it as Debian's postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
    data = tempfile.mkdtemp(prefix="recipe-search-pg-")
    if user:
        os.chown(data, user.pw_uid, user.pw_gid)
    as_owner = ["runuser", "-u", user.pw_name, "--"] if user else []
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run([*as_owner, f"{bin_dir}/initdb", "-D", f"{data}/db", "-U", "postgres", "--auth=trust"], check=True, capture_output=True)
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_owner, f"{bin_dir}/pg_ctl", "-D", f"{data}/db", "-o", options, "-l", f"{data}/log", "-w", "start"], check=True, capture_output=True)
    try:
        for db in ("tracking", "studies"):
            subprocess.run([*as_owner, f"{bin_dir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db], check=True, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([*as_owner, f"{bin_dir}/pg_ctl", "-D", f"{data}/db", "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_a_sweep_tracks_to_postgresql_in_the_uri_form_users_write(ray_session, workdir, postgres):
    """``postgresql://`` for MLflow and ``postgres://`` for Optuna, as users write them; runs, metrics and
    the study land in the server."""
    space = parse_space({"name": "pg", "recipe": "digits-smoke", "params": {"optim.lr": {"choice": [0.1, 0.01]}}}, "test")
    spec = SweepSpec(
        space=space, name="team", overrides={"schedule.epochs": 2}, trials=2, searcher="random", scheduler="fifo",
        storage=str(workdir / "runs"), tracking_uri=f"postgresql://postgres@{postgres}/tracking",
        optuna_storage=f"postgres://postgres@{postgres}/studies",
    )
    plan = plan_sweep(spec)
    state = run_sweep(plan, out=io.StringIO())
    assert [r["status"] for r in state["trials"].values()] == ["TERMINATED", "TERMINATED"]
    client = MlflowClient(tracking_uri=f"postgresql://postgres@{postgres}/tracking")
    experiment = client.get_experiment_by_name("team")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and len(children) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert all(len(client.get_metric_history(r.info.run_id, "val/top1")) == 2 for r in children)
    assert not (workdir / "mlflow.db").exists()  # nothing went to the default store
    study = optuna.load_study(study_name="team", storage=f"postgresql://postgres@{postgres}/studies")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE"]
    assert sorted(t.params["optim.lr"] for t in study.trials) == [0.01, 0.1]
