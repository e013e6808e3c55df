"""The one exception hierarchy of recipe-search.

Libraries raise these; only the CLI turns them into a one-line message and an
exit code.
"""

from __future__ import annotations

__all__ = [
    "RecipeSearchError",
    "RecipeError",
    "SpaceError",
    "SweepError",
    "DataError",
    "TrainingError",
]


class RecipeSearchError(Exception):
    """Base of every error that recipe-search reports to a user."""


class RecipeError(RecipeSearchError, ValueError):
    """A recipe, a preset name or a ``--set`` override is invalid."""


class SpaceError(RecipeSearchError, ValueError):
    """A search space is invalid."""


class SweepError(RecipeSearchError):
    """A sweep cannot be started, found or read."""


class DataError(RecipeSearchError):
    """A dataset cannot be found or read."""


class TrainingError(RecipeSearchError):
    """A trial failed while training (for example its loss became NaN)."""
