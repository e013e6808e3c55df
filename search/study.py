"""Studies: fixed grids of paired trials with a report, on top of a sweep; and studies of seeds.

``rethinking`` reproduces the comparison of *Rethinking ImageNet Pre-training*
on the user's detection data: the same detector from random initialization
and from a pretrained backbone, at several schedule lengths (and optionally
several data fractions), every pair on the same data and budget. The report is
box AP against iterations for both initializations (the shape of the paper's
Figure 1) and a table of final AP, written next to the sweep and logged to the
sweep's MLflow parent run.

``rsb`` measures what *ResNet strikes back* asks to be measured: the A1, A2 and A3
procedures, sized for the embedded digits by the rules of ``rsb-digits`` with their
relative budgets kept (600/300/100 epochs: 6/3/1 times A3's epochs), each trained on
S seeds. The report is accuracy against budget with mean ± std error bars, and a table
that says whether each step up in budget is ahead beyond the noise (Welch's t-test).
It runs as a replicate experiment (``search.sweep.run_replicates``): resumable, every
run in MLflow under the study's parent.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from typing import Any

from spaces import Param, Space, SweepError, flatten, load_space, resolve_recipe, validate_recipe

from trainables.report import Progress

from search.confirm import ConfirmationPlan, check_request, read_plan, replicate_summary, welch, write_plan
from search.layout import META_DIR, read_run_map
from search.plan import SweepPlan, SweepSpec

__all__ = ["GRID_STUDIES", "STUDIES", "format_rsb_table", "rethinking_spec", "rsb_spec", "run_rsb_study", "study_report", "format_table"]

STUDIES = ("rethinking", "rsb")
GRID_STUDIES = ("rethinking",)  # run as a grid sweep, reported by study_report
# key, label, preset, budget in units of A3's epochs, the paper's ImageNet top-1 (ResNet-50, Table 1)
RSB_PROCEDURES = (("a1", "A1", "rsb-a1-digits", 6, 80.4), ("a2", "A2", "rsb-a2-digits", 3, 79.8), ("a3", "A3", "rsb-digits", 1, 78.1))
PLOT_FILE = "study.png"
TABLE_FILE = "study.md"
RESULTS_FILE = f"{META_DIR}/study.json"
_INITS = ("scratch", "pretrained")


def rethinking_spec(spec: SweepSpec, schedules: list[float], fractions: list[float]) -> SweepSpec:
    """The sweep of the study: a grid of init x schedule multiplier (x data fraction), no early stopping."""
    if not schedules or any(not 0 < m <= 100 for m in schedules):
        raise SweepError(f"--schedules takes multipliers of the recipe's schedule in (0, 100], e.g. 1,2,4; got {schedules}")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise SweepError(f"--fractions takes data fractions in (0, 1], e.g. 1.0,0.1; got {fractions}")
    space = load_space("rethinking")
    params = {"model.init": Param(kind="choice", choices=list(_INITS)), "schedule.multiplier": Param(kind="choice", choices=sorted(set(schedules)))}
    if len(set(fractions)) > 1 or fractions[0] != 1.0:
        params["data.fraction"] = Param(kind="choice", choices=sorted(set(fractions)))
    for key in params:
        if key in spec.overrides:
            raise SweepError(f"--set {key} fixes a key the study varies; use --schedules / --fractions / --set model.pretrained")
    return replace(spec, space=space.model_copy(update={"params": params}), searcher="grid", scheduler="fifo")


def _label(multiplier: float) -> str:
    return f"{multiplier:g}x"


def _curves(client, runs: dict[str, Any], state: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """Per trial: its init, multiplier, fraction and the metric's history from MLflow (step = iteration)."""
    curves = []
    for trial_id, record in state["trials"].items():
        config = record.get("config") or {}
        run_id = runs["trials"].get(trial_id)
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric)) if run_id else []
        final = record.get("metrics") or {}
        curves.append(
            {
                "trial_id": trial_id,
                "status": record.get("status"),
                "init": config.get("model.init"),
                "multiplier": float(config.get("schedule.multiplier", 1.0)),
                "fraction": float(config.get("data.fraction", 1.0)),
                "length": progress.total if (progress := Progress.of_record(record)) else None,
                "history": history,
                "final": {k: v for k, v in final.items() if k.startswith("val/")},
                "error": record.get("error"),
            }
        )
    return sorted(curves, key=lambda c: (c["fraction"], c["multiplier"], c["init"] or ""))


def format_table(curves: list[dict[str, Any]], metric: str) -> str:
    """Markdown: one row per (data fraction, schedule), final AP of both inits side by side."""
    keys = sorted({(c["fraction"], c["multiplier"]) for c in curves})
    second = "val/segm_AP" if any("val/segm_AP" in c["final"] for c in curves) else "val/bbox_AP50"
    lines = [
        f"| data | schedule | iterations | scratch {metric} | pretrained {metric} | gap | scratch {second} | pretrained {second} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fraction, multiplier in keys:
        row = {c["init"]: c for c in curves if (c["fraction"], c["multiplier"]) == (fraction, multiplier)}

        def cell(init: str, key: str) -> str:
            curve = row.get(init)
            if curve is None or curve["status"] != "TERMINATED":
                return (curve or {}).get("status") or "-"
            value = curve["final"].get(key)
            return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"

        gap = "-"
        try:
            gap = f"{float(cell('pretrained', metric)) - float(cell('scratch', metric)):+.4f}"
        except ValueError:
            pass
        iterations = next((c["length"] for c in row.values() if c["length"]), "?")
        lines.append(
            f"| {fraction:g} | {_label(multiplier)} | {iterations} | {cell('scratch', metric)} | {cell('pretrained', metric)} | {gap} "
            f"| {cell('scratch', second)} | {cell('pretrained', second)} |"
        )
    return "\n".join(lines)


def _plot(curves: list[dict[str, Any]], metric: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({c["fraction"] for c in curves})
    multipliers = sorted({c["multiplier"] for c in curves})
    fig, axes = plt.subplots(1, len(fractions), figsize=(6.5 * len(fractions), 4.5), squeeze=False)
    colors = {"scratch": "tab:red", "pretrained": "tab:blue"}
    for ax, fraction in zip(axes[0], fractions):
        for curve in (c for c in curves if c["fraction"] == fraction and c["history"]):
            steps, values = zip(*curve["history"])
            shade = 0.45 + 0.55 * (multipliers.index(curve["multiplier"]) + 1) / len(multipliers)
            ax.plot(
                steps, values, color=colors.get(curve["init"], "gray"), alpha=shade, marker="o", markersize=3,
                linestyle="--" if curve["init"] == "scratch" else "-",
                label=f"{'random init' if curve['init'] == 'scratch' else 'pretrained backbone'}, {_label(curve['multiplier'])}",
            )
        ax.set_xlabel("training iterations")
        ax.set_ylabel(metric.removeprefix("val/").replace("_", " "))
        ax.set_title(f"{title}: {fraction:g} of the training data" if len(fractions) > 1 else title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study_report(sweep_dir: str, state: dict[str, Any], tracking_uri: str, metric: str = "val/bbox_AP") -> dict[str, Any]:
    """Plot, table and JSON of a finished study, written next to the sweep and logged to its MLflow parent run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = read_run_map(sweep_dir)
    curves = _curves(client, runs, state, metric)
    table = format_table(curves, metric)
    plot_path = os.path.join(sweep_dir, PLOT_FILE)
    table_path = os.path.join(sweep_dir, TABLE_FILE)
    _plot(curves, metric, plot_path, f"scratch vs pretrained ({state['name']})")
    with open(table_path, "w") as f:
        f.write(table + "\n")
    with open(os.path.join(sweep_dir, RESULTS_FILE), "w") as f:
        json.dump(curves, f, indent=1)
    parent = runs.get("parent_run_id")
    if parent:
        for path in (plot_path, table_path):
            client.log_artifact(parent, path, artifact_path="study")
        for curve in curves:
            value = curve["final"].get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                name = f"study/{curve['init']}_{_label(curve['multiplier'])}_data{curve['fraction']:g}/{metric.removeprefix('val/')}"
                client.log_metric(parent, name, value)
    return {"table": table, "plot": plot_path, "table_file": table_path, "curves": curves}


def rsb_spec(spec: SweepSpec, seeds: int, epochs: int) -> SweepSpec:
    """The study ``rsb``: A1, A2, A3 on the embedded digits at 6, 3 and 1 times ``epochs``, each on ``seeds`` seeds."""
    check_request(1, seeds)
    if not 1 <= epochs <= 1000:
        raise SweepError(f"--epochs (A3's; A2 runs 3x, A1 6x) must be 1 to 1000, but got {epochs}")
    for key in ("schedule.epochs", "schedule.warmup_epochs", "runtime.seed"):
        if key in spec.overrides:
            raise SweepError(f"--set {key} fixes a key the study varies; use --epochs / --seeds")
    space = Space(name="rsb-study", recipe="rsb-digits", params={}, description="A1/A2/A3 on the embedded digits, over seeds")
    return replace(spec, space=space, searcher=None, scheduler="fifo", trials=1, study="rsb", study_epochs=epochs, confirm_seeds=seeds)


def rsb_replicates(plan: SweepPlan) -> ConfirmationPlan:
    """The recipes of the study: each procedure's preset with the user's overrides, its scaled budget,
    and the paper's 5 warmup epochs scaled as A3's 100 epochs are (1 of 20 at the default)."""
    epochs = plan.spec.study_epochs
    entries = []
    for ordinal, (key, label, preset, budget, _) in enumerate(RSB_PROCEDURES, start=1):
        warmup = min(int(5 * epochs / 100 + 0.5), budget * epochs - 1)  # half up: 10 -> 1 (round() would give 0)
        layer = {**plan.overrides, "schedule.epochs": budget * epochs, "schedule.warmup_epochs": warmup}
        recipe = resolve_recipe(preset, layer)
        entries.append({
            "trial_id": key, "ordinal": ordinal, "name": f"{label} ({budget * epochs} epochs, {preset})", "value": None,
            "mlflow_run_id": None, "recipe": flatten(recipe.model_dump(mode="json")),
        })
    return ConfirmationPlan(top=len(entries), seeds=list(range(plan.spec.confirm_seeds)), metric=plan.space.metric, mode=plan.space.mode, recipes=entries)


def format_rsb_table(summary: dict[str, Any]) -> str:
    """Markdown: procedure, budget, the paper's number, mean ± std and 95% CI over seeds, and the step to the next budget."""
    metric = summary["metric"]
    rows = sorted(summary["recipes"], key=lambda r: r["trial_id"])  # a1, a2, a3: budget down
    lines = [
        f"| procedure | epochs | paper (ImageNet top-1) | {metric} mean ± std | 95% CI | seeds | vs the next smaller budget |",
        "|---|---|---|---|---|---|---|",
    ]
    paper = {key: top1 for key, _, _, _, top1 in RSB_PROCEDURES}
    for row, smaller in zip(rows, rows[1:] + [None]):
        epochs = validate_recipe(row["recipe"]).schedule.epochs
        value = f"{row['mean']:.4f} ± {row['std']:.4f}" if row["std"] is not None else (f"{row['mean']:.4f}" if row["n"] else "-")
        ci = f"[{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}]" if row["ci95"] else "-"
        step = "-"
        if smaller is not None and row["n"] and smaller["n"]:
            test = welch(row["values"], smaller["values"])
            p = f"p={test['p']:.3g}" if test["p"] is not None else "no test"
            step = f"{row['mean'] - smaller['mean']:+.4f} ({'beyond' if test['beyond_noise'] else 'within'} the noise, {p})"
        failed = f" ({row['failed']} failed)" if row["failed"] else ""
        lines.append(f"| {row['name'].split()[0]} | {epochs} | {paper[row['trial_id']]} | {value} | {ci} | {row['n']}{failed} | {step} |")
    return "\n".join(lines)


def _rsb_plot(summary: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    rows = [r for r in sorted(summary["recipes"], key=lambda r: r["trial_id"], reverse=True) if r["n"]]
    budgets = [validate_recipe(r["recipe"]).schedule.epochs for r in rows]
    for budget, row in zip(budgets, rows):
        ax.scatter([budget] * len(row["values"]), row["values"], color="tab:gray", s=14, alpha=0.7, zorder=2)
    ax.errorbar(budgets, [r["mean"] for r in rows], yerr=[r["std"] or 0.0 for r in rows], color="tab:blue", marker="o",
                capsize=5, linewidth=1.5, zorder=3, label="mean ± std over seeds")
    for budget, row in zip(budgets, rows):
        ax.annotate(row["name"].split()[0], (budget, row["mean"]), textcoords="offset points", xytext=(8, -4))
    ax.set_xlabel("training budget (epochs)")
    ax.set_ylabel(summary["metric"])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_rsb_study(plan: SweepPlan, out, resume: bool = False) -> dict[str, Any]:
    """Run (or finish) the study ``rsb`` of ``plan``; its summary with ``table`` and ``plot``, or ``{"interrupted": True}``."""
    from search.sweep import run_replicates, write_spec

    if not resume:
        write_spec(plan)
    replicates = read_plan(plan.sweep_dir) or write_plan(plan.sweep_dir, rsb_replicates(plan))
    tracker, stopped = run_replicates(plan, replicates, plan.sweep_dir, "study", out)
    if stopped:
        return stopped
    summary = replicate_summary(plan.sweep_dir)
    table = format_rsb_table(summary)
    plot_path, table_path = os.path.join(plan.sweep_dir, PLOT_FILE), os.path.join(plan.sweep_dir, TABLE_FILE)
    _rsb_plot(summary, plot_path, f"ResNet strikes back procedures on digits ({plan.name})")
    with open(table_path, "w") as f:
        f.write(table + "\n")
    with open(os.path.join(plan.sweep_dir, RESULTS_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    for path in (plot_path, table_path):
        tracker.client.log_artifact(tracker.parent_run_id, path, artifact_path="study")
    for row in summary["recipes"]:
        if row["n"]:
            tracker.client.log_metric(tracker.parent_run_id, f"study/{row['trial_id']}/{summary['metric'].removeprefix('val/')}_mean", row["mean"])
    return {**summary, "table": table, "plot": plot_path}
