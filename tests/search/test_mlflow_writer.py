"""The MLflow writer batches per run across trials: the order that matters is each run's own.

A real SQLite tracking store. Trials report side by side and end at different times: every result lands
once, a run's end comes after its last result, and the writer's pass puts a run's results into one
``log_batch`` call however the other runs' results and calls are interleaved with them.
"""

from __future__ import annotations

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from search.tracking import MlflowWriter


class CountingClient(MlflowClient):
    """A real client that counts its ``log_batch`` calls (the store transactions the driver pays for)."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.batches = 0

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        self.batches += 1
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)


def test_results_of_runs_reporting_side_by_side_land_once_in_one_call_a_run_and_in_each_runs_order(tmp_path):
    client = CountingClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("side-by-side")
    runs = {name: client.create_run(experiment).info.run_id for name in "abc"}
    landed: list[tuple[str, int]] = []
    writer = MlflowWriter(client, landed.extend)
    seen_at_end: dict[str, list[int]] = {}

    def end(run_id: str, name: str) -> None:  # a run's end: what of the run had landed when it ran
        seen_at_end[name] = sorted(m.step for m in client.get_metric_history(run_id, "val/top1"))
        client.set_terminated(run_id)

    with writer.condition:  # queued as Tune's loop does between two of the writer's passes
        for step in range(1, 6):
            for name, run_id in runs.items():
                if name != "a" or step <= 3:
                    writer.metrics(name, run_id, step, [Metric("val/top1", step / 10, 0, step), Metric("epoch", step, 0, step)])
            if step == 3:
                writer.call(end, runs["a"], "a")  # trial a ends after its third result; b and c go on
    assert writer.flush(60) == 0
    assert seen_at_end == {"a": [1, 2, 3]}  # its end came after its results
    for name, steps in (("a", [1, 2, 3]), ("b", [1, 2, 3, 4, 5]), ("c", [1, 2, 3, 4, 5])):
        assert sorted(m.step for m in client.get_metric_history(runs[name], "val/top1")) == steps  # each once
        assert sorted(step for trial, step in landed if trial == name) == steps
    assert client.get_run(runs["a"]).info.status == "FINISHED"
    # One call a run: a's end did not split b's and c's results (their order is their own).
    assert client.batches == 3
