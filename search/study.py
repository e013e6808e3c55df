"""Studies: fixed grids of paired trials with a report, on top of a sweep.

``rethinking`` reproduces the comparison of *Rethinking ImageNet Pre-training*
on the user's detection data: the same detector from random initialization
and from a pretrained backbone, at several schedule lengths (and optionally
several data fractions), every pair on the same data and budget. The report is
box AP against iterations for both initializations (the shape of the paper's
Figure 1) and a table of final AP, written next to the sweep and logged to the
sweep's MLflow parent run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from typing import Any

from spaces import Param, SweepError, load_space

from trainables.report import Progress

from search.layout import META_DIR, read_run_map
from search.plan import SweepSpec

__all__ = ["STUDIES", "rethinking_spec", "study_report", "format_table"]

STUDIES = ("rethinking",)
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
