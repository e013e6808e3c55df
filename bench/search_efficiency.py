"""Search efficiency: how fast each search finds a good recipe, side by side in one run.

On the embedded digits (space ``rsb``, recipe ``rsb-digits``), over several searcher seeds:

  (a) random search, no early stopping (every trial runs its whole schedule);
  (b) Ray Tune's stock ``OptunaSearch`` (TPE; a trial ASHA stopped is told COMPLETE with its
      short-budget score) with Ray's ``ASHAScheduler`` at the requested grace period;
  (c) this project's searcher and scheduler: TPE told the truth (cut trials PRUNED) and ASHA
      with its first cut past the longest warmup the space samples.

For each: the trial-epochs and wall time until a trial that ran its whole schedule first
reaches the final best of (a) on the same seed, and the best value of each at equal budget
(the smallest total trial-epochs of the three). Target: (c) reaches (a)'s best with at most a
quarter of (a)'s trial-epochs, and is never worse than (b).

    python bench/search_efficiency.py [--seeds 3] [--trials 12] [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray import tune  # noqa: E402
from ray.tune import Callback  # noqa: E402

from search.plan import SweepSpec, plan_sweep  # noqa: E402
from search.sweep import build_tuner, init_ray, sweep_trainable, write_spec  # noqa: E402
from spaces import define_by_run, flatten  # noqa: E402
from trainables.report import TrialReport  # noqa: E402

METHODS = {
    "a": "random, no early stopping",
    "b": "stock OptunaSearch (TPE) + ASHA",
    "c": "recipe-search: TPE told PRUNED + fair ASHA",
}


class Reports(Callback):
    """Every report in the order the driver saw it: (seconds since start, trial, epoch, value, completed)."""

    def __init__(self, metric: str) -> None:
        self.metric, self.started, self.rows, self.seen = metric, time.time(), [], set()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        report = TrialReport.from_result(result)
        if report is None or report.progress is None or (trial.trial_id, report.progress.done) in self.seen:
            return
        self.seen.add((trial.trial_id, report.progress.done))
        self.rows.append((time.time() - self.started, trial.trial_id, report.progress.done, report.metrics.get(self.metric), report.completed))


def _plan(root: str, name: str, searcher: str, scheduler: str, seed: int, trials: int, epochs: int):
    spec = SweepSpec(
        space="rsb", name=name, overrides={"schedule.epochs": epochs}, trials=trials, searcher=searcher, scheduler=scheduler,
        storage=os.path.join(root, "runs"), tracking_uri=f"sqlite:///{root}/mlflow.db", seed=seed, concurrency=2,
    )
    return plan_sweep(spec)


def _stock_tuner(plan, callbacks: list, requested_grace: int):
    """Ray Tune's own parts, as a user would assemble them: OptunaSearch + ASHAScheduler."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from search.algorithms import tpe_startup_trials

    metric, mode = plan.space.metric, plan.space.mode
    sampler = optuna.samplers.TPESampler(seed=plan.spec.seed, multivariate=True, group=True, n_startup_trials=tpe_startup_trials(plan.spec.trials))
    searcher = OptunaSearch(space=define_by_run(plan.space, flatten(plan.recipe.model_dump())), metric=metric, mode=mode, sampler=sampler)
    scheduler = ASHAScheduler(metric=metric, mode=mode, max_t=plan.max_epochs, grace_period=requested_grace, reduction_factor=3)
    return tune.Tuner(
        sweep_trainable(plan),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=plan.spec.trials, max_concurrent_trials=2),
        run_config=tune.RunConfig(name=plan.name, storage_path=plan.storage_root, callbacks=callbacks, verbose=0),
    )


def run_method(method: str, root: str, seed: int, trials: int, epochs: int) -> list[tuple]:
    searcher, scheduler = {"a": ("random", "fifo"), "b": ("tpe", "asha"), "c": ("tpe", "asha")}[method]
    plan = _plan(root, f"{method}-seed{seed}", searcher, scheduler, seed, trials, epochs)
    write_spec(plan)  # the sweep's folder, where its Optuna study is stored
    reports = Reports(plan.space.metric)
    tuner = _stock_tuner(plan, [reports], plan.spec.grace_period) if method == "b" else build_tuner(plan, [reports])
    tuner.fit()
    return reports.rows


def summarize(rows: list[tuple], target: float, budget: int) -> dict:
    """Trial-epochs and seconds until a full run first reaches ``target``; best full run within ``budget`` trial-epochs."""
    reached = next(((i + 1, t) for i, (t, _, _, value, done) in enumerate(rows) if done and value is not None and value >= target), None)
    within = [value for _, _, _, value, done in rows[:budget] if done and value is not None]
    finals = [value for _, _, _, value, done in rows if done and value is not None]
    return {
        "epochs": len(rows), "wall": rows[-1][0] if rows else 0.0, "best": max(finals, default=float("nan")),
        "reach_epochs": reached[0] if reached else None, "reach_wall": reached[1] if reached else None,
        "best_at_budget": max(within, default=float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    init_ray()
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory(prefix="search-efficiency-") as root:
        for seed in range(args.seeds):
            rows = {m: run_method(m, root, seed, args.trials, args.epochs) for m in METHODS}
            target = summarize(rows["a"], float("inf"), 0)["best"]
            budget = min(len(r) for r in rows.values())
            for method, method_rows in rows.items():
                results[method].append(summarize(method_rows, target, budget))
            line = "  ".join(f"({m}) {_reach(results[m][-1])}" for m in METHODS)
            print(f"seed {seed}: target {target:.4f} (best of (a)), equal budget {budget} trial-epochs: {line}", flush=True)
    _table(results, args)


def _reach(r: dict) -> str:
    return f"reached at {r['reach_epochs']} ep / {r['reach_wall']:.0f} s" if r["reach_epochs"] else f"not reached in {r['epochs']} ep"


def _table(results: dict[str, list[dict]], args) -> None:
    print(f"\n{args.seeds} seeds, {args.trials} trials of {args.epochs} epochs each, 2 CPUs (means over seeds; "
          "trial-epochs to reach count the whole run's budget where it was not reached)")
    print("| search | reached (a)'s best | trial-epochs to reach | wall to reach (s) | trial-epochs in all | wall in all (s) | best at equal budget |")
    print("|---|---|---|---|---|---|---|")
    for method, label in METHODS.items():
        rs = results[method]
        reached = sum(r["reach_epochs"] is not None for r in rs)
        to_reach = statistics.mean(r["reach_epochs"] or r["epochs"] for r in rs)
        wall = statistics.mean(r["reach_wall"] if r["reach_wall"] is not None else r["wall"] for r in rs)
        print(f"| ({method}) {label} | {reached}/{len(rs)} | {to_reach:.0f} | {wall:.0f} | "
              f"{statistics.mean(r['epochs'] for r in rs):.0f} | {statistics.mean(r['wall'] for r in rs):.0f} | "
              f"{statistics.mean(r['best_at_budget'] for r in rs):.4f} |")
    a, b, c = (statistics.mean(r["reach_epochs"] or r["epochs"] for r in results[m]) for m in "abc")
    print(f"\ntrial-epochs to reach (a)'s best, (c)/(a): {c / a:.2f} (target <= 0.25); (c)/(b): {c / b:.2f}")
    best_b, best_c = (statistics.mean(r["best_at_budget"] for r in results[m]) for m in "bc")
    print(f"best at equal budget, (c) - (b): {best_c - best_b:+.4f} (target >= 0)")


if __name__ == "__main__":
    main()
