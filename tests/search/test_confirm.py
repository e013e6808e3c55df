"""Confirmation over seeds: which recipes, which seeds, the statistics, and a sweep confirmed end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient
from scipy import stats
from typer.testing import CliRunner

from search.cli import app
from search.confirm import fresh_seeds, replicate_stats, top_trials, verdict, welch
from search.layout import read_state, resolve_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _record(value, status="TERMINATED", stopped_early=False, **config):
    return {"status": status, "stopped_early": stopped_early, "metrics": {"val/top1": value}, "config": config}


def _state(mode="max", **trials):
    return {"name": "s", "metric": "val/top1", "mode": mode, "num_samples": len(trials), "trials": trials, "finished": True}


def test_only_full_runs_are_confirmed_best_first_and_each_recipe_once():
    state = _state(
        a=_record(0.70, **{"optim.lr": 0.1}),
        b=_record(0.95, stopped_early=True, **{"optim.lr": 0.2}),  # a score at the cut is no candidate
        c=_record(0.80, **{"optim.lr": 0.3}),
        d=_record(0.80, **{"optim.lr": 0.3}),  # the same recipe as c: confirming it twice tells nothing more
        e=_record(float("nan"), **{"optim.lr": 0.4}),
        f=_record(0.99, status="ERROR", **{"optim.lr": 0.5}),
        g=_record(0.60, **{"optim.lr": 0.6}),
    )
    assert [t["trial_id"] for t in top_trials(state, 3)] == ["c", "a", "g"]
    assert [t["ordinal"] for t in top_trials(state, 3)] == [3, 1, 7]
    assert [t["trial_id"] for t in top_trials({**state, "mode": "min"}, 2)] == ["g", "a"]


def test_confirmation_seeds_are_ones_no_search_trial_ran_with():
    state = _state(a=_record(0.7, **{"runtime.seed": 1}), b=_record(0.8, **{"runtime.seed": 3}))
    assert fresh_seeds(state, [{"runtime": {"seed": 0}}], 3) == [2, 4, 5]


def test_mean_std_and_t_interval_of_seed_results():
    got = replicate_stats([0.90, 0.92, 0.97])
    assert got["mean"] == pytest.approx(0.93)
    assert got["std"] == pytest.approx(statistics.stdev([0.90, 0.92, 0.97]))
    half = 4.302652729911275 * got["std"] / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert got["ci95"] == pytest.approx([0.93 - half, 0.93 + half])
    assert replicate_stats([0.5])["std"] is None


def test_welch_says_beyond_the_noise_only_when_the_seeds_say_so():
    apart = welch([0.95, 0.96, 0.955], [0.90, 0.91, 0.905])
    reference = stats.ttest_ind([0.95, 0.96, 0.955], [0.90, 0.91, 0.905], equal_var=False)
    assert apart["p"] == pytest.approx(reference.pvalue) and apart["beyond_noise"]
    close = welch([0.95, 0.90, 0.97], [0.93, 0.96, 0.89])
    assert not close["beyond_noise"] and close["p"] > 0.05


def test_verdict_reads_within_or_beyond_the_noise():
    def summary(first, second):
        recipes = [
            {"trial_id": t, "name": n, "n": len(v), "values": v, **replicate_stats(v)} for t, n, v in (("a", "t01 lr=0.1", first), ("b", "t02 lr=0.2", second))
        ]
        test = welch(first, second)
        return {"metric": "val/top1", "winner": "a", "recipes": recipes, "runner_up": {"trial_id": "b", "difference": recipes[0]["mean"] - recipes[1]["mean"], **test}}

    assert "beyond the noise" in verdict(summary([0.95, 0.96, 0.955], [0.90, 0.91, 0.905]))
    assert "within the noise" in verdict(summary([0.95, 0.90, 0.97], [0.93, 0.96, 0.89]))


def _replicates(tmp_path, mode, results):
    """A confirmation's plan and state on disk: ``results`` = {trial: [value, or None for a failed seed]}."""
    from search.confirm import ConfirmationPlan, write_plan
    from spaces import flatten, resolve_recipe

    recipe = flatten(resolve_recipe("digits-smoke").model_dump(mode="json"))
    entries = [{"trial_id": t, "ordinal": i, "name": f"t0{i} {t}", "value": 0.5, "mlflow_run_id": None, "recipe": recipe}
               for i, t in enumerate(results, start=1)]
    write_plan(str(tmp_path), ConfirmationPlan(top=len(entries), seeds=[1, 2, 3], metric="val/loss", mode=mode, recipes=entries))
    trials = {}
    for t, values in results.items():
        for seed, value in enumerate(values, start=1):
            record = {"status": "TERMINATED", "stopped_early": False, "config": {"confirms": t, "runtime.seed": seed}, "metrics": {"val/loss": value}}
            if value is None:
                record = {"status": "ERROR", "error": "diverged", "config": record["config"]}
            trials[f"{t}-{seed}"] = record
    (tmp_path / "recipe-search" / "state.json").write_text(json.dumps(
        {"name": "c", "metric": "val/loss", "mode": mode, "num_samples": len(trials), "trials": trials, "finished": True}))
    from search.confirm import replicate_summary

    return replicate_summary(str(tmp_path))


def test_a_recipe_with_a_failed_seed_ranks_after_those_without_and_no_result_ranks_last(tmp_path):
    summary = _replicates(tmp_path, "min", {"none": [None, None, None], "b": [0.30, 0.32, None], "c": [0.40, 0.41, 0.42]})
    assert [r["trial_id"] for r in summary["recipes"]] == ["c", "b", "none"] and summary["winner"] == "c"
    text = verdict(summary)
    assert "ranks after it for its 1 failed seed(s)" in text and "beyond the noise" not in text
    summary = _replicates(tmp_path, "min", {"none": [None, None, None], "b": [0.30, 0.32, None], "c": [0.40, None, 0.42]})
    assert summary["winner"] == "b"  # both have a failed seed: the lower loss wins, an empty recipe never does


@pytest.mark.parametrize(
    "args, message",
    [
        (["--confirm", "2", "--seeds", "1"], "--seeds must be 2 to 100"),
        (["--confirm", "-1"], "must be at least 1"),
        (["--confirm", "5", "--trials", "3"], "more recipes than the sweep's 3 trial(s)"),
    ],
)
def test_bad_confirmation_flags_are_one_line_errors(workdir, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "search.cli", "sweep", "rsb", "--name", "x", *args], cwd=workdir,
        env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (workdir / "runs").exists()


def _wait_for(predicate, driver, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        assert driver.poll() is None, f"the driver ended before {what}: {driver.communicate()[0][-3000:]}"
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_sweep_confirms_its_top_recipes_over_fresh_seeds_and_resumes_mid_confirmation(ray_session, workdir):
    """Search 3 learning rates, confirm the top 2 on 2 seeds; Ctrl-C after the first confirmation run, resume."""
    space = {"name": "lr3", "recipe": "digits-smoke", "params": {"optim.lr": {"choice": [0.1, 0.03, 1.0e-7]}}}
    (workdir / "space.yaml").write_text(yaml.safe_dump(space))
    sweep_dir = str(workdir / "runs" / "conf")
    command = [
        sys.executable, "-m", "search.cli", "sweep", "space.yaml", "--name", "conf", "--searcher", "grid", "--scheduler", "fifo",
        "--set", "schedule.epochs=3", "--concurrency", "1", "--confirm", "2", "--seeds", "2",
        "--address", ray_session.get_runtime_context().gcs_address,
    ]
    driver = subprocess.Popen(command, cwd=workdir, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    confirm_dir = os.path.join(sweep_dir, "confirm")

    def confirmed_runs():
        state = read_state(confirm_dir) if os.path.isdir(confirm_dir) else None
        return [t for t, r in (state or {"trials": {}})["trials"].items() if r["status"] == "TERMINATED"]

    _wait_for(lambda: len(confirmed_runs()) >= 1, driver, 300, "the first confirmation run")
    shown = CliRunner().invoke(app, ["status", sweep_dir])
    assert "phase: confirmation over seeds, 1 of 4 runs done" in shown.output, shown.output
    finished_before = confirmed_runs()
    driver.send_signal(signal.SIGINT)
    output, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, output
    assert "confirmation of conf interrupted" in output and f"recipe-search resume {sweep_dir}" in output
    search = read_state(sweep_dir)
    assert search["finished"] and len(search["trials"]) == 3

    resumed = CliRunner().invoke(app, ["resume", sweep_dir])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming the confirmation of conf" in resumed.output
    assert all(f"{trial_id} started" not in resumed.output for trial_id in finished_before)  # finished seeds are not re-run

    # Which recipes: the two best full runs of the search; which seeds: 1 and 2 (the search ran on 0).
    ranked = sorted(search["trials"].items(), key=lambda item: -item[1]["metrics"]["val/top1"])
    top2 = [trial_id for trial_id, _ in ranked[:2]]
    confirm_state = read_state(confirm_dir)
    pairs = sorted((r["config"]["confirms"], r["config"]["runtime.seed"]) for r in confirm_state["trials"].values())
    assert pairs == sorted((t, s) for t in top2 for s in (1, 2))
    assert set(finished_before) <= set(confirm_state["trials"])
    values = {t: [r["metrics"]["val/top1"] for r in confirm_state["trials"].values() if r["config"]["confirms"] == t] for t in top2}
    winner = max(top2, key=lambda t: statistics.mean(values[t]))
    runner_up = next(t for t in top2 if t != winner)

    shown = CliRunner().invoke(app, ["best", sweep_dir, "--json", "-o", "winner.yaml"])
    info = json.loads(shown.output)
    confirmed = info["confirmed"]
    assert info["trial_id"] == winner and confirmed["seeds"] == [1, 2]
    assert confirmed["mean"] == pytest.approx(statistics.mean(values[winner]))
    assert confirmed["std"] == pytest.approx(statistics.stdev(values[winner]))
    half = stats.t.ppf(0.975, 1) * statistics.stdev(values[winner]) / math.sqrt(2)
    assert confirmed["ci95"] == pytest.approx([confirmed["mean"] - half, confirmed["mean"] + half])
    assert sorted(run["value"] for run in confirmed["runs"]) == sorted(values[winner])
    expected_p = stats.ttest_ind(values[winner], values[runner_up], equal_var=False).pvalue
    assert confirmed["runner_up"]["trial_id"] == runner_up and confirmed["runner_up"]["p"] == pytest.approx(expected_p)
    assert confirmed["search_value"] == search["trials"][winner]["metrics"]["val/top1"]
    # best -o, and run:NAME, follow the confirmed winner.
    assert yaml.safe_load((workdir / "winner.yaml").read_text())["optim"]["lr"] == search["trials"][winner]["config"]["optim.lr"]
    assert f"_{winner}_" in resolve_run(f"run:{sweep_dir}", str(workdir / "runs"))
    assert "phase: done, confirmed over seeds" in CliRunner().invoke(app, ["status", sweep_dir]).output

    # MLflow: the search's 3 runs kept, 4 confirmation runs nested under the same parent, each once,
    # tagged with the phase, the trial it confirms and its seed; the parent has the confirmed mean and std.
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("conf").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id and c.info.status == "FINISHED" for c in children)
    phases = [c.data.tags["recipe_search.phase"] for c in children]
    assert (phases.count("search"), phases.count("confirm")) == (3, 4)
    confirm_runs = [c for c in children if c.data.tags["recipe_search.phase"] == "confirm"]
    assert sorted((c.data.tags["recipe_search.confirms"], int(c.data.tags["recipe_search.seed"])) for c in confirm_runs) == pairs
    for run in confirm_runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [1, 2, 3]
    assert parent.info.status == "FINISHED" and parent.data.tags["recipe_search.best_trial"] == winner
    assert parent.data.metrics["confirmed/val/top1/mean"] == pytest.approx(confirmed["mean"])
    assert parent.data.metrics["confirmed/val/top1/std"] == pytest.approx(confirmed["std"])


@pytest.mark.slow
def test_the_rsb_study_trains_a1_a2_a3_over_seeds_at_their_relative_budgets(ray_session, workdir):
    """A tiny budget (A3: 1 epoch, A2: 3, A1: 6) on a quarter of the digits, 2 seeds each: runs, statistics, plot, MLflow."""
    result = CliRunner().invoke(app, ["study", "rsb", "--name", "rsb-tiny", "--epochs", "1", "--seeds", "2", "--set", "data.fraction=0.25"])
    assert result.exit_code == 0, result.output
    sweep_dir = workdir / "runs" / "rsb-tiny"
    state = read_state(str(sweep_dir))
    records = list(state["trials"].values())
    assert sorted((r["config"]["confirms"], r["config"]["runtime.seed"]) for r in records) == [(p, s) for p in ("a1", "a2", "a3") for s in (0, 1)]
    budgets = {r["config"]["confirms"]: r["progress"]["total"] for r in records}
    assert budgets == {"a1": 6, "a2": 3, "a3": 1} and all(r["progress"]["done"] == r["progress"]["total"] for r in records)
    values = {p: [r["metrics"]["val/top1"] for r in records if r["config"]["confirms"] == p] for p in budgets}
    table = (sweep_dir / "study.md").read_text()
    for procedure, label in (("a1", "A1"), ("a2", "A2"), ("a3", "A3")):
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} | {budgets[procedure]} |"))
        assert f"{statistics.mean(values[procedure]):.4f} ± {statistics.stdev(values[procedure]):.4f}" in row
    assert "the noise" in table and table in result.output
    assert (sweep_dir / "study.png").stat().st_size > 10_000
    assert "phase: study of seeds, 6 of 6 runs done" in CliRunner().invoke(app, ["status", str(sweep_dir)]).output

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("rsb-tiny").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 6 and {c.data.tags["recipe_search.phase"] for c in children} == {"study"}
    a1 = next(c for c in children if c.data.tags["recipe_search.confirms"] == "a1")
    a3 = next(c for c in children if c.data.tags["recipe_search.confirms"] == "a3")
    # Each procedure's own recipe, sized by rsb-digits' rules: the paper's LR x 64/2048, A1's smoothing.
    assert float(a1.data.params["optim.lr"]) == pytest.approx(5e-3 * 64 / 2048) and a1.data.params["reg.label_smoothing"] == "0.1"
    assert float(a3.data.params["optim.lr"]) == pytest.approx(8e-3 * 64 / 2048) and a3.data.params["reg.label_smoothing"] == "0.0"
    assert {"study/study.png", "study/study.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert parent.data.metrics["study/a1/top1_mean"] == pytest.approx(statistics.mean(values["a1"]))
