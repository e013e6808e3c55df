"""What the driver's callbacks cost per result, as a sweep grows: synthetic trials that only report.

N trials x R results each (a trainable that reports R epochs of made-up metrics and does nothing else)
run twice in one Ray instance, side by side: with Tune's bare callbacks, and through this project's
full stack (the sweep's state, its progress lines, MLflow runs in a SQLite store). Printed: results per
second of each, their ratio, at each N; and the full stack's driver cost per result at the largest N
over that at the smallest. Targets: ratio >= 0.8; cost per result at 1,000 trials within 1.5x of 100.
Where the difference goes: the seconds spent inside the project's callbacks (Tune's control loop waits
for them), and the CPU seconds of the driver process (its loop, the callbacks and the MLflow writer thread).

    python bench/driver_scale.py [--trials 100,1000] [--results 50]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from search.plan import SweepSpec, plan_sweep  # noqa: E402
from search.sweep import _callbacks, init_ray, write_spec  # noqa: E402
from spaces import parse_space  # noqa: E402
from trainables.report import TrialReport, Unit  # noqa: E402

CPU_PER_TRIAL = 0.1  # synthetic trials barely use their CPU: many run at once, as on a large cluster


def synthetic(config: dict, results: int) -> None:
    """R epochs of made-up metrics in the project's report format, reported as fast as Tune takes them."""
    from ray import tune

    for epoch in range(1, results + 1):
        value = config["optim.lr"] * epoch / results
        tune.report(TrialReport.period({"val/top1": value, "val/loss": 1.0 - value, "train/loss": 1.0 - value}, epoch, results, Unit.EPOCH).to_result())


HOOKS = ("setup", "on_step_begin", "on_step_end", "on_trial_start", "on_trial_result", "on_trial_complete",
         "on_trial_error", "on_checkpoint", "on_experiment_end")


def timed(callback, spent: list[float]):
    """``callback`` with each Tune hook's time added to ``spent[0]``."""
    for hook in HOOKS:
        method = getattr(callback, hook)

        def wrapper(*args, _method=method, **kwargs):
            started = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started

        setattr(callback, hook, wrapper)
    return callback


def measure(trials: int, results: int, full: bool, root: str) -> dict[str, float]:
    from ray import tune

    name = f"scale-{trials}-{'full' if full else 'bare'}"
    space = parse_space({"name": "scale", "recipe": "digits-smoke", "params": {"optim.lr": {"uniform": [0.01, 0.3]}}}, "bench")
    spec = SweepSpec(
        space=space, name=name, overrides={"schedule.epochs": results}, trials=trials, searcher=None, scheduler="fifo",
        storage=os.path.join(root, "runs"), tracking_uri=f"sqlite:///{root}/mlflow-{trials}.db",
    )
    plan = plan_sweep(spec)
    callbacks, spent = [], [0.0]
    if full:
        write_spec(plan)
        callbacks = [timed(c, spent) for c in _callbacks(plan, io.StringIO(), resume=False)]
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(synthetic, results=results), {"cpu": CPU_PER_TRIAL}),
        param_space={"optim.lr": tune.uniform(0.01, 0.3)},
        tune_config=tune.TuneConfig(num_samples=trials, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=plan.storage_root, callbacks=callbacks, verbose=0),
    )
    started, cpu = time.perf_counter(), time.process_time()
    grid = tuner.fit()
    if full:
        callbacks[0].flush(None)  # every MLflow write landed: counted in the time
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    done = sum(len(r.metrics_dataframe) for r in grid)
    assert done == trials * results, (done, trials * results)
    return {"seconds": seconds, "results": done, "per_s": done / seconds, "callbacks_s": spent[0], "driver_cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", default="100,1000", help="comma-separated trial counts")
    parser.add_argument("--results", type=int, default=50, help="results per trial")
    args = parser.parse_args()
    counts = [int(n) for n in args.trials.split(",")]
    init_ray()
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        for trials in counts:
            bare = measure(trials, args.results, False, root)
            full = measure(trials, args.results, True, root)
            rows[trials] = (bare, full)
            print(
                f"{trials:>5} trials x {args.results} results: bare {bare['per_s']:7.1f} results/s ({bare['seconds']:.1f} s), "
                f"full {full['per_s']:7.1f} results/s ({full['seconds']:.1f} s), ratio {full['per_s'] / bare['per_s']:.2f}; "
                f"in the project's callbacks {full['callbacks_s']:.1f} s; driver CPU bare {bare['driver_cpu_s']:.1f} s, "
                f"full {full['driver_cpu_s']:.1f} s",
                flush=True,
            )
    if len(counts) > 1:
        small, large = rows[counts[0]], rows[counts[-1]]
        # The driver's own cost per result: the full stack's time per result beyond the bare run's.
        cost = [(f["seconds"] - b["seconds"]) / f["results"] for b, f in (small, large)]
        print(f"driver cost per result: {cost[0] * 1e3:.2f} ms at {counts[0]} trials, {cost[1] * 1e3:.2f} ms at {counts[-1]}; "
              f"ratio {cost[1] / cost[0] if cost[0] > 0 else float('nan'):.2f} (target <= 1.5)")
        print(f"time per result, full stack: {small[1]['seconds'] / small[1]['results'] * 1e3:.2f} ms at {counts[0]} trials, "
              f"{large[1]['seconds'] / large[1]['results'] * 1e3:.2f} ms at {counts[-1]}")


if __name__ == "__main__":
    main()
