"""MLflow writes leave Tune's control loop: a tracking server that goes away for a while loses nothing.

A real ``mlflow server`` on 127.0.0.1, stopped while results keep coming and started again on the same port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from search.tracking import MlflowWriter

pytestmark = pytest.mark.slow


def _start_server(port: int, store: str) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--default-artifact-root", f"{store}/artifacts"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            assert server.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    server.kill()
    pytest.fail("mlflow server did not start")


def _stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, 9)
    server.wait(timeout=30)


def test_results_queued_while_the_tracking_server_is_down_land_when_it_is_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries off: the writer's are tested
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = _start_server(port, str(tmp_path))
    client = MlflowClient(f"http://127.0.0.1:{port}")
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    landed: list[tuple[str, int]] = []
    writer = MlflowWriter(client, landed.extend)
    try:
        for step in range(1, 11):
            writer.metrics("t1", run_id, step, [Metric("val/top1", step / 100, 0, step)])
        assert writer.flush(180) == 0
        _stop_server(server)
        for step in range(11, 31):  # the server is down: each call returns at once, nothing is dropped
            writer.metrics("t1", run_id, step, [Metric("val/top1", step / 100, 0, step)])
        writer.call(client.set_tag, run_id, "recipe_search.outcome", "completed")
        assert writer.flush(8) > 0  # still held back
        server = _start_server(port, str(tmp_path))
        assert writer.flush(300) == 0
    finally:
        _stop_server(server)
    store = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # what the server stored
    steps = sorted(m.step for m in store.get_metric_history(run_id, "val/top1"))
    assert steps == list(range(1, 31))  # every result, once
    assert store.get_run(run_id).data.tags["recipe_search.outcome"] == "completed"  # in order, after them
    assert sorted(landed) == [("t1", s) for s in range(1, 31)]
