"""Search spaces over dotted recipe keys, and their Optuna define-by-run form.

A space names a base recipe, the metric to optimize, and parameters::

    name: rsb
    recipe: rsb-digits
    metric: val/top1
    mode: max
    params:
      optim.name: {choice: [lamb, adamw, sgd]}
      optim.lr: {loguniform: [1.0e-4, 3.0e-2]}
      optim.momentum: {uniform: [0.8, 0.99], when: {optim.name: sgd}}
      data.rand_augment: {int: [1, 9], format: "rand-m{}-mstd0.5-inc1"}

``when`` samples a key only when earlier keys (or the base recipe) have one of
the given values; ``format`` turns a sampled number into the recipe value.
The define-by-run function needs only the ``suggest_*`` methods of an
``optuna.Trial``, so this module does not import Optuna.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spaces.errors import RecipeError, SpaceError, short
from spaces.yamlfile import read_yaml
from spaces.recipes import load_recipe
from spaces.recipe import CONDITIONS, Recipe, applies, apply_overrides, check_keys, check_applies, flatten, known_keys, unflatten, validate_recipe

__all__ = ["Param", "Space", "SPACES_DIR", "space_names", "load_space", "define_by_run"]

SPACES_DIR = Path(__file__).parent / "presets"
# What a space optimizes when it does not say.
DEFAULT_METRICS = {"classification": "val/top1", "detection": "val/bbox_AP"}
_KINDS = ("uniform", "loguniform", "int", "choice")


MAX_CHOICES = 1000


class Param(BaseModel):
    """One searched key: a distribution, and optionally a condition and a format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["uniform", "loguniform", "int", "choice"]
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Optional[list[Any]] = None
    log: bool = False
    when: dict[str, list[Any]] = Field(default_factory=dict)
    format: Optional[str] = None
    relative: bool = Field(False, description="low/high (or choices) multiply the base recipe's value of the key")

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        """Accept ``{loguniform: [lo, hi]}`` as well as the explicit fields."""
        if not isinstance(data, dict):
            raise ValueError(f"must be a mapping such as {{uniform: [0, 1]}}, but got {short(data)}")
        data = dict(data)
        kinds = [k for k in _KINDS if k in data]
        if len(kinds) > 1:
            raise ValueError(f"takes one distribution, but got {kinds}")
        if kinds:
            kind = kinds[0]
            values = data.pop(kind)
            data["kind"] = kind
            if kind == "choice":
                data["choices"] = values
            else:
                if not isinstance(values, (list, tuple)) or len(values) != 2:
                    raise ValueError(f"{kind} takes [low, high], but got {short(values)}")
                data["low"], data["high"] = values
        when = data.get("when") or {}
        if not isinstance(when, dict):
            raise ValueError(f"'when' must map keys to values, but got {short(when)}")
        data["when"] = {k: v if isinstance(v, list) else [v] for k, v in when.items()}
        return data

    @model_validator(mode="after")
    def _bounds(self) -> "Param":
        if self.format is not None:
            try:
                self.format.format(self.low if self.low is not None else (self.choices or [0])[0])
            except (IndexError, KeyError, ValueError, AttributeError, TypeError) as err:
                raise ValueError(f"format {short(self.format)} takes one value as {{}}: {err}") from None
        if self.kind == "choice":
            if not self.choices:
                raise ValueError("choice needs at least one value")
            if len(self.choices) > MAX_CHOICES:
                raise ValueError(f"choice takes at most {MAX_CHOICES} values (a search samples a few dozen), but got {len(self.choices)}")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.kind} needs low and high")
        if not self.low < self.high:
            raise ValueError(f"{self.kind} bounds must have low < high, but got [{self.low}, {self.high}]")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, but got {self.low}")
        if self.kind == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"int bounds must be whole numbers, but got [{self.low}, {self.high}]")
        return self

    def render(self, sampled: Any, base: Any = None) -> Any:
        """The recipe value for a sampled value (``base``: the base recipe's value, for relative params)."""
        if self.relative:
            if not isinstance(base, (int, float)) or isinstance(base, bool):
                raise SpaceError(f"a relative param multiplies the base recipe's value, which must be a number, but it is {short(base)}")
            value = base * sampled
            return int(round(value)) if isinstance(base, int) else value
        return self.format.format(sampled) if self.format is not None else sampled

    def edge_values(self, base: Any = None) -> list[Any]:
        """The values at the space's edges, each checked against the recipe schema."""
        if self.kind == "choice":
            return [self.render(c, base) for c in self.choices]
        if self.kind == "int":
            return [self.render(int(self.low), base), self.render(int(self.high), base)]
        return [self.render(self.low, base), self.render(self.high, base)]

    def start_value(self, base: Any) -> Any:
        """What Optuna samples to reproduce the base recipe's value (1 for a relative param)."""
        value = 1 if self.relative else base
        inside = value in self.choices if self.kind == "choice" else self.low <= value <= self.high
        if not inside:
            raise SpaceError(f"the base recipe's value {short(base)} is outside the param's range, so the space cannot start from it")
        return value

    def suggest(self, trial: Any, key: str) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(key, self.low, self.high, log=self.kind == "loguniform" or self.log)


class Space(BaseModel):
    """A named search space around a base recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    recipe: str = Field(min_length=1, description="base recipe: a preset name or a YAML file")
    metric: Optional[str] = Field(None, description="what the search optimizes [default: val/top1, detection val/bbox_AP]")
    mode: Literal["max", "min"] = "max"
    params: dict[str, Param] = Field(default_factory=dict)
    start: bool = Field(False, description="the first trial is the base recipe itself (a baseline the search must beat)")

    @model_validator(mode="after")
    def _keys(self) -> "Space":
        keys = known_keys()
        for key, param in self.params.items():
            if key not in keys:
                raise ValueError(f"params: unknown recipe key {key!r}")
            for cond in param.when:
                if cond not in keys:
                    raise ValueError(f"params.{key}.when: unknown recipe key {cond!r}")
        return self

    def base_recipe(self, overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The flat base recipe of the space, with overrides applied."""
        flat = load_recipe(self.recipe)
        flat.update(overrides or {})
        return flat

    def check(self, overrides: Optional[dict[str, Any]] = None, base: Optional[dict[str, Any]] = None) -> Recipe:
        """Validate the base recipe (or the flat ``base``) and every edge value of every param against the schema.

        Keys of another task than the base recipe's fail naming the task; a ``--set`` key or a
        param that does not apply to the recipe (``optim.momentum`` on LAMB) fails saying what it needs.
        """
        overrides = overrides or {}
        flat = {**base, **overrides} if base is not None else self.base_recipe(overrides)
        task = flat.get("task", "classification")
        check_keys(overrides, where="--set", task=task, recipe=self.recipe)
        for key, param in self.params.items():
            check_keys({key: None, **dict.fromkeys(param.when)}, where=f"space {self.name!r}", task=task, recipe=self.recipe)
        recipe = validate_recipe(unflatten(flat), name=self.recipe)
        check_applies(recipe, [k for k in overrides if not self._searches_condition_of(k)], f"recipe {self.recipe}", "--set ")
        resolved = flatten(recipe.model_dump())
        for key, param in self.params.items():
            self._check_param(key, param, recipe, resolved.get(key))
        if self.start:
            self.start_point(resolved)
        metric = self.metric or DEFAULT_METRICS[recipe.task]
        other = [m for task, m in DEFAULT_METRICS.items() if task != recipe.task]
        if any(metric.split("_")[0] == m.split("_")[0] for m in other) or (recipe.task == "detection" and metric.startswith("val/top")):
            raise SpaceError(f"space {self.name!r}: metric {metric!r} is not reported by task={recipe.task} (e.g. {DEFAULT_METRICS[recipe.task]})")
        return recipe

    def _searches_condition_of(self, key: str) -> bool:
        return CONDITIONS.get(key, ("",))[0] in self.params

    def _condition(self, key: str, param: Param, recipe: Recipe) -> dict[str, Any]:
        """Values of the ``when`` keys under which ``key`` applies (the first combination that makes it apply)."""
        combos = [dict(zip(param.when, values)) for values in itertools.product(*param.when.values())] or [{}]
        for combo in combos:
            try:
                if applies(validate_recipe(apply_overrides(recipe, combo)), key):
                    return combo
            except RecipeError:
                continue
        return combos[0]

    def _check_param(self, key: str, param: Param, recipe: Recipe, base_value: Any) -> None:
        """Every edge value of ``param`` (with its ``when`` condition met) is a valid recipe that uses it."""
        condition = self._condition(key, param, recipe)
        try:
            values = param.edge_values(base_value)
        except SpaceError as err:
            raise SpaceError(f"space {self.name!r}: params.{key}: {err}") from None
        for value in values:
            try:
                checked = validate_recipe(apply_overrides(recipe, {**condition, key: value}))
            except RecipeError as err:
                reason = str(err).removeprefix("invalid recipe: ")
                raise SpaceError(f"space {self.name!r}: params.{key} allows {short(value)}, which the recipe rejects: {reason}") from None
            if not self._searches_condition_of(key):
                try:
                    check_applies(checked, [key], f"recipe {self.recipe}", f"space {self.name!r}: params.")
                except RecipeError as err:
                    raise SpaceError(f"{err} (or sample it only then, with when:)") from None

    def start_point(self, base: dict[str, Any]) -> dict[str, Any]:
        """Optuna's values for the base recipe (``start: true``), for ``points_to_evaluate``."""
        point: dict[str, Any] = {}
        for key, param in self.params.items():
            if any(point.get(cond, base.get(cond)) not in allowed for cond, allowed in param.when.items()):
                continue
            if param.format is not None:
                raise SpaceError(f"space {self.name!r}: start: true cannot start from formatted param {key}")
            try:
                point[key] = param.start_value(base.get(key))
            except SpaceError as err:
                raise SpaceError(f"space {self.name!r}: params.{key}: {err}") from None
        return point


def _format_error(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def space_names() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def parse_space(data: Any, source: str) -> Space:
    """Validate space data read from ``source``."""
    if not isinstance(data, dict):
        raise SpaceError(f"space {source!r} must be a mapping with name, recipe and params")
    try:
        return Space.model_validate(data)
    except ValidationError as err:
        raise SpaceError(f"invalid space {source!r}: {_format_error(err)}") from None


def load_space(name_or_path: str) -> Space:
    """A preset space name or a YAML file -> a validated ``Space``."""
    path = SPACES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        path = Path(name_or_path)
        if not (name_or_path.endswith((".yaml", ".yml")) or (path.exists() and not path.is_dir())):
            raise SpaceError(f"unknown space {name_or_path!r}; available: {', '.join(space_names())} (or a .yaml file)")
    return parse_space(read_yaml(path, "space", SpaceError), str(path))


class DefineByRun:
    """An Optuna define-by-run function sampling a space's params in order.

    A class, not a closure, so that a searcher holding it can be pickled when
    Tune saves the search state. Returns the rendered values of formatted
    params (they override the raw numbers Optuna recorded), so the trial
    config holds recipe values only.
    """

    def __init__(self, space: Space, base: dict[str, Any]) -> None:
        self.space = space
        self.base = dict(base)

    def __call__(self, trial: Any) -> dict[str, Any]:
        values: dict[str, Any] = {}
        rendered: dict[str, Any] = {}
        for key, param in self.space.params.items():
            if any(values.get(cond, self.base.get(cond)) not in allowed for cond, allowed in param.when.items()):
                continue
            values[key] = param.render(param.suggest(trial, key), self.base.get(key))
            if param.format is not None or param.relative:
                rendered[key] = values[key]
        return rendered


def define_by_run(space: Space, base: dict[str, Any]) -> Callable[[Any], dict[str, Any]]:
    """The define-by-run function of ``space`` over the flat base recipe ``base``."""
    return DefineByRun(space, base)
