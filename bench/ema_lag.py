"""EMA lag at the scheduler's first cut: what an EMA trial is judged on, with and without timm's EMA warmup.

Trains the rsb-digits recipe at ``optim.lr=0.01`` (mid-range of the rsb space; the preset's
2.5e-4 barely moves in 3 epochs) with ``reg.ema_decay=0.99`` (the space's EMA choice) on
the same seeds, side by side in one run, and stops each at epoch ``--at`` (ASHA's default
first rung): ``val/top1`` is the EMA weights' score (what the scheduler judges),
``val_model/top1`` the raw weights'. Without warmup the EMA still holds a large share of
the random initialization there; with it (``reg.ema_warmup``, the default) it tracks the
raw weights.

    python bench/ema_lag.py [--seeds 3] [--at 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spaces import resolve_recipe  # noqa: E402
from trainables import LocalSession, train_classifier  # noqa: E402


class _Enough(Exception):
    pass


class _StopAt(LocalSession):
    """A local session that ends the trial after ``at`` reports, as a scheduler's cut would."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def report(self, report, checkpoint_dir) -> None:
        super().report(report, checkpoint_dir)
        if len(self.reports) >= self.at:
            raise _Enough


def at_cut(seed: int, warmup: bool, at: int) -> tuple[float, float]:
    recipe = resolve_recipe("rsb-digits", {"optim.lr": 0.01, "reg.ema_decay": 0.99, "reg.ema_warmup": warmup, "runtime.seed": seed})
    session = _StopAt(at)
    try:
        train_classifier(recipe, session)
    except _Enough:
        pass
    metrics = session.reports[-1].metrics
    return metrics["val/top1"], metrics["val_model/top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--at", type=int, default=3, help="the epoch of the first cut (ASHA's grace period)")
    args = parser.parse_args()
    rows = {False: [], True: []}
    print(f"rsb-digits, optim.lr=0.01, reg.ema_decay=0.99, scores at epoch {args.at} of 20")
    print(f"{'seed':>4}  {'EMA warmup':>10}  {'val/top1 (EMA)':>14}  {'val_model/top1 (raw)':>20}  {'EMA / raw':>9}")
    for seed in range(args.seeds):
        for warmup in (False, True):
            ema, raw = at_cut(seed, warmup, args.at)
            rows[warmup].append((ema, raw))
            print(f"{seed:>4}  {'on' if warmup else 'off':>10}  {ema:>14.4f}  {raw:>20.4f}  {ema / raw:>9.2f}", flush=True)
    for warmup in (False, True):
        ema = statistics.mean(e for e, _ in rows[warmup])
        raw = statistics.mean(r for _, r in rows[warmup])
        print(f"mean  {'on' if warmup else 'off':>10}  {ema:>14.4f}  {raw:>20.4f}  {ema / raw:>9.2f}")


if __name__ == "__main__":
    main()
