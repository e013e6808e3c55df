"""The Tune trial function: resolve the trial's recipe, then train it.

One worker: the loop runs right inside the Tune trial on the trial's own
resources (no worker group to start). Several workers: the trial launches a Ray
Train ``TorchTrainer`` and holds no resources itself, so its workers get them
all; ``TuneReportCallback`` forwards the workers' reports to Tune.
"""

from __future__ import annotations

from typing import Any

from spaces import Recipe, RecipeSearchError, resolve_recipe
from trainables.report import TrialReport

__all__ = ["LAUNCHERS", "ConfirmationResources", "run_confirmation_trial", "run_trial", "trial_resources", "uses_ray_train"]

# auto: Ray Train only when a trial has several workers; train: always Ray Train.
LAUNCHERS = ("auto", "train")


def uses_ray_train(recipe: Recipe, launcher: str = "auto") -> bool:
    return launcher == "train" or recipe.runtime.workers > 1


def trial_resources(recipe: Recipe, launcher: str = "auto") -> dict[str, float]:
    """What the Tune trial itself reserves."""
    if uses_ray_train(recipe, launcher):
        # The TorchTrainer's workers reserve their own CPUs and GPUs. Tune wants a
        # non-empty bundle: one byte of memory holds nothing the workers need.
        return {"CPU": 0, "memory": 1}
    return {"CPU": recipe.runtime.cpus_per_worker, "GPU": recipe.runtime.gpus_per_worker}


def _worker_loop(config: dict[str, Any]) -> None:
    from trainables import TrainSession, train_recipe

    # An error raises out of the worker, also a recipe's: ray.train.report is a barrier of all workers,
    # so a rank that reported its error would wait there for ranks that wait for it in the gradient
    # all-reduce. Raised, it makes Ray Train stop every worker of the group within seconds.
    train_recipe(config["recipe"], TrainSession())


def _fit_with_ray_train(recipe: Recipe, storage: dict[str, Any], run_name: str, metric: str) -> None:
    """Ray Train does not retry (a recipe's error would fail the same way again): the Tune trial does,
    for crashes, and a retried trial's run of the same name goes on from its latest checkpoint.
    A worker's recipe error comes back as that error, naming the worker's rank."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    runtime = recipe.runtime
    resources = {"CPU": runtime.cpus_per_worker}
    if runtime.gpus_per_worker:
        resources["GPU"] = runtime.gpus_per_worker
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"recipe": recipe.model_dump(mode="json"), "metric": metric},
        scaling_config=ScalingConfig(
            num_workers=runtime.workers, use_gpu=runtime.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            **storage,  # storage_path, and storage_filesystem on object storage
            callbacks=[TuneReportCallback()],
            # Same name and storage on a retry or resume: Ray Train restores the run's latest checkpoint.
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    try:
        trainer.fit()
    except WorkerGroupError as err:
        for rank, failure in sorted(err.worker_failures.items()):
            if isinstance(failure, RecipeSearchError):
                raise type(failure)(f"{failure} (worker {rank} of {recipe.runtime.workers})") from None
        raise


def run_trial(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    overrides: dict[str, Any],
    train_storage: dict[str, Any],
    metric: str,
    launcher: str = "auto",
) -> None:
    """Tune function trainable: ``config`` holds the sampled dotted keys.

    A recipe that is invalid or diverges fails the same way on every retry, so it
    is not raised (Tune would retry it): the trial ends with a FAILED
    ``TrialReport`` (the error, a NaN metric), which the searcher records as
    FAIL, the tracker as FAILED, and the sweep's state as ERROR. Crashes
    (a killed process, a lost node) still raise and are retried.
    """
    from ray import tune

    try:
        recipe = resolve_recipe(base, config, overrides)
        if uses_ray_train(recipe, launcher):
            trial_id = tune.get_context().get_trial_id()
            _fit_with_ray_train(recipe, train_storage, f"train-{trial_id}", metric)
        else:
            from trainables import TuneSession, train_recipe

            train_recipe(recipe, TuneSession())
    except RecipeSearchError as err:
        tune.report(TrialReport.failure(metric, err).to_result())


def confirmation_recipe(recipes: dict[str, dict[str, Any]], config: dict[str, Any]) -> Recipe:
    """The recipe of a confirmation trial: the confirmed search trial's recipe on the trial's seed."""
    return resolve_recipe(recipes[config["confirms"]], {"runtime.seed": config["runtime.seed"]})


def run_confirmation_trial(config: dict[str, Any], *, recipes: dict[str, dict[str, Any]], metric: str, **kwargs: Any) -> None:
    """Tune function trainable of a confirmation: ``config`` = ``{"confirms": search trial id, "runtime.seed": seed}``,
    ``recipes`` = the confirmed trials' resolved recipes (flat keys)."""
    run_trial({"runtime.seed": config["runtime.seed"]}, base=recipes[config["confirms"]], overrides={}, metric=metric, **kwargs)


class ConfirmationResources:
    """What a confirmation trial reserves, from the recipe it confirms (``tune.with_resources`` takes a callable)."""

    def __init__(self, recipes: dict[str, dict[str, Any]], launcher: str = "auto") -> None:
        self.recipes, self.launcher = recipes, launcher

    def __call__(self, config: dict[str, Any]):
        from ray.tune import PlacementGroupFactory

        resources = trial_resources(confirmation_recipe(self.recipes, config), self.launcher)
        return PlacementGroupFactory([{"CPU": 0.0, "GPU": 0.0, **resources}])
