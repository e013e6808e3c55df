"""The one exception hierarchy of recipe-search.

Libraries raise these; only the CLI turns them into a one-line message and an
exit code.
"""

from __future__ import annotations

import reprlib

__all__ = [
    "short",
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


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 6


def short(value: object) -> str:
    """A bounded repr of user input for error messages: a YAML alias bomb or a huge list stays one short line."""
    return _REPR.repr(value)
