"""Few-shot and class-split subsets, for transfer studies (BiT's 1/5/10/25-shot transfer).

All functions take the labels of a dataset (``Datasets.train_targets``) and return
indices into it, for ``torch.utils.data.Subset``, or new labels. A typical split:
pretrain on digits 0-4, then transfer to 5 shots of digits 5-9::

    kept = split_classes(targets, [5, 6, 7, 8, 9])
    labels = remap_labels([targets[i] for i in kept], [5, 6, 7, 8, 9])  # 5 -> 0, ..., 9 -> 4
    chosen = shots_per_class_subset(labels, shots=5, seed=0)  # positions in kept
    indices = [kept[i] for i in chosen]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from spaces import DataError

__all__ = ["remap_labels", "shots_per_class_subset", "split_classes"]


def shots_per_class_subset(targets: Sequence[int], shots: int, seed: int) -> list[int]:
    """Sorted indices of exactly ``shots`` seeded examples of every class in ``targets``.

    One generator draws a permutation per class, in class order, and keeps its first
    ``shots``: with the same seed, the 1-shot subset lies inside the 5-shot one.

    Raises:
        DataError: ``shots`` < 1, no targets, or a class with fewer than ``shots`` examples.
    """
    if shots < 1:
        raise DataError(f"shots must be >= 1, but got {shots}")
    labels = np.asarray(targets)
    if labels.size == 0:
        raise DataError("cannot take shots from a dataset with no examples")
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < shots:
            raise DataError(f"class {label.item()} has {len(members)} examples, fewer than shots={shots}")
        keep.extend(rng.permutation(members)[:shots].tolist())
    return sorted(keep)


def _check_classes(classes: Sequence[int]) -> list[int]:
    wanted = [int(c) for c in classes]
    if not wanted:
        raise DataError("classes must name at least one class, but got none")
    repeated = sorted({c for c in wanted if wanted.count(c) > 1})
    if repeated:
        raise DataError(f"classes must not repeat, but {repeated} appear more than once in {wanted}")
    return wanted


def split_classes(targets: Sequence[int], classes: Sequence[int]) -> list[int]:
    """Sorted indices of the examples whose label is in ``classes``.

    Raises:
        DataError: ``classes`` is empty or repeats a class, or names a class with no examples.
    """
    wanted = _check_classes(classes)
    labels = np.asarray(targets)
    present = set(np.unique(labels).tolist())
    missing = [c for c in wanted if c not in present]
    if missing:
        raise DataError(f"classes {missing} have no examples; the targets hold classes {sorted(present)}")
    return np.flatnonzero(np.isin(labels, wanted)).tolist()


def remap_labels(targets: Sequence[int], classes: Sequence[int]) -> list[int]:
    """Labels renumbered 0..len(classes)-1 in the order of ``classes`` (``classes[k]`` becomes ``k``).

    Raises:
        DataError: ``classes`` is empty or repeats a class, or a target is not in ``classes``.
    """
    wanted = _check_classes(classes)
    new_label = {c: k for k, c in enumerate(wanted)}
    remapped = []
    for target in targets:
        target = int(target)
        if target not in new_label:
            raise DataError(f"label {target} is not one of classes {wanted}; keep them first with split_classes")
        remapped.append(new_label[target])
    return remapped
