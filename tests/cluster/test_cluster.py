"""A real two-node Ray cluster on this machine (``ray start --head`` plus ``ray start --address``), with Ray's
token authentication on, and a real S3 API (moto) on 127.0.0.1.

These tests start their own Ray, so they run in a pytest process of their own (``make test`` runs
``-m cluster`` after the rest): only one Ray instance can run on a machine at a time.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from tests.s3server import bucket_uri, objects, read_object
from tests.search.test_object_storage import GOOD_OR_BAD

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray(*args: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "ray"), *args], env=env, capture_output=True, text=True, timeout=180, **kwargs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (1 CPU, dashboard on 127.0.0.1) and a worker node (1 CPU) with token authentication; yields
    ``(gcs_address, dashboard_url, token, env, worker)`` where ``worker`` is the worker node's process (its
    own process group: killing it kills the node)."""
    subprocess.run([os.path.join(BIN, "ray"), "stop", "--force"], capture_output=True, timeout=120)
    token = uuid.uuid4().hex * 2
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": ROOT, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RECIPE_SEARCH_CACHE": str(tmp_path_factory.mktemp("head-cache"))}  # the cluster's cache (a job's mirrors): not the user's
    env.pop("RAY_ADDRESS", None)
    port, dashboard = _free_port(), _free_port()
    head = _ray("start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dashboard), "--disable-usage-stats", env=env)
    assert head.returncode == 0, head.stderr[-2000:]
    address = f"127.0.0.1:{port}"
    worker = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--address", address, "--num-cpus", "1", "--block", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 120
    while True:
        status = _ray("status", "--address", address, env=env)
        if status.stdout.count("node_") >= 2 or " 2.0 CPU" in status.stdout or "0.0/2.0 CPU" in status.stdout:
            break
        assert time.time() < deadline, status.stdout[-2000:] + status.stderr[-2000:]
        time.sleep(2)
    try:
        yield address, f"http://127.0.0.1:{dashboard}", token, env, worker
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        subprocess.run([os.path.join(BIN, "ray"), "stop", "--force"], capture_output=True, timeout=120, env=env)


def _cli(*args: str, env: dict[str, str], cwd, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_token_authentication_fails_fast_in_one_line_without_the_token(cluster, tmp_path):
    address, _, token, env, _ = cluster
    cases = [
        ({k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}, "needs a token (RAY_AUTH_MODE is not 'token')"),
        ({**env, "RAY_AUTH_TOKEN": "0" * 64}, "refused the token from $RAY_AUTH_TOKEN"),
    ]
    for case_env, expected in cases:
        started = time.time()
        result = _cli("sweep", "rsb", "--trials", "1", "--address", address, "--storage", str(tmp_path / "runs"), env=case_env, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert expected in result.stderr and "set RAY_AUTH_MODE=token" in result.stderr, result.stderr
        assert time.time() - started < 60  # planning and the probe: not ray.init's retries
        assert not (tmp_path / "runs").exists()  # nothing left that blocks the name
    # With the token as Ray documents it (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), the driver joins and trains.
    result = _cli("train", "digits-smoke", "--name", "with-token", "--set", "schedule.epochs=1", "--address", address,
                  "--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", env=env, cwd=tmp_path)
    assert result.returncode == 0 and "best recipe written" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_a_sweep_submitted_as_a_ray_job_keeps_everything_in_s3_survives_a_lost_node_and_resumes(cluster, s3, tmp_path):
    address, dashboard, token, env, worker = cluster
    storage = bucket_uri(s3)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(GOOD_OR_BAD))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = {**env, "RECIPE_SEARCH_CACHE": str(tmp_path / "cache")}

    # Relative places are refused before anything is submitted.
    refused = _cli("submit", "--address", dashboard, "--", "sweep", str(space_file), "--storage", "runs", env=local, cwd=tmp_path)
    assert refused.returncode == 2 and "--storage 'runs' is relative" in refused.stderr and refused.stderr.count("\n") == 1, refused.stderr
    refused = _cli("submit", "--address", dashboard, "--", "sweep", str(space_file), "--storage", storage, env=local, cwd=tmp_path)
    assert refused.returncode == 2 and "--tracking-uri is needed" in refused.stderr, refused.stderr

    submitted = _cli(
        "submit", "--address", dashboard, "--no-wait", "--", "sweep", str(space_file), "--name", "jobsweep", "--trials", "3",
        "--searcher", "random", "--scheduler", "fifo", "--concurrency", "2", "--set", "schedule.epochs=12", "--seed", "0",
        "--storage", storage, "--tracking-uri", tracking, env=local, cwd=tmp_path,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.split()[2]

    def job(method: str, path: str = "") -> dict:  # the Jobs REST API of the dashboard, with the cluster's token
        request = urllib.request.Request(f"{dashboard}/api/jobs/{job_id}{path}", method=method, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def status() -> str:
        return job("GET")["status"]

    def logs() -> str:
        return job("GET", "/logs")["logs"]

    def wait_for(predicate, what: str, limit: float = 300):
        deadline = time.time() + limit
        while not predicate():
            now = status()
            assert now in ("PENDING", "RUNNING"), f"{what}: job {now}\n{logs()[-4000:]}"
            assert time.time() < deadline, f"{what}: not in {limit} s\n{logs()[-4000:]}"
            time.sleep(2)

    def state():
        keys = objects(s3, "runs/jobsweep/recipe-search/")
        return json.loads(read_object(s3, "runs/jobsweep/recipe-search/state.json")) if "runs/jobsweep/recipe-search/state.json" in keys else None

    # Both nodes train (concurrency 2 on 1 + 1 CPU); a checkpoint in the bucket, then the worker node dies.
    wait_for(lambda: len([k for k in objects(s3, "runs/jobsweep/") if k.endswith("checkpoint.pt")]) >= 2, "two trials checkpointed")
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    wait_for(lambda: (state() or {}).get("trials") and sum(r["status"] == "TERMINATED" for r in state()["trials"].values()) >= 2,
             "two trials finished after the node was lost", limit=420)

    # `ray job stop`: the driver stops as on Ctrl-C (state pushed, lease released), within the wait the job asked for.
    job("POST", "/stop")
    deadline = time.time() + 180
    while status() not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.time() < deadline
        time.sleep(1)
    stopped_logs = logs()
    assert status() == "STOPPED" and "recipe-search resume jobsweep --storage 's3://sweeps/runs?endpoint_override=" in stopped_logs and "Traceback" not in stopped_logs, stopped_logs[-4000:]
    assert "runs/jobsweep/recipe-search/driver.json" not in objects(s3, "runs/jobsweep/")
    assert state()["finished"] is False

    # resume as a job, followed here (the same progress view), from another directory with an empty cache.
    other = tmp_path / "other"
    other.mkdir()
    resumed = _cli("submit", "--address", dashboard, "--", "resume", "jobsweep", "--storage", storage,
                   env={**local, "RECIPE_SEARCH_CACHE": str(other / "cache")}, cwd=other)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-2000:]
    assert "resuming jobsweep" in resumed.stdout or "its search has finished" in resumed.stdout, resumed.stdout[-4000:]

    final = state()
    assert final["finished"] is True and len(final["trials"]) == 3
    assert all(r["status"] == "TERMINATED" for r in final["trials"].values()), final["trials"]
    keys = objects(s3, "runs/jobsweep/")
    assert "runs/jobsweep/best_recipe.yaml" in keys and "runs/jobsweep/recipe-search/optuna.db" in keys
    assert len([k for k in keys if k.endswith("checkpoint.pt")]) == 3
    reader = tmp_path / "reader"
    reader.mkdir()
    shown = _cli("status", "jobsweep", "--storage", storage, env={**local, "RECIPE_SEARCH_CACHE": str(reader / "cache")}, cwd=reader)
    assert shown.returncode == 0 and "3 terminated" in shown.stdout, shown.stdout + shown.stderr
    best = _cli("best", "jobsweep", "--storage", storage, "--json", env={**local, "RECIPE_SEARCH_CACHE": str(reader / "cache")}, cwd=reader)
    assert best.returncode == 0 and json.loads(best.stdout)["trial_id"] == final["best"]["trial_id"], best.stdout + best.stderr
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(other / "runs")
