"""Per-trial overhead of a sweep: (sweep wall time - training time inside trials) / trials.

Runs the same 6-trial sweep on the embedded digits twice in one Ray instance,
side by side: trials that run the loop inside the Tune trial (the default for
one worker), and trials that each launch a Ray Train TorchTrainer. Trials run
one at a time so that wall time and in-trial time are comparable.

    python bench/trial_overhead.py [--trials 6] [--epochs 2]
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
        name=f"overhead-{launcher}",
        overrides={"schedule.epochs": epochs},
        trials=trials,
        searcher="random",
        scheduler="fifo",
        concurrency=1,
        storage=os.path.join(root, "runs"),
        tracking_uri=f"sqlite:///{root}/mlflow-{launcher}.db",
        launcher=launcher,
    )
    state = run_sweep(plan_sweep(spec), out=io.StringIO())
    inside = sum(t.get("train_s", 0.0) for t in state["trials"].values())
    wall = state["fit_s"]
    return {"wall_s": wall, "train_s": inside, "overhead_per_trial_s": (wall - inside) / trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    init_ray()
    with tempfile.TemporaryDirectory() as root:
        os.chdir(root)
        results = {launcher: measure(launcher, args.trials, args.epochs, root) for launcher in ("auto", "train")}
    print(f"per-trial overhead, {args.trials} trials x {args.epochs} epochs on digits, one trial at a time")
    print(f"{'launcher':<34}{'wall s':>9}{'in-trial s':>12}{'overhead s/trial':>18}")
    names = {"auto": "loop inside the Tune trial", "train": "TorchTrainer per trial (1 worker)"}
    for launcher, r in results.items():
        print(f"{names[launcher]:<34}{r['wall_s']:>9.1f}{r['train_s']:>12.1f}{r['overhead_per_trial_s']:>18.2f}")
    ratio = results["train"]["overhead_per_trial_s"] / max(results["auto"]["overhead_per_trial_s"], 1e-9)
    print(f"ratio TorchTrainer / in-trial overhead: {ratio:.1f}x  (target: in-trial <= 3 s per trial)")


if __name__ == "__main__":
    main()
