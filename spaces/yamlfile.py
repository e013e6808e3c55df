"""Reading the YAML files users hand in (spaces, recipes): bounded, safe, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from spaces.errors import RecipeSearchError

__all__ = ["MAX_YAML_BYTES", "read_yaml"]

MAX_YAML_BYTES = 1_000_000  # a space or a recipe is a few hundred bytes; a bigger file is a mistake
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it


def read_yaml(path: Path, what: str, error: type[RecipeSearchError]) -> Any:
    """The data of the YAML file ``path`` (a ``what`` file), or ``error`` saying in one line why not."""
    try:
        with open(path, "rb") as f:  # read up to the cap, not by the size the file claims (a pipe has none)
            data = f.read(MAX_YAML_BYTES + 1)
        if len(data) > MAX_YAML_BYTES:
            raise error(f"{what} file {str(path)!r} is over {MAX_YAML_BYTES // 1_000_000} MB; a {what} is a small YAML file")
        return yaml.load(data.decode("utf-8"), Loader=_LOADER)
    except FileNotFoundError:
        raise error(f"{what} file {str(path)!r} does not exist") from None
    except yaml.YAMLError as err:
        raise error(f"{what} file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    except IsADirectoryError:
        raise error(f"{what} file {str(path)!r} is a directory") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{what} file {str(path)!r} cannot be read: {err}") from None
