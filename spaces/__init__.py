"""What is searched: recipes, search spaces and their presets (pure data: no Ray, no torch).

The one library this package asks at validation time is timm's optimizer registry
(names, and which optimizers take momentum): once per timm version, then read from the cache.
"""

from __future__ import annotations

from spaces.errors import DataError, RecipeError, RecipeSearchError, SpaceError, SweepError, TrainingError
from spaces.recipes import RECIPE_PRESETS, load_recipe, load_recipe_file, preset_overrides, recipe_names, resolve_recipe
from spaces.recipe import (
    SCHEDULES,
    TASKS,
    ClassificationRecipe,
    DetectionRecipe,
    Recipe,
    apply_overrides,
    check_keys,
    flatten,
    known_keys,
    parse_overrides,
    recipe_to_yaml,
    task_keys,
    unflatten,
    validate_recipe,
)
from spaces.space import SPACES_DIR, Param, Space, define_by_run, load_space, parse_space, space_names

__all__ = [
    "ClassificationRecipe",
    "DataError",
    "DetectionRecipe",
    "Param",
    "RECIPE_PRESETS",
    "Recipe",
    "RecipeError",
    "RecipeSearchError",
    "SCHEDULES",
    "SPACES_DIR",
    "Space",
    "SpaceError",
    "SweepError",
    "TASKS",
    "TrainingError",
    "apply_overrides",
    "check_keys",
    "define_by_run",
    "flatten",
    "known_keys",
    "load_recipe",
    "load_recipe_file",
    "load_space",
    "parse_overrides",
    "parse_space",
    "preset_overrides",
    "recipe_names",
    "recipe_to_yaml",
    "resolve_recipe",
    "space_names",
    "task_keys",
    "unflatten",
    "validate_recipe",
]
