"""Classification datasets: the embedded digits, and ImageFolder roots.

``digits`` is scikit-learn's bundled copy of the UCI handwritten digits (1,797
real 8x8 images, 10 classes), shipped inside the package: it needs no download.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset, default_collate
from torchvision.datasets import DatasetFolder, ImageFolder

from spaces import DataError
from spaces.errors import short
from spaces.recipe import ClassificationData
from trainables.fewshot import shots_per_class_subset, split_classes

__all__ = [
    "EMBEDDED_DATASETS",
    "MAX_UNREADABLE_FRACTION",
    "Datasets",
    "ReadableImageFolder",
    "DatasetSummary",
    "build_datasets",
    "summarize_classification_data",
    "check_image_folder",
    "check_training_set",
    "collate_readable",
    "digits_split",
    "stratified_subset",
]

logger = logging.getLogger(__name__)
MAX_UNREADABLE_FRACTION = 0.01  # a trial fails once more than 1% of a dataset cannot be decoded

EMBEDDED_DATASETS = ("digits",)
DIGITS_VAL_FRACTION = 0.2  # 1,437 train / 360 val, stratified, fixed seed
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageList(Dataset):
    """In-memory PIL images with labels, transformed on access."""

    def __init__(self, images: Sequence[Image.Image], targets: Sequence[int], transform: Optional[Callable] = None):
        self.images = list(images)
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    num_classes: int
    train_targets: list[int]


def stratified_subset(targets: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices of a seeded subset holding ``fraction`` of every class (at least one each)."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        count = max(1, int(round(len(members) * fraction)))
        keep.extend(rng.choice(members, size=count, replace=False).tolist())
    return sorted(keep)


@functools.lru_cache(maxsize=None)
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (8x8 images of 0..16 grey levels, labels) and the fixed stratified
    split of their indices (train, val): one split for the classification and detection digits.

    scikit-learn is imported here, on first use: about a second that a worker training on an ImageFolder
    or COCO does not pay. Its import draws from Python's global RNG; the RNG's state is put back, so a
    trial seeded before the first use gets the same numbers as the next trial in the process.
    """
    state = random.getstate()
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    finally:
        random.setstate(state)
    bunch = load_digits()
    idx_train, idx_val = train_test_split(
        np.arange(len(bunch.target)), test_size=DIGITS_VAL_FRACTION, stratify=bunch.target, random_state=0
    )
    return bunch.images, bunch.target, idx_train, idx_val


@functools.lru_cache(maxsize=4)
def _digit_images(size: int) -> tuple[tuple[Image.Image, ...], np.ndarray, np.ndarray, np.ndarray]:
    """The decoded digits at ``size``, once per process (a reused trial actor does not decode them again)."""
    images, target, idx_train, idx_val = digits_split()
    # 0..16 grey levels -> 8-bit RGB, upscaled once so augmentations work on real pixels.
    pixels = (images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    decoded = tuple(Image.fromarray(p, mode="L").convert("RGB").resize((size, size), Image.BICUBIC) for p in pixels)
    return decoded, target, idx_train, idx_val


def _digits(size: int) -> tuple[ImageList, ImageList, int]:
    images, target, idx_train, idx_val = _digit_images(size)  # transforms make new images: sharing them is safe
    train = ImageList([images[i] for i in idx_train], target[idx_train])
    val = ImageList([images[i] for i in idx_val], target[idx_val])
    return train, val, 10


def check_image_folder(root: str | os.PathLike) -> None:
    """Fail with a ``DataError`` unless ``root`` has train/ and val/ with non-empty class folders."""
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"dataset path {short(str(root))} {what} (data.name takes 'digits' or an ImageFolder root)")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"dataset {str(root)!r} has no {split}/ folder (expected {split}/CLASS/IMAGE)")
    classes = None
    for split in ("train", "val"):
        split_dir = root / split
        found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        if not found:
            raise DataError(f"dataset {str(split_dir)!r} has no class folders (expected {split}/CLASS/IMAGE)")
        for name in found:
            if not any(f.suffix.lower() in _IMAGE_SUFFIXES for f in (split_dir / name).iterdir()):
                raise DataError(f"class folder {str(split_dir / name)!r} holds no images")
        if classes is None:
            classes = found
        elif found != classes:
            raise DataError(f"dataset {str(root)!r}: train/ and val/ have different class folders")


@functools.lru_cache(maxsize=8)
def _scan(directory: str, classes: tuple[tuple[str, int], ...], extensions: Optional[tuple[str, ...]], allow_empty: bool) -> tuple:
    """torchvision's scan of a split folder, once per process, each file checked to resolve inside the dataset root."""
    samples = DatasetFolder.make_dataset(directory, dict(classes), extensions, None, allow_empty)
    top = os.path.realpath(os.path.dirname(os.path.abspath(directory)))
    for path, _ in samples:
        if os.path.commonpath([top, os.path.realpath(path)]) != top:
            raise DataError(f"dataset file {path!r} points outside the dataset root {top!r}")
    return tuple(samples)


class ReadableImageFolder(ImageFolder):
    """torchvision's ImageFolder that skips images it cannot decode, keeps to its root, and scans a folder once.

    An undecodable image comes back as None (``collate_readable`` drops it and
    counts it); a file that resolves outside the dataset root (a symlink) is refused.
    The list of files is kept per process: the next trial a reused actor runs does not
    walk (and check) a large dataset again; files added to the folder meanwhile are not seen.
    """

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False) -> list[tuple[str, int]]:
        if is_valid_file is not None:
            return DatasetFolder.make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)
        return list(_scan(os.fspath(directory), tuple(sorted(class_to_idx.items())), extensions, allow_empty))

    def __getitem__(self, index: int) -> Optional[tuple[Any, int]]:
        try:
            return super().__getitem__(index)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL.UnidentifiedImageError is an OSError
            logger.warning("skipping unreadable image %s: %s", self.samples[index][0], err)
            return None


def collate_readable(batch: list[Optional[tuple[Any, int]]]) -> tuple[Any, Any, int]:
    """Default collation of the readable samples, and the count of skipped ones."""
    readable = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(readable)
    if not readable:
        return None, None, skipped
    images, targets = default_collate(readable)
    return images, targets, skipped


def _image_folder(root: str) -> tuple[Dataset, Dataset, int]:
    check_image_folder(root)
    train = ReadableImageFolder(os.path.join(root, "train"))
    val = ReadableImageFolder(os.path.join(root, "val"))
    return train, val, len(train.classes)


class Relabelled(Dataset):
    """The samples of ``indices`` with labels mapped through ``mapping`` (a class split)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], mapping: dict[int, int]) -> None:
        self.dataset, self.indices, self.mapping = dataset, list(indices), mapping
        targets = list(dataset.targets)
        self.targets = [mapping[targets[i]] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Optional[tuple[Any, int]]:
        sample = self.dataset[self.indices[index]]
        return None if sample is None else (sample[0], self.mapping[sample[1]])


def _split(dataset: Dataset, classes: list[int], num_classes: int) -> Relabelled:
    if max(classes) >= num_classes:
        raise DataError(f"data.classes {classes} names class {max(classes)}, but the dataset has classes 0..{num_classes - 1}")
    kept = split_classes(dataset.targets, classes)
    return Relabelled(dataset, kept, {c: i for i, c in enumerate(classes)})


def _with_transform(dataset: Dataset, transform: Callable) -> Dataset:
    dataset.transform = transform
    return dataset


def build_datasets(cfg: ClassificationData, seed: int, train_transform: Callable, eval_transform: Callable) -> Datasets:
    """The train and val sets a recipe names: class split, then few-shot and ``data.fraction`` on train."""
    if cfg.name == "digits":
        train, val, num_classes = _digits(max(cfg.train_size, cfg.test_size))
    else:
        train, val, num_classes = _image_folder(cfg.name)
    _with_transform(train, train_transform)
    _with_transform(val, eval_transform)
    if cfg.classes is not None:
        train, val = _split(train, cfg.classes, num_classes), _split(val, cfg.classes, num_classes)
        num_classes = len(cfg.classes)
    targets = list(train.targets)
    if cfg.shots_per_class is not None:
        keep = shots_per_class_subset(targets, cfg.shots_per_class, seed)
        train = Subset(train, keep)
        targets = [targets[i] for i in keep]
    if cfg.fraction < 1.0:
        keep = stratified_subset(targets, cfg.fraction, seed)
        train = Subset(train, keep)
        targets = [targets[i] for i in keep]
    return Datasets(train=train, val=val, num_classes=num_classes, train_targets=targets)


def check_training_set(cfg: ClassificationData, seed: int, batch_size: int, workers: int, epochs: bool) -> None:
    """Before a trial starts: the classes and shots a recipe names exist, there are at least two classes,
    and (epoch schedules) a worker's batch fits in the training set; ``DataError`` naming what is wrong."""
    data = build_datasets(cfg, seed, None, None)  # raises on classes or shots the data does not have
    if data.num_classes < 2:
        raise DataError(f"dataset {cfg.name!r} gives {data.num_classes} class: a classifier needs at least 2 (data.classes, or the class folders)")
    for split, dataset in (("train", data.train), ("val", data.val)):
        _check_decodes(cfg.name, split, dataset)
    if epochs and batch_size // workers > len(data.train):
        raise DataError(f"optim.batch_size {batch_size} exceeds the {len(data.train)} training images of {cfg.name!r} (per worker {batch_size // workers})")


DECODE_SAMPLE = 16  # images of each split decoded before a sweep starts


def _check_decodes(name: str, split: str, dataset: Dataset) -> None:
    """Decode ``DECODE_SAMPLE`` images spread over an ImageFolder split, as its loader will: a folder of text
    files or truncated images fails here, in one line, rather than in every trial. Two or more unreadable
    images, over ``MAX_UNREADABLE_FRACTION`` of the sample, are refused (a trial would fail past that share)."""
    ids, inner = _sample_ids(dataset), dataset
    while isinstance(inner, (Subset, Relabelled)):
        inner = inner.dataset
    if not isinstance(inner, ImageFolder) or not ids:
        return
    step = max(1, len(ids) // DECODE_SAMPLE)
    sample = [os.path.join(inner.root, path) for path in ids[::step][:DECODE_SAMPLE]]
    errors = []
    for path in sample:
        try:
            inner.loader(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            errors.append(f"{path!r}: {str(err)[:120]}")
    if len(errors) >= 2 and len(errors) > MAX_UNREADABLE_FRACTION * len(sample):
        raise DataError(
            f"dataset {name!r}: {len(errors)} of {len(sample)} sampled images in {split}/ cannot be decoded "
            f"(first: {errors[0]}); a trial fails past {MAX_UNREADABLE_FRACTION:.0%} unreadable"
        )


DIGITS_SIZE = 8  # the bundled digits are 8 x 8 pixels


def dataset_stats(cfg: ClassificationData, seed: int) -> tuple[int, int]:
    """(training examples after class split, shots and fraction; original image side), for the BiT-HyperRule."""
    examples = len(build_datasets(cfg, seed, None, None).train)
    if cfg.name == "digits":
        return examples, DIGITS_SIZE
    first = ReadableImageFolder(os.path.join(cfg.name, "train")).samples[0][0]
    try:
        with Image.open(first) as image:
            width, height = image.size
    except OSError as err:
        raise DataError(f"cannot read {first!r} to size the HyperRule: {err}") from None
    return examples, int(round((width * height) ** 0.5))


@dataclass(frozen=True)
class DatasetSummary:
    """What a run trained on, for the tracking store: name, source, a digest of the training samples, their count."""

    name: str
    source: str
    digest: str
    examples: int


def _sample_ids(dataset: Dataset) -> list[str]:
    """Stable identities of a (subset of a) dataset's samples: file paths, or positions in the embedded set."""
    if isinstance(dataset, (Subset, Relabelled)):  # both select .indices of an inner .dataset
        inner = _sample_ids(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, ImageFolder):
        return [os.path.relpath(path, dataset.root) for path, _ in dataset.samples]
    return [str(i) for i in range(len(dataset))]


def summarize_classification_data(cfg: ClassificationData, seed: int) -> DatasetSummary:
    """The training split a recipe selects (class split, shots, fraction), identified by its samples and labels."""
    data = build_datasets(cfg, seed, None, None)
    ids = _sample_ids(data.train)
    digest = hashlib.sha256(json.dumps([ids, data.train_targets]).encode()).hexdigest()[:16]
    source = "sklearn.datasets.load_digits" if cfg.name == "digits" else os.path.abspath(os.path.join(cfg.name, "train"))
    return DatasetSummary(os.path.basename(cfg.name.rstrip("/")) or cfg.name, source, digest, len(ids))


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Every ``world_size``-th sample from ``rank``: an evaluation shard with no padding."""
    if world_size == 1:
        return dataset
    return Subset(dataset, range(rank, len(dataset), world_size))

