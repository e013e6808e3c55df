"""timm's optimizer registry (names, and which take a momentum), as recipes validate against it.

Asking timm means importing it, which takes seconds (PyTorch and every timm model);
a CLI command that only prints a recipe should not pay that. The answer is kept in
the user's cache per timm version (``$RECIPE_SEARCH_CACHE`` or
``~/.cache/recipe-search``), so timm is imported once per installed version; the
version is read from the package metadata, without importing timm.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import metadata
from pathlib import Path

__all__ = ["optimizer_names", "takes_momentum"]

# timm names this project's training step cannot drive: apex's fused and bitsandbytes' optimizers need
# CUDA and those packages; AdaHessian needs a backward with create_graph=True.
_UNSUPPORTED_PREFIXES = ("fused", "bnb")
_UNSUPPORTED = frozenset({"adahessian"})


def _cache_file() -> Path:
    root = os.environ.get("RECIPE_SEARCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "recipe-search")
    return Path(root) / f"timm-{metadata.version('timm')}-optimizers.json"


def _ask_timm() -> dict[str, bool]:
    import timm.optim

    return {name: bool(timm.optim.get_optimizer_info(name).has_momentum) for name in timm.optim.list_optimizers()}


@functools.cache
def _registry() -> dict[str, bool]:
    path = _cache_file()
    try:
        registry = json.loads(path.read_text())
        if isinstance(registry, dict) and registry and all(isinstance(v, bool) for v in registry.values()):
            return registry
    except (OSError, ValueError):
        pass
    registry = _ask_timm()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(registry, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: ask timm in every process
    return registry


def optimizer_names() -> tuple[str, ...]:
    """The optimizer names of timm's ``create_optimizer_v2`` (``timm.optim.list_optimizers()``) a recipe may use."""
    return tuple(sorted(n for n in _registry() if n not in _UNSUPPORTED and not n.startswith(_UNSUPPORTED_PREFIXES)))


def takes_momentum(name: str) -> bool:
    """Whether timm's optimizer ``name`` takes a momentum (``timm.optim.get_optimizer_info(name).has_momentum``)."""
    return _registry()[name]
