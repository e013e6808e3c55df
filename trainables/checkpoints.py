"""Reading model weights from the files users point ``model.init`` at.

A checkpoint of this project (a run's checkpoint directory or its ``checkpoint.pt``),
a timm or torchvision state dict (``.pt``/``.pth``/``.safetensors``), or, for the
BiT models, an ``.npz`` file read by timm's own loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from spaces import DataError
from trainables.bit import load_bit_npz
from trainables.report import CHECKPOINT_FILE

__all__ = ["CHECKPOINT_FILE", "read_state_dict", "load_weights"]
_STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.body.", "backbone.")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A ResNet state dict from a file: this project's checkpoint, a timm / torchvision file, or a directory holding one."""
    file = Path(path)
    if file.is_dir():
        file = file / CHECKPOINT_FILE
    if not file.is_file():
        raise DataError(f"model.init: checkpoint {path!r} does not exist (a .pt/.pth/.safetensors file, or a run's checkpoint directory)")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(file))
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input error
        raise DataError(f"model.init: {path!r} is not a readable PyTorch checkpoint ({type(err).__name__})") from None
    for key in ("model", "state_dict"):  # this project's checkpoints; common training scripts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DataError(f"model.init: {path!r} holds no state dict")
    cleaned = {}
    for key, value in state.items():
        for prefix in _STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        cleaned[key] = value
    return cleaned


def load_weights(model: nn.Module, path: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Load the tensors of ``path`` that fit ``model`` (keys starting with ``skip`` left out); return the keys left at init.

    Raises ``DataError`` when nothing fits or a shared tensor has another shape.
    """
    if str(path).endswith(".npz"):
        load_bit_npz(model, path)
        return []
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(skip)}
    own = model.state_dict()
    shared = [k for k in state if k in own]
    if not shared:
        raise DataError(f"model.init: {path!r} holds no weights of this model (no key in common, e.g. {next(iter(own))})")
    wrong = [k for k in shared if state[k].shape != own[k].shape]
    if wrong:
        raise DataError(
            f"model.init: {path!r} does not fit the model ({len(wrong)} shapes differ, e.g. {wrong[0]}: "
            f"{tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}); is it a checkpoint of the same architecture?"
        )
    model.load_state_dict({k: state[k] for k in shared}, strict=False)
    return [k for k in own if k not in state and not k.endswith("num_batches_tracked") and not k.startswith(skip)]
