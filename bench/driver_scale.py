"""What the driver's callbacks cost per result, as a sweep grows: synthetic trials that only report.

N trials x R results each (a trainable that reports R epochs of made-up metrics and does nothing else)
run twice in one Ray instance, side by side: with Tune's bare callbacks, and through this project's
full stack (the sweep's state, its progress lines, MLflow runs in a SQLite store). Printed: results per
second of each, their ratio, at each N; and the full stack's driver cost per result at the largest N
over that at the smallest. Targets: ratio >= 0.8; cost per result at 1,000 trials within 1.5x of 100.

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


def measure(trials: int, results: int, full: bool, root: str) -> dict[str, float]:
    from ray import tune

    name = f"scale-{trials}-{'full' if full else 'bare'}"
    space = parse_space({"name": "scale", "recipe": "digits-smoke", "params": {"optim.lr": {"uniform": [0.01, 0.3]}}}, "bench")
    spec = SweepSpec(
        space=space, name=name, overrides={"schedule.epochs": results}, trials=trials, searcher=None, scheduler="fifo",
        storage=os.path.join(root, "runs"), tracking_uri=f"sqlite:///{root}/mlflow-{trials}.db",
    )
    plan = plan_sweep(spec)
    callbacks = []
    if full:
        write_spec(plan)
        callbacks = list(_callbacks(plan, io.StringIO(), resume=False))
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(synthetic, results=results), {"cpu": CPU_PER_TRIAL}),
        param_space={"optim.lr": tune.uniform(0.01, 0.3)},
        tune_config=tune.TuneConfig(num_samples=trials, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=plan.storage_root, callbacks=callbacks, verbose=0),
    )
    started = time.perf_counter()
    grid = tuner.fit()
    seconds = time.perf_counter() - started
    if full:
        callbacks[0].flush(None)  # every MLflow write landed: counted in the time
        seconds = time.perf_counter() - started
    done = sum(len(r.metrics_dataframe) for r in grid)
    assert done == trials * results, (done, trials * results)
    return {"seconds": seconds, "results": done, "per_s": done / seconds}


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
                f"full {full['per_s']:7.1f} results/s ({full['seconds']:.1f} s), ratio {full['per_s'] / bare['per_s']:.2f}",
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
