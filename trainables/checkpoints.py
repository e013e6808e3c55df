"""Reading model weights from the files users point ``model.init`` at.

A checkpoint of this project (a run's checkpoint directory or its ``checkpoint.pt``),
a timm or torchvision state dict (``.pt``/``.pth``/``.safetensors``), or, for the
BiT models, an ``.npz`` file read by timm's own loader.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
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
    """A ResNet state dict from a file: this project's checkpoint, a timm / torchvision file, or a directory holding one.

    Of this project's checkpoints, the weights the run delivered: the EMA's when its recipe kept one
    (the trial was scored and chosen on them), the model's otherwise.
    """
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
    if isinstance(state, dict) and state.get("delivers") == "ema" and isinstance(state.get("ema"), dict):
        state = state["ema"]  # this project's checkpoint of an EMA recipe: the weights its metrics were measured on
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


def local_checkpoint(location: str) -> str:
    """A checkpoint to read on this machine: a path as it is; on object storage (a URI: ``model.init=run:NAME``
    of a sweep kept there resolves to one), the file, or the run checkpoint directory's checkpoint file,
    downloaded once per machine and location into the temp folder (through ``pyarrow.fs``, as Ray's)."""
    if "://" not in location or location.startswith("file://"):
        return location.removeprefix("file://")
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        if fs.get_file_info(path).type == pyarrow.fs.FileType.Directory:
            path = f"{path.rstrip('/')}/{CHECKPOINT_FILE}"
        target = os.path.join(tempfile.gettempdir(), "recipe-search-checkpoints", hashlib.sha256(location.encode()).hexdigest()[:16], path.rpartition("/")[2])
        if not os.path.isfile(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            partial = f"{target}.{os.getpid()}.tmp"  # workers of one machine may fetch it at once
            with fs.open_input_stream(path) as source, open(partial, "wb") as f:
                while chunk := source.read(1 << 24):
                    f.write(chunk)
            os.replace(partial, target)
    except (OSError, ValueError) as err:
        shown = location.split("?")[0].split("://", 1)
        shown = f"{shown[0]}://{shown[1].split('/')[0].rpartition('@')[2]}/{shown[1].partition('/')[2]}"  # no user or password
        raise DataError(f"model.init: checkpoint {shown!r} cannot be read: {str(err).splitlines()[0][:200]}") from None
    return target


def load_weights(model: nn.Module, path: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Load the tensors of ``path`` (a path or a URI) that fit ``model`` (keys starting with ``skip`` left out);
    return the keys left at init.

    Raises ``DataError`` when nothing fits or a shared tensor has another shape.
    """
    path = local_checkpoint(str(path))
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
