"""Confirmation over seeds: the best recipes of a search, trained again on fresh seeds.

A search names its winner from one run on one seed, and the best of many noisy
runs is biased upward by construction (the winner's curse). A confirmation
trains the K best recipes among the trials that ran their whole schedule again,
each on the same S seeds that no trial of the search used, with the full
schedule and no early stopping, concurrently on the cluster. The search's own
run of a recipe is not one of the S: it was selected on its seed.

Each recipe gets its mean, standard deviation and 95% confidence interval
(t-distribution); the confirmed winner is the best mean, and Welch's t-test says
whether it is ahead of the runner-up beyond the noise.

The confirmation is a Tune experiment of its own in ``runs/NAME/confirm`` (its
plan, state and MLflow run map in ``confirm/recipe-search/``), so an interrupted
one resumes with its finished seeds kept; its runs are nested under the sweep's
MLflow parent, tagged ``recipe_search.phase=confirm`` and with the trial they
confirm. The result is ``runs/NAME/recipe-search/confirmation.json``, which
``best``, ``status``, ``run:NAME`` and the report follow.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from spaces import SweepError, flatten, resolve_recipe

from search.layout import CONFIRM_DIR, CONFIRMATION_FILE, META_DIR, read_confirmation, read_run_map, read_state, sweep_ref, write_json

__all__ = [
    "ConfirmationPlan",
    "check_request",
    "confirmation_progress",
    "confirmation_summary",
    "format_confirmation",
    "fresh_seeds",
    "pending_confirmation",
    "read_plan",
    "replicate_progress",
    "replicate_summary",
    "write_plan",
    "plan_confirmation",
    "replicate_stats",
    "top_trials",
    "welch",
]

PLAN_FILE = f"{META_DIR}/plan.json"  # in the confirmation's own folder
ALPHA = 0.05  # Welch's test: "beyond the noise" at p < 0.05, two-sided


def confirm_dir(sweep_dir: str) -> str:
    return os.path.join(sweep_dir, CONFIRM_DIR)


# -- what to confirm -----------------------------------------------------------
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def top_trials(state: dict[str, Any], top: int) -> list[dict[str, Any]]:
    """The ``top`` best trials that ran their whole schedule, best first, one per distinct config:
    ``[{"trial_id", "ordinal", "value", "config"}]`` (ordinal: Tune's creation order, as in run names)."""
    metric, sign = state["metric"], (1 if state["mode"] == "max" else -1)
    full = []
    for ordinal, (trial_id, record) in enumerate(state["trials"].items(), start=1):
        value = (record.get("metrics") or {}).get(metric)
        if record["status"] == "TERMINATED" and not record.get("stopped_early") and _finite(value):
            full.append({"trial_id": trial_id, "ordinal": ordinal, "value": float(value), "config": record.get("config") or {}})
    chosen: list[dict[str, Any]] = []
    for trial in sorted(full, key=lambda t: (-sign * t["value"], t["ordinal"])):
        if all(trial["config"] != other["config"] for other in chosen):  # the same recipe twice confirms nothing more
            chosen.append(trial)
    return chosen[:top]


def fresh_seeds(state: dict[str, Any], recipes: list[dict[str, Any]], count: int) -> list[int]:
    """The ``count`` smallest seeds that no trial of the search ran with."""
    used = {int(flatten(recipe).get("runtime.seed", 0)) for recipe in recipes}
    used |= {int(record["config"]["runtime.seed"]) for record in state["trials"].values() if "runtime.seed" in (record.get("config") or {})}
    seeds, seed = [], 0
    while len(seeds) < count:
        if seed not in used:
            seeds.append(seed)
        seed += 1
    return seeds


class ConfirmationPlan(dict):
    """``{"top", "seeds", "metric", "mode", "recipes": [{"trial_id", "ordinal", "name", "value", "mlflow_run_id", "recipe"}]}``
    (``recipe``: the trial's resolved recipe, flat), kept in ``confirm/recipe-search/plan.json``."""

    @property
    def total(self) -> int:
        return len(self["recipes"]) * len(self["seeds"])

    def recipes(self) -> dict[str, dict[str, Any]]:
        return {entry["trial_id"]: entry["recipe"] for entry in self["recipes"]}


def check_request(top: int, seeds: int) -> None:
    if top < 1:
        raise SweepError(f"--top (--confirm) must be at least 1, but got {top}")
    if not 2 <= seeds <= 100:
        raise SweepError(f"--seeds must be 2 to 100 (a standard deviation needs two runs), but got {seeds}")


def plan_confirmation(sweep_dir: str, top: int, seeds: int, recipe_of, name_of) -> ConfirmationPlan:
    """The confirmation of a finished search: a stored plan is reused when it asks the same
    (a resume), refused when it asks another; else the ``top`` trials on ``seeds`` fresh seeds.

    ``recipe_of(config)`` resolves a trial's recipe; ``name_of(ordinal, config)`` is its run name.
    """
    check_request(top, seeds)
    path = os.path.join(confirm_dir(sweep_dir), PLAN_FILE)
    stored = read_plan(confirm_dir(sweep_dir))
    if stored is not None:
        if (stored["top"], len(stored["seeds"])) != (top, seeds):
            raise SweepError(
                f"sweep {os.path.basename(sweep_dir)!r} already has a confirmation of its top {stored['top']} over "
                f"{len(stored['seeds'])} seeds ({path}): finish it with --top {stored['top']} --seeds {len(stored['seeds'])}"
            )
        return stored
    state = read_state(sweep_dir)
    if not state or not state.get("finished"):
        raise SweepError(f"sweep {os.path.basename(sweep_dir)!r} has not finished its search: resume it first (recipe-search resume {sweep_ref(sweep_dir)})")
    chosen = top_trials(state, top)
    if not chosen:
        raise SweepError(f"sweep {os.path.basename(sweep_dir)!r} has no trial that ran its whole schedule with a result: nothing to confirm")
    run_ids = read_run_map(sweep_dir)["trials"]
    entries = []
    for trial in chosen:
        recipe = recipe_of(trial["config"]).model_dump(mode="json")
        entries.append({
            "trial_id": trial["trial_id"], "ordinal": trial["ordinal"], "name": name_of(trial["ordinal"], trial["config"]),
            "value": trial["value"], "mlflow_run_id": run_ids.get(trial["trial_id"]), "recipe": flatten(recipe),
        })
    plan = ConfirmationPlan(
        top=top, seeds=fresh_seeds(state, [unflatten_recipe(e["recipe"]) for e in entries], seeds),
        metric=state["metric"], mode=state["mode"], recipes=entries,
    )
    return write_plan(confirm_dir(sweep_dir), plan)


def write_plan(directory: str, plan: ConfirmationPlan) -> ConfirmationPlan:
    write_json(os.path.join(directory, PLAN_FILE), plan)
    return plan


def unflatten_recipe(flat: dict[str, Any]) -> dict[str, Any]:
    return resolve_recipe(flat).model_dump(mode="json")


def read_plan(directory: str) -> Optional[ConfirmationPlan]:
    """The plan of the replicate experiment in ``directory`` (a confirmation, or a study of seeds), or None."""
    path = os.path.join(directory, PLAN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        plan = ConfirmationPlan(data)
        plan["recipes"][0]["recipe"], plan["seeds"][0], plan["top"]  # noqa: B018 - the keys a plan needs
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise SweepError(f"{path} is damaged ({type(err).__name__}): remove the folder {directory!r} to run it anew") from None
    return plan


def pending_confirmation(sweep_dir: str, top: int, seeds: int) -> Optional[tuple[int, int]]:
    """``(top, seeds)`` of a confirmation asked for and not finished: the stored plan's, else the sweep's
    ``--confirm``/``--seeds`` (``top`` 0: none asked); None when there is none to run."""
    if read_confirmation(sweep_dir) is not None:
        return None
    stored = read_plan(confirm_dir(sweep_dir))
    if stored is not None:
        return stored["top"], len(stored["seeds"])
    return (top, seeds) if top > 0 else None


# -- statistics ----------------------------------------------------------------
def replicate_stats(values: list[float]) -> dict[str, Any]:
    """Mean, standard deviation (n - 1) and the 95% confidence interval of the mean (t-distribution)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def welch(first: list[float], second: list[float]) -> dict[str, Any]:
    """Welch's two-sided t-test of two recipes' seed results: ``{"t", "p", "beyond_noise"}``."""
    from scipy import stats

    if len(first) < 2 or len(second) < 2:
        return {"t": None, "p": None, "beyond_noise": False}
    result = stats.ttest_ind(first, second, equal_var=False)
    t, p = float(result.statistic), float(result.pvalue)
    if not math.isfinite(p):  # both without spread: equal means are not apart, different ones are
        same = sum(first) / len(first) == sum(second) / len(second)
        return {"t": None, "p": 1.0 if same else 0.0, "beyond_noise": not same}
    return {"t": t, "p": p, "beyond_noise": p < ALPHA}


# -- results -------------------------------------------------------------------
def _runs(plan: ConfirmationPlan, state: dict[str, Any], run_ids: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Per confirmed trial id, its confirmation runs so far: seed, status, value, MLflow run."""
    runs: dict[str, list[dict[str, Any]]] = {entry["trial_id"]: [] for entry in plan["recipes"]}
    for trial_id, record in state["trials"].items():
        config = record.get("config") or {}
        if config.get("confirms") not in runs:
            continue
        value = (record.get("metrics") or {}).get(plan["metric"])
        done = record["status"] == "TERMINATED" and not record.get("stopped_early") and _finite(value)
        runs[config["confirms"]].append({
            "trial_id": trial_id, "seed": config.get("runtime.seed"), "status": record["status"],
            "value": float(value) if done else None, "error": record.get("error"), "mlflow_run_id": run_ids.get(trial_id),
        })
    return runs


def confirmation_progress(sweep_dir: str) -> Optional[dict[str, Any]]:
    """``{"done", "total", "failed"}`` of a confirmation that has a plan, None otherwise."""
    return replicate_progress(confirm_dir(sweep_dir))


def replicate_progress(directory: str) -> Optional[dict[str, Any]]:
    plan = read_plan(directory)
    if plan is None:
        return None
    state = read_state(directory) or {"trials": {}}
    records = state["trials"].values()
    return {
        "done": sum(r["status"] in ("TERMINATED", "ERROR") for r in records),
        "failed": sum(r["status"] == "ERROR" for r in records),
        "total": plan.total,
    }


def confirmation_summary(sweep_dir: str) -> Optional[dict[str, Any]]:
    """The confirmation's statistics from its plan and the runs so far (None without a plan)."""
    return replicate_summary(confirm_dir(sweep_dir))


def replicate_summary(directory: str) -> Optional[dict[str, Any]]:
    """Statistics per recipe of the replicate experiment in ``directory`` (None without a plan).

    A recipe whose every seed gave a result ranks before one with a failed seed (a recipe that
    diverges on a fresh seed is not confirmed by its other runs); then by mean.
    """
    plan = read_plan(directory)
    if plan is None:
        return None
    state = read_state(directory) or {"trials": {}, "finished": False}
    runs = _runs(plan, state, read_run_map(directory)["trials"])
    sign = 1 if plan["mode"] == "max" else -1
    recipes = []
    for entry in plan["recipes"]:
        runs[entry["trial_id"]].sort(key=lambda r: (r["seed"] is None, r["seed"]))
        values = [run["value"] for run in runs[entry["trial_id"]] if run["value"] is not None]  # in seed order
        failed = sum(run["status"] == "ERROR" or (run["status"] == "TERMINATED" and run["value"] is None) for run in runs[entry["trial_id"]])
        recipes.append({
            "trial_id": entry["trial_id"], "name": entry["name"], "search_value": entry["value"],
            "mlflow_run_id": entry["mlflow_run_id"], "recipe": unflatten_recipe(entry["recipe"]),
            "runs": runs[entry["trial_id"]],
            "values": values, "failed": failed, **replicate_stats(values),
        })
    ranked = sorted(recipes, key=lambda r: (r["n"] == 0, r["failed"] > 0, -sign * r["mean"] if r["n"] else 0.0))
    summary: dict[str, Any] = {
        "metric": plan["metric"], "mode": plan["mode"], "top": plan["top"], "seeds": plan["seeds"],
        "finished": bool(state.get("finished")), "total": plan.total,
        "done": sum(run["status"] in ("TERMINATED", "ERROR") for r in recipes for run in r["runs"]),
        "recipes": ranked, "winner": ranked[0]["trial_id"] if ranked and ranked[0]["n"] else None,
    }
    if len(ranked) > 1 and ranked[0]["n"] and ranked[1]["n"]:
        test = welch(ranked[0]["values"], ranked[1]["values"])
        difference = sign * (ranked[0]["mean"] - ranked[1]["mean"])
        if ranked[1]["failed"] and not ranked[0]["failed"]:  # ranked on its failed seeds, not on the means
            test["beyond_noise"] = False
        summary["runner_up"] = {"trial_id": ranked[1]["trial_id"], "difference": difference, "failed": ranked[1]["failed"], **test}
    return summary


def confirmed_info(summary: dict[str, Any]) -> dict[str, Any]:
    """What ``best --json`` says of the confirmed winner: ``{"seeds", "mean", "std", "ci95", "runs", ...}``."""
    winner = next(r for r in summary["recipes"] if r["trial_id"] == summary["winner"])
    info = {
        "seeds": summary["seeds"], "mean": winner["mean"], "std": winner["std"], "ci95": winner["ci95"],
        "runs": [{k: run[k] for k in ("seed", "value", "mlflow_run_id", "status")} for run in winner["runs"]],
        "search_value": winner["search_value"], "failed": winner["failed"],
    }
    if "runner_up" in summary:
        info["runner_up"] = summary["runner_up"]
    return info


def _pm(recipe: dict[str, Any]) -> str:
    if not recipe["n"]:
        return "no result"
    if recipe["std"] is None:
        return f"{recipe['mean']:.4f} (1 seed)"
    return f"{recipe['mean']:.4f} ± {recipe['std']:.4f}"


def format_confirmation(summary: dict[str, Any]) -> str:
    """The table (recipe, search value, confirmed mean ± std, 95% CI) and the verdict on the winner."""
    metric = summary["metric"]
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines = [f"confirmation of the top {len(summary['recipes'])} over seeds {seeds} ({metric}, full schedule, no early stopping):"]
    width = max(len(r["name"]) for r in summary["recipes"])
    lines.append(f"  {'recipe':<{width}}  {'search':>7}  {'confirmed mean ± std':>20}  95% CI")
    for recipe in summary["recipes"]:
        ci = f"[{recipe['ci95'][0]:.4f}, {recipe['ci95'][1]:.4f}]" if recipe["ci95"] else ""
        failed = f"  {recipe['failed']} seed(s) failed" if recipe["failed"] else ""
        lines.append(f"  {recipe['name']:<{width}}  {recipe['search_value']:>7.4f}  {_pm(recipe):>20}  {ci}{failed}".rstrip())
    lines.append(verdict(summary))
    return "\n".join(lines)


def verdict(summary: dict[str, Any]) -> str:
    """One sentence: the confirmed winner, and whether it is ahead of the runner-up beyond the noise."""
    if summary["winner"] is None:
        return "no confirmation run gave a result: the search's winner stays unconfirmed"
    winner = next(r for r in summary["recipes"] if r["trial_id"] == summary["winner"])
    text = f"confirmed winner: {winner['name']} (trial {winner['trial_id']}), {summary['metric']} {_pm(winner)} over {winner['n']} seeds"
    runner = summary.get("runner_up")
    if runner is None:
        return text + "; no runner-up to compare with"
    other = next(r for r in summary["recipes"] if r["trial_id"] == runner["trial_id"])
    if runner.get("failed") and not winner["failed"]:
        return text + f"; {other['name']} ranks after it for its {runner['failed']} failed seed(s) (its mean over the others differs by {-runner['difference']:+.4f})"
    p = f"Welch's t-test p={runner['p']:.3g}" if runner["p"] is not None else "too few seeds for a test"
    if runner["beyond_noise"]:
        return text + f"; ahead of {other['name']} by {runner['difference']:+.4f}, beyond the noise ({p})"
    return text + f"; ahead of {other['name']} by {runner['difference']:+.4f}, within the noise ({p}): more seeds would tell them apart, or not"


def write_confirmation(sweep_dir: str, summary: dict[str, Any]) -> str:
    path = os.path.join(sweep_dir, CONFIRMATION_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def confirmed_recipe(sweep_dir: str) -> Optional[dict[str, Any]]:
    """The confirmed winner's entry of a finished confirmation (trial id, name, recipe, statistics), or None."""
    summary = read_confirmation(sweep_dir)
    if summary is None or summary.get("winner") is None:
        return None
    return {**next(r for r in summary["recipes"] if r["trial_id"] == summary["winner"]), "confirmed": confirmed_info(summary)}
