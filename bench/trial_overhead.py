"""Overhead of a sweep's trials: sweep wall time beyond the training time inside its trials.

Runs sweeps on the embedded digits in one Ray instance, side by side: trials that
run the loop inside the Tune trial (the default for one worker), and trials that
each launch a Ray Train TorchTrainer. Trials run one at a time so that wall time
and in-trial time are comparable. Each launcher runs a short sweep (2 trials) and
a long one (--trials): the difference of their overheads over the difference of
their trial counts is what one more trial costs; the rest is the sweep's start
(the first trial actor's process and imports), paid once.

    python bench/trial_overhead.py [--trials 8] [--epochs 2] [--launchers auto,train]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from search.plan import SweepSpec, plan_sweep  # noqa: E402
from search.sweep import init_ray, run_sweep  # noqa: E402
from spaces import parse_space  # noqa: E402


def measure(launcher: str, trials: int, epochs: int, root: str) -> dict[str, float]:
    space = parse_space(
        {"name": "overhead", "recipe": "digits-smoke", "params": {"optim.lr": {"loguniform": [0.01, 0.3]}}}, "bench"
    )
    spec = SweepSpec(
        space=space,
        name=f"overhead-{launcher}-{trials}",
        overrides={"schedule.epochs": epochs},
        trials=trials,
        searcher="random",
        scheduler="fifo",
        concurrency=1,
        storage=os.path.join(root, "runs"),
        tracking_uri=f"sqlite:///{root}/mlflow.db",
        launcher=launcher,
    )
    state = run_sweep(plan_sweep(spec), out=io.StringIO())
    inside = sum(t.get("train_s", 0.0) for t in state["trials"].values())
    wall = state["fit_s"]
    return {"wall_s": wall, "train_s": inside, "overhead_s": wall - inside}


SHORT = 2  # trials of the short sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help=f"trials of the long sweep (more than {SHORT})")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--launchers", default="auto,train", help="comma-separated: auto (loop in the Tune trial), train")
    args = parser.parse_args()
    if args.trials <= SHORT:
        parser.error(f"--trials must be more than {SHORT}")
    init_ray()
    names = {"auto": "loop inside the Tune trial", "train": "TorchTrainer per trial (1 worker)"}
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        os.chdir(root)
        for launcher in args.launchers.split(","):
            short, long = (measure(launcher, n, args.epochs, root) for n in (SHORT, args.trials))
            per_trial = (long["overhead_s"] - short["overhead_s"]) / (args.trials - SHORT)
            rows[launcher] = (long, per_trial, short["overhead_s"] - SHORT * per_trial)
    print(f"overhead of {SHORT}- and {args.trials}-trial sweeps x {args.epochs} epochs on digits, one trial at a time")
    print(f"{'launcher':<34}{'wall s':>8}{'in-trial s':>12}{'per trial s':>13}{'start s':>9}{f'mean at {args.trials} s':>14}")
    for launcher, (long, per_trial, start) in rows.items():
        print(f"{names[launcher]:<34}{long['wall_s']:>8.1f}{long['train_s']:>12.1f}{per_trial:>13.2f}{start:>9.1f}"
              f"{long['overhead_s'] / args.trials:>14.2f}")
    if {"auto", "train"} <= rows.keys():
        print(f"ratio TorchTrainer / in-trial, per trial: {rows['train'][1] / max(rows['auto'][1], 1e-9):.1f}x")
    print("target: one more trial costs <= 1 s beyond its training (loop inside the Tune trial)")


if __name__ == "__main__":
    main()
