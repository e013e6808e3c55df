"""A sweep's report: the winner and what the search learned, in one self-contained HTML file.

``write_report`` reads the sweep's state, its MLflow runs (curves, cost, outcome)
and its stored Optuna study (importance, history, parallel coordinates), draws
the figures with Optuna's and matplotlib's plotting, and writes
``runs/NAME/report.html`` (images inline: it opens offline), logged with its
figures to the sweep's MLflow parent run. Every sweep writes it when it ends;
``recipe-search report NAME`` writes it for any finished or running sweep.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from spaces import SweepError, flatten, validate_recipe

from search.confirm import confirmation_summary, verdict
from search.layout import read_confirmation, read_run_map, read_state
from search.tracking import TAG_ORDINAL, TAG_OUTCOME, TAG_STOPPED_AT

__all__ = ["REPORT_FILE", "TrialRow", "write_report"]

REPORT_FILE = "report.html"
_COLORS = {"completed": "tab:blue", "stopped_early": "tab:orange", "failed": "tab:red", "interrupted": "tab:gray", "running": "tab:green"}


@dataclass
class TrialRow:
    """One trial as the report shows it."""

    trial_id: str
    ordinal: int
    name: str
    outcome: str
    value: Optional[float]  # best/<metric> over its epochs
    cost: Optional[float]  # cost/device_s
    stopped_at: str = ""
    searched: dict[str, Any] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    run_id: Optional[str] = None
    final: Optional[float] = None  # the metric at its last report: what the sweep ranks completed trials by


def _rows(state: dict[str, Any], sweep_dir: str, tracking_uri: str) -> list[TrialRow]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run_ids = read_run_map(sweep_dir).get("trials", {})
    metric = state["metric"]
    rows = []
    for position, (trial_id, record) in enumerate(state["trials"].items(), start=1):
        run_id = run_ids.get(trial_id)
        run = client.get_run(run_id) if run_id else None
        tags = run.data.tags if run else {}
        metrics = run.data.metrics if run else {}
        outcome = tags.get(TAG_OUTCOME) or ("running" if record["status"] in ("RUNNING", "PENDING") else record["status"].lower())
        curve = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric)) if run else []
        rows.append(
            TrialRow(
                trial_id, int(tags.get(TAG_ORDINAL, position)), run.info.run_name if run else trial_id, outcome,
                metrics.get(f"best/{metric}"), metrics.get("cost/device_s"), tags.get(TAG_STOPPED_AT, ""),
                dict(record.get("config") or {}), curve, run_id, (record.get("metrics") or {}).get(metric),
            )
        )
    return sorted(rows, key=lambda r: r.ordinal)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


PARALLEL_KEYS = 6  # parallel coordinates of the most important keys: more axes than this do not read


def _optuna_figures(study) -> dict[str, bytes]:
    """Importance, history and parallel coordinates with Optuna's own matplotlib plots (log axes for log params)."""
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    figures: dict[str, bytes] = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        if complete:
            figures["history"] = _png(optuna_plots.plot_optimization_history(study).figure)
        if len(complete) >= 2 and any(t.params for t in complete):
            importance = optuna.importance.get_param_importances(study)
            figures["importance"] = _png(optuna_plots.plot_param_importances(study).figure)
            axes = optuna_plots.plot_parallel_coordinate(study, params=list(importance)[:PARALLEL_KEYS])
            axes.figure.set_size_inches(11, 4.8)
            figures["parallel"] = _png(axes.figure)
    return figures


def _curves(rows: list[TrialRow], metric: str, unit: str) -> bytes:
    """Learning curves coloured by outcome; an x where the scheduler cut a trial."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for row in rows:
        if not row.curve:
            continue
        steps, values = zip(*row.curve)
        ax.plot(steps, values, color=_COLORS.get(row.outcome, "black"), alpha=0.8, linewidth=1.2)
        if row.outcome == "stopped_early":
            ax.plot(steps[-1], values[-1], marker="x", color="black", markersize=7)
    for outcome, color in _COLORS.items():
        if any(r.outcome == outcome and r.curve for r in rows):
            ax.plot([], [], color=color, label=outcome.replace("_", " "))
    ax.plot([], [], marker="x", linestyle="", color="black", label="cut by the scheduler")
    ax.set_xlabel(unit)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("learning curves")
    return _png(fig)


def pareto_front(points: list[tuple[float, float]], mode: str) -> list[tuple[float, float]]:
    """The (cost, value) points no other point beats on both: cheaper or as cheap, and better."""
    sign = 1 if mode == "max" else -1
    front, best = [], -math.inf
    for cost, value in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if sign * value > best:
            front.append((cost, value))
            best = sign * value
    return front


def _pareto(rows: list[TrialRow], metric: str, mode: str) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    points = [(r.cost, r.value) for r in rows if r.cost is not None and r.value is not None and math.isfinite(r.value)]
    for row in rows:
        if row.cost is not None and row.value is not None:
            ax.scatter(row.cost, row.value, color=_COLORS.get(row.outcome, "black"), s=30, zorder=3)
            ax.annotate(f"t{row.ordinal:02d}", (row.cost, row.value), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(points, mode)
    if front:
        ax.step(*zip(*front), where="post", color="black", linewidth=1, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("cost (device-seconds)")
    ax.set_ylabel(f"best {metric}")
    ax.grid(alpha=0.3)
    ax.set_title("accuracy against cost")
    return _png(fig)


def _recipe_diff(state: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, base value, winner's value) for every key the winner changes from the sweep's base recipe."""
    best, base = state.get("best"), state.get("base_recipe")
    if not best or not base:
        return []
    winner = flatten(validate_recipe(best["recipe"]).model_dump(mode="json"))
    base = flatten(validate_recipe(base).model_dump(mode="json"))
    return [(k, base.get(k), v) for k, v in winner.items() if base.get(k) != v] + [(k, v, None) for k, v in base.items() if k not in winner]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


_STYLE = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; cursor: pointer; } .grid { display: flex; flex-wrap: wrap; gap: 16px; } figure { margin: 0; } .grid img { width: 530px; }
.wide img { width: 1080px; } .scroll { overflow-x: auto; } .winner { background: #eef6ee; padding: 8px 12px; border-left: 4px solid #2a2; } .muted { color: #777; font-size: 12px; }
"""
# Click a column header to sort the trials by it (numbers numerically).
_SORT = """
document.querySelectorAll("table.sortable th").forEach((th, i) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], rows = Array.from(body.rows), up = th.dataset.up !== "1";
  const key = r => { const t = r.cells[i].dataset.v ?? r.cells[i].textContent; const n = parseFloat(t); return isNaN(n) ? t : n; };
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (up ? 1 : -1));
  th.dataset.up = up ? "1" : "0"; rows.forEach(r => body.appendChild(r));
}));
"""


def _img(name: str, png: Optional[bytes], caption: str) -> str:
    if png is None:
        return f'<p class="muted">{caption}: not enough finished trials yet.</p>'
    data = base64.b64encode(png).decode()
    return f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption class="muted">{caption}</figcaption></figure>'


def _table(rows: list[TrialRow], state: dict[str, Any]) -> str:
    searched = sorted({k for r in rows for k in r.searched})
    head = ["trial", "run", "outcome", f"final {state['metric']}", f"best {state['metric']} (any epoch)", "cost (device-s)", *searched]
    lines = ['<table class="sortable"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        outcome = row.outcome.replace("_", " ") + (f" ({row.stopped_at})" if row.stopped_at else "")
        values = [f"t{row.ordinal:02d}", row.name, outcome, row.final, row.value, row.cost, *(row.searched.get(k) for k in searched)]
        cells = "".join(f'<td data-v="{v}">{_cell(v)}</td>' if isinstance(v, (int, float)) else f"<td>{_cell(v)}</td>" for v in values)
        lines.append(f"<tr>{cells}</tr>")
    return "\n".join(lines) + "</tbody></table>"


def _winner(state: dict[str, Any], rows: list[TrialRow]) -> str:
    best = state.get("best")
    if not best:
        return "<p>No trial has run its whole schedule yet: the winner is chosen among those that have.</p>"
    row = next((r for r in rows if r.trial_id == best["trial_id"]), None)
    name = html.escape(row.name if row else best["trial_id"])
    text = f'<div class="winner"><b>{name}</b> (trial {html.escape(best["trial_id"])}): {html.escape(best["metric"])} = {best["value"]:.4f}'
    baseline = state.get("baseline")
    if baseline and baseline.get("value") is not None:
        sign = 1 if best.get("mode", "max") == "max" else -1
        text += f" (the base recipe: {baseline['value']:.4f}, gain {sign * (best['value'] - baseline['value']):+.4f})"
    text += "</div>"
    diff = _recipe_diff(state)
    if diff:
        text += "<p>How its recipe differs from the base recipe:</p><table><tr><th>key</th><th>base</th><th>winner</th></tr>"
        text += "".join(f"<tr><td>{html.escape(k)}</td><td>{_cell(b)}</td><td>{_cell(w)}</td></tr>" for k, b, w in diff) + "</table>"
    return text


def _confirmation(summary: Optional[dict[str, Any]]) -> str:
    """The confirmation over seeds: each confirmed recipe's search value against its mean ± std on fresh seeds."""
    if summary is None:
        return ""
    seeds = ", ".join(map(str, summary["seeds"]))
    state = "" if summary.get("finished") else f" (running: {summary['done']} of {summary['total']} runs done)"
    head = ["recipe", "trial", "search run", "confirmed mean", "std", "95% CI", "seed runs"]
    lines = [f"<h2>Confirmation over seeds</h2><p class=\"muted\">The top {len(summary['recipes'])} recipes trained again on seeds {seeds}, "
             f"full schedule, no early stopping{state}.</p><table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in summary["recipes"]:
        ci = f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]" if r["ci95"] else ""
        runs = ", ".join(f"{v:.4f}" for v in r["values"]) + (f" ({r['failed']} failed)" if r["failed"] else "")
        cells = [html.escape(r["name"]), html.escape(r["trial_id"]), _cell(r["search_value"]), _cell(r["mean"] if r["n"] else None), _cell(r["std"]), ci, runs]
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append(f"</table><p>{html.escape(verdict(summary))}</p>" if summary["winner"] else "</table>")
    return "".join(lines)


def _html(state: dict[str, Any], rows: list[TrialRow], figures: dict[str, bytes], confirmation: Optional[dict[str, Any]] = None) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.outcome] = counts.get(row.outcome, 0) + 1
    summary = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items())
    complete = counts.get("completed", 0)
    parts = [
        f"<h1>Sweep {html.escape(state['name'])}</h1>",
        f'<p class="muted">{len(rows)} of {state["num_samples"]} trials: {summary}. Objective: {state["mode"]} {html.escape(state["metric"])}.</p>',
        "<h2>Winner of the search</h2>", _winner(state, rows), _confirmation(confirmation),
        "<h2>What the search learned</h2><div class=\"grid\">",
        _img("importance", figures.get("importance"), f"parameter importance (Optuna's fANOVA over the {complete} trials that ran their whole schedule)"),
        _img("history", figures.get("history"), "optimization history: each completed trial's value and the best so far"),
        '</div><div class="wide">',
        _img("parallel", figures.get("parallel"), f"parallel coordinates of the {PARALLEL_KEYS} most important searched keys (log axes for log-uniform keys)"),
        "</div><h2>Training</h2><div class=\"grid\">",
        _img("curves", figures.get("curves"), "learning curves by outcome; x: where the scheduler cut a trial"),
        _img("pareto", figures.get("pareto"), "best value against cost, with the Pareto front"),
        "</div><h2>Trials</h2><p class=\"muted\">Click a column to sort.</p><div class=\"scroll\">", _table(rows, state), "</div>",
    ]
    return f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(state['name'])}</title><style>{_STYLE}</style></head><body>{''.join(parts)}<script>{_SORT}</script></body></html>"


def _study(optuna_storage: Optional[str], name: str):
    if not optuna_storage:
        return None
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=optuna_storage)
    except KeyError:  # no trial asked yet
        return None


def write_report(sweep_dir: str, tracking_uri: str, optuna_storage: Optional[str]) -> dict[str, str]:
    """Write ``report.html`` and its figures next to the sweep, log them to the MLflow parent run; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from mlflow.tracking import MlflowClient

    state = read_state(sweep_dir)
    if state is None:
        raise SweepError(f"sweep {sweep_dir!r} has no recorded state yet (it has not started a trial)")
    rows = _rows(state, sweep_dir, tracking_uri)
    study = _study(optuna_storage, state["name"])
    figures = _optuna_figures(study) if study is not None and study.trials else {}
    unit = next((r["progress"]["unit"] for r in state["trials"].values() if r.get("progress")), "epoch")
    figures["curves"] = _curves(rows, state["metric"], unit)
    figures["pareto"] = _pareto(rows, state["metric"], state["mode"])
    paths = {"report": os.path.join(sweep_dir, REPORT_FILE)}
    with open(paths["report"], "w") as f:
        f.write(_html(state, rows, figures, read_confirmation(sweep_dir) or confirmation_summary(sweep_dir)))
    figure_dir = os.path.join(sweep_dir, "report")
    os.makedirs(figure_dir, exist_ok=True)
    for name, png in figures.items():
        paths[name] = os.path.join(figure_dir, f"{name}.png")
        with open(paths[name], "wb") as f:
            f.write(png)
    parent = read_run_map(sweep_dir).get("parent_run_id")
    if parent:
        client = MlflowClient(tracking_uri)
        client.log_artifact(parent, paths["report"])
        client.log_artifacts(parent, figure_dir, artifact_path="report")
    return paths
