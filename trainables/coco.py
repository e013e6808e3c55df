"""Detection data in COCO format, and COCO evaluation through pycocotools.

``digits-det`` is a small COCO detection set drawn from scikit-learn's bundled
digits (1 to 4 digits pasted on dark canvases, boxes and instance masks), so
detection recipes run with no download. ``CocoDetection`` reads any COCO root
(ours or COCO 2017) for torchvision's detectors; ``coco_evaluate`` wraps
``COCOeval`` so its numbers are exactly those of pycocotools run directly.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.spatial import ConvexHull
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from spaces import DataError, RecipeError
from spaces.errors import short
from trainables.data import DatasetSummary, digits_split

__all__ = [
    "COCO_STAT_NAMES",
    "DIGITS_DET_VERSION",
    "IOU_TYPES",
    "CocoDetection",
    "CocoLayout",
    "coco_evaluate",
    "coco_layout",
    "collate_detection",
    "detections_to_coco",
    "digits_det_root",
    "evaluate_files",
    "load_coco_pair",
    "subset_image_ids",
    "write_digits_det",
]

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats[0:6]: AP at IoU .50:.95, at .50, at .75, then for small, medium, large objects.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

DIGITS_DET_VERSION = 1  # bump when the generator changes what it writes
DIGITS_DET_MARKER = "digits_det.json"
_DIGIT_SIDE = (12 / 64, 28 / 64)  # pasted digit side as a fraction of the canvas: 12..28 px at 64 px
_MAX_DIGITS = 4
_MAX_PLACEMENT_IOU = 0.3
_MAX_COVERED = 0.5  # nor may a box cover half of a smaller one, which IoU alone allows
_PLACEMENT_TRIES = 10
_FOREGROUND = 96  # of 255: upscaled digit pixels brighter than this belong to the instance mask
_CROWD_EVERY = 10  # every 10th canvas gets one crowd region (iscrowd=1) where no digit lies

_MISSING_GT_KEY = "{path}: COCO ground truth needs the keys images, annotations and categories (lists); {problem}"
_BAD_DETECTION = (
    "{path}: detection {index} {problem} (each detection needs image_id, category_id, score and {shape})"
)


# --------------------------------------------------------------------------- digits-det generation


def _polygon_from_mask(mask: np.ndarray) -> list[float]:
    """Convex hull of the foreground pixels' corners: a polygon pycocotools rasterizes to the same bbox.

    A polygon cannot hold a digit's holes, and neither cv2 nor skimage is a
    dependency; the hull keeps the box exact, which is what detection training needs.
    """
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    corners = corners.astype(np.float64)  # duplicates are harmless to the hull, and np.unique is slow
    hull = ConvexHull(corners)
    return [float(v) for v in corners[hull.vertices].ravel()]


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE of a binary [H, W] mask, with counts as str so it goes into JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's crowd format: column-major run lengths as a list, starting with a background run."""
    flat = mask.astype(np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _intersection(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection area of two [x, y, w, h] boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy


def _overlaps_too_much(box: Sequence[float], placed: Sequence[float]) -> bool:
    inter = _intersection(box, placed)
    areas = (box[2] * box[3], placed[2] * placed[3])
    return inter / (sum(areas) - inter) > _MAX_PLACEMENT_IOU or inter / min(areas) > _MAX_COVERED


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _digits_split() -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Digit images (0..255) and labels, and the indices of the train and val digits (never shared).

    The split is fixed and is the classification digits' split, so a backbone trained
    on those never saw a digit of the detection val set.
    """
    images, target, idx_train, idx_val = digits_split()
    pixels = (images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return pixels, target.astype(np.int64), (np.sort(idx_train), np.sort(idx_val))


def _draw_canvas(
    rng: np.random.Generator, pixels: np.ndarray, labels: np.ndarray, pool: np.ndarray, canvas: int, with_crowd: bool
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]], Optional[tuple[int, np.ndarray]]]:
    """One RGB canvas, its instances as (digit, mask), and maybe a crowd region as (digit, mask)."""
    image = rng.integers(0, 24, size=(canvas, canvas, 3)).astype(np.float64)  # dark, slightly noisy
    side_lo = max(4, round(_DIGIT_SIDE[0] * canvas))
    side_hi = max(side_lo, round(_DIGIT_SIDE[1] * canvas))
    instances: list[tuple[int, np.ndarray]] = []
    boxes: list[list[float]] = []
    for _ in range(int(rng.integers(1, _MAX_DIGITS + 1))):
        for _ in range(_PLACEMENT_TRIES):
            index = int(rng.choice(pool))
            side = int(rng.integers(side_lo, side_hi + 1))
            x, y = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
            digit = np.asarray(Image.fromarray(pixels[index], mode="L").resize((side, side), Image.BILINEAR))
            mask = np.zeros((canvas, canvas), dtype=np.uint8)
            mask[y : y + side, x : x + side] = digit > _FOREGROUND
            if not mask.any():
                continue
            box = _tight_box(mask)
            if any(_overlaps_too_much(box, placed) for placed in boxes):
                continue
            color = rng.uniform(0.6, 1.0, size=3)
            patch = digit[:, :, None].astype(np.float64) * color
            region = image[y : y + side, x : x + side]
            np.maximum(region, patch, out=region)
            instances.append((int(labels[index]), mask))
            boxes.append(box)
            break
    crowd = None
    if with_crowd:
        for _ in range(_PLACEMENT_TRIES * 2):
            w, h = (int(v) for v in rng.integers(canvas // 6, canvas // 3 + 1, size=2))
            x, y = int(rng.integers(0, canvas - w + 1)), int(rng.integers(0, canvas - h + 1))
            box = [float(x), float(y), float(w), float(h)]
            if all(_intersection(box, placed) == 0.0 for placed in boxes):
                mask = np.zeros((canvas, canvas), dtype=np.uint8)
                mask[y : y + h, x : x + w] = 1
                crowd = (int(rng.integers(0, 10)), mask)
                break
    return image.round().clip(0, 255).astype(np.uint8), instances, crowd


def _write_split(
    out: Path, split: str, count: int, pixels: np.ndarray, labels: np.ndarray, pool: np.ndarray, canvas: int, seed: int
) -> None:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    (out / split).mkdir(parents=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(1, count + 1):
        image, instances, crowd = _draw_canvas(
            rng, pixels, labels, pool, canvas, with_crowd=(image_id - 1) % _CROWD_EVERY == 0
        )
        file_name = f"{image_id:06d}.png"
        Image.fromarray(image, mode="RGB").save(out / split / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": canvas, "width": canvas})
        for digit, mask in instances:
            ann_id = len(annotations) + 1
            # Alternate the two mask encodings so readers exercise both.
            segmentation: Any = [_polygon_from_mask(mask)] if ann_id % 2 else _rle(mask)
            decoded = mask_utils.frPyObjects(segmentation, canvas, canvas) if ann_id % 2 else segmentation
            area = float(mask_utils.area(mask_utils.merge(decoded) if isinstance(decoded, list) else decoded))
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": digit + 1,
                    "bbox": _tight_box(mask),
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": segmentation,
                }
            )
        if crowd is not None:
            digit, mask = crowd
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": digit + 1,
                    "bbox": _tight_box(mask),
                    "area": float(mask.sum()),
                    "iscrowd": 1,
                    "segmentation": _uncompressed_rle(mask),
                }
            )
    dataset = {
        "info": {"description": f"digits-det {split}: scikit-learn digits pasted on {canvas}px canvases"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)],
    }
    (out / "annotations").mkdir(exist_ok=True)
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset, separators=(",", ":")))


def _read_marker(root: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((root / DIGITS_DET_MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_digits_det(
    root: str | os.PathLike, *, train_images: int = 600, val_images: int = 150, canvas: int = 64, seed: int = 0
) -> Path:
    """Write the digits-det COCO set at ``root`` (or reuse the one there), and return ``root``.

    Val canvases use only digits that no train canvas uses (the digit split is fixed;
    ``seed`` drives the canvases). The set is written into
    a temporary folder next to ``root`` and renamed into place, so a reader never
    sees half a dataset and two racing writers both end up with one whole copy.
    """
    for key, value, low in (("train_images", train_images, 1), ("val_images", val_images, 1), ("canvas", canvas, 16)):
        if value < low:
            raise RecipeError(f"digits-det {key} must be >= {low}, but got {value}")
    root = Path(root)
    params = {
        "version": DIGITS_DET_VERSION,
        "train_images": train_images,
        "val_images": val_images,
        "canvas": canvas,
        "seed": seed,
    }
    if root.exists():
        found = _read_marker(root)
        if found == params:
            return root
        if found is not None or any(root.iterdir()):
            raise DataError(
                f"{str(root)!r} already holds something other than digits-det {params}; remove it or pick another folder"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        pixels, labels, (idx_train, idx_val) = _digits_split()
        _write_split(tmp, "train", train_images, pixels, labels, idx_train, canvas, seed)
        _write_split(tmp, "val", val_images, pixels, labels, idx_val, canvas, seed)
        (tmp / DIGITS_DET_MARKER).write_text(json.dumps(params, sort_keys=True))  # last: marks the set complete
        try:
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            os.rename(tmp, root)
        except OSError:
            if _read_marker(root) != params:  # not a racing writer of the same set: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def digits_det_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The default digits-det set under ``$RECIPE_SEARCH_CACHE`` (or ``~/.cache/recipe-search``), written if missing."""
    if cache_dir is None:
        cache_dir = os.environ.get("RECIPE_SEARCH_CACHE") or Path.home() / ".cache" / "recipe-search"
    return write_digits_det(Path(cache_dir) / f"digits-det-v{DIGITS_DET_VERSION}")


# --------------------------------------------------------------------------- reading COCO roots


@dataclass(frozen=True)
class CocoLayout:
    train_json: Path
    train_images: Path
    val_json: Path
    val_images: Path


def _split_for(root: Path, prefix: str) -> tuple[Path, Path]:
    names = sorted(
        p.name[len("instances_") : -len(".json")]
        for p in (root / "annotations").glob(f"instances_{prefix}*.json")
        if (root / p.name[len("instances_") : -len(".json")]).is_dir()
    )
    if not names:
        raise DataError(
            f"COCO root {str(root)!r} has no {prefix} split (expected annotations/instances_{prefix}*.json "
            f"and a matching {prefix}*/ image folder)"
        )
    if len(names) > 1:
        raise DataError(f"COCO root {str(root)!r} has several {prefix} splits ({', '.join(names)}); keep one")
    return root / "annotations" / f"instances_{names[0]}.json", root / names[0]


def coco_layout(root: str | os.PathLike) -> CocoLayout:
    """The train and val annotation files and image folders of a COCO root: ``train``/``val`` or ``train2017``/``val2017``."""
    root = Path(root)
    if not (root / "annotations").is_dir():
        raise DataError(f"COCO root {str(root)!r} has no annotations/ folder (expected annotations/instances_<split>.json)")
    train_json, train_images = _split_for(root, "train")
    val_json, val_images = _split_for(root, "val")
    return CocoLayout(train_json=train_json, train_images=train_images, val_json=val_json, val_images=val_images)


def _quiet_coco(source: str | os.PathLike | dict[str, Any]) -> COCO:
    """pycocotools' COCO without its progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(source, dict):
            coco = COCO()
            coco.dataset = source
            coco.createIndex()
            return coco
        return COCO(str(source))


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


class CocoDetection(Dataset):
    """COCO images and targets in the form torchvision's detection models take.

    Labels are contiguous 1..K (0 is background): ``label_to_category`` maps them
    back to the file's category ids for evaluation. Crowd regions and boxes under
    one pixel wide or high are left out of the targets; images with no objects stay.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        masks: bool = False,
        hflip: float = 0.0,
        image_ids: Optional[list[int]] = None,
    ) -> None:
        if not 0.0 <= hflip <= 1.0:
            raise RecipeError(f"hflip must be a probability in [0, 1], but got {hflip}")
        annotation_file = Path(annotation_file)
        if not annotation_file.is_file():
            raise DataError(f"COCO annotation file {str(annotation_file)!r} does not exist")
        try:
            self.coco = _quiet_coco(annotation_file)
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"cannot read COCO annotation file {str(annotation_file)!r}: {_one_line(err)}") from err
        self.image_dir = Path(image_dir)
        self.masks = masks
        self.image_ids = sorted(self.coco.getImgIds()) if image_ids is None else [int(i) for i in image_ids]
        unknown = sorted(set(self.image_ids) - set(self.coco.imgs))
        if unknown:
            raise DataError(f"image ids {unknown[:5]} are not in {str(annotation_file)!r}")
        self.label_to_category = {label: cat for label, cat in enumerate(sorted(self.coco.getCatIds()), start=1)}
        self.category_to_label = {cat: label for label, cat in self.label_to_category.items()}
        self.num_classes = len(self.label_to_category) + 1  # + background
        self._flip = None
        if hflip > 0.0:
            self._flip = v2.RandomHorizontalFlip(p=hflip)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _read_image(self, info: dict[str, Any]) -> torch.Tensor:
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as err:  # PIL.UnidentifiedImageError is an OSError
            raise DataError(f"cannot read image {str(path)!r}: {_one_line(err)}") from err
        if "height" in info and rgb.shape[:2] != (info["height"], info["width"]):
            raise DataError(
                f"image {str(path)!r} is {rgb.shape[1]}x{rgb.shape[0]}, but its annotation says "
                f"{info['width']}x{info['height']}"
            )
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        image = self._read_image(info)
        height, width = image.shape[1:]
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            if ann.get("iscrowd", 0) or w < 1 or h < 1:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.category_to_label[ann["category_id"]])
            if self.masks:
                if "segmentation" not in ann:
                    raise DataError(f"annotation {ann['id']} of image {image_id} has no segmentation, but masks are on")
                masks.append(torch.from_numpy(self.coco.annToMask(ann)))
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        if self.masks:
            stacked = torch.stack(masks) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
            target["masks"] = tv_tensors.Mask(stacked)
        image = tv_tensors.Image(image)
        if self._flip is not None:
            image, target = self._flip(image, target)
        # Plain tensors out: the models want them, and the tv_tensor wrappers are not needed past the flip.
        out = {key: value.as_subclass(torch.Tensor) for key, value in target.items()}
        out["image_id"] = int(image_id)
        return image.as_subclass(torch.Tensor).float().div_(255.0), out


def collate_detection(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Images and targets as two lists: detection images differ in size and targets in length."""
    return [image for image, _ in batch], [target for _, target in batch]


def subset_image_ids(image_ids: Sequence[int], fraction: float, max_images: Optional[int], seed: int) -> list[int]:
    """A seeded random subset of ``fraction`` of the images, at most ``max_images``, at least one."""
    if not 0.0 < fraction <= 1.0:
        raise RecipeError(f"data fraction must be in (0, 1], but got {fraction}")
    if max_images is not None and max_images < 1:
        raise RecipeError(f"max_images must be >= 1, but got {max_images}")
    ids = sorted(int(i) for i in image_ids)
    if not ids:
        raise DataError("cannot take a subset of a dataset with no images")
    count = max(1, min(int(round(fraction * len(ids))), max_images or len(ids)))
    if count >= len(ids):
        return ids
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(ids, size=count, replace=False))


# --------------------------------------------------------------------------- evaluation


def detections_to_coco(
    outputs: list[dict[str, torch.Tensor]], image_ids: list[int], label_to_category: dict[int, int], with_masks: bool
) -> list[dict[str, Any]]:
    """torchvision detector outputs as COCO result dicts (xywh boxes; masks thresholded at 0.5 and RLE-encoded)."""
    if len(outputs) != len(image_ids):
        raise ValueError(f"got {len(outputs)} outputs for {len(image_ids)} image ids")
    results: list[dict[str, Any]] = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().cpu().to(torch.float64, copy=True)  # xyxy -> xywh in place below
        boxes[:, 2:] -= boxes[:, :2]
        scores = output["scores"].detach().cpu().tolist()
        labels = output["labels"].detach().cpu().tolist()
        if with_masks:
            binary = (output["masks"].detach().cpu()[:, 0] > 0.5).numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
        for i, (box, score, label) in enumerate(zip(boxes.tolist(), scores, labels)):
            if label not in label_to_category:
                raise DataError(
                    f"model predicted label {label}, but the dataset has labels "
                    f"{min(label_to_category)}..{max(label_to_category)}"
                )
            result = {"image_id": int(image_id), "category_id": label_to_category[label], "bbox": box, "score": float(score)}
            if with_masks:
                rle = rles[i]
                result["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            results.append(result)
    return results


def coco_evaluate(
    coco_gt: COCO, results: list[dict[str, Any]], iou_types: Sequence[str], image_ids: Optional[list[int]] = None
) -> dict[str, float]:
    """COCOeval's six AP numbers per IoU type, as ``bbox_AP``, ``segm_AP50``, ...: exactly pycocotools' values.

    pycocotools reports -1 where no ground truth exists (a category or an area
    range); that is kept. No detections at all score 0.0, since pycocotools
    cannot load an empty result list.
    """
    unknown_types = [t for t in iou_types if t not in IOU_TYPES]
    if unknown_types:
        raise DataError(f"unknown IoU type {unknown_types[0]!r}; available: {', '.join(IOU_TYPES)}")
    unknown_images = sorted({r["image_id"] for r in results} - set(coco_gt.getImgIds()))
    if unknown_images:
        raise DataError(f"detections name image ids {unknown_images[:5]} that the ground truth does not have")
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if not results:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in COCO_STAT_NAMES})
            continue
        if iou_type == "segm" and any("segmentation" not in r for r in results):
            raise DataError("segm evaluation needs a segmentation in every detection")
        with contextlib.redirect_stdout(io.StringIO()):
            # loadRes adds keys to the dicts it is given: a copy per IoU type keeps runs independent.
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics.update({f"{iou_type}_{name}": float(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats[:6])})
    return metrics


_MAX_SHOWN_PATH = 200  # characters of a file name in a message: the OS refuses longer ones anyway


def _shown(path: Path) -> str:
    """``path`` for a one-line message: a name as long as an argument can be is cut in the middle."""
    text = str(path)
    return text if len(text) <= _MAX_SHOWN_PATH else f"{text[:100]}...{text[-97:]}"


def _load_json(path: Path, what: str) -> Any:
    name = repr(_shown(path))
    try:
        if path.is_dir():
            raise DataError(f"{what} file {name} is a directory, not a JSON file")
        if not path.is_file():
            raise DataError(f"{what} file {name} does not exist")
        return json.loads(path.read_text())
    except OSError as err:  # also a name too long for the file system
        raise DataError(f"{what} file {name} cannot be read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{what} file {name} is not JSON text: {_one_line(err)}") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{what} file {name} is not valid JSON: {err.msg} at line {err.lineno}") from err
    except RecursionError:
        raise DataError(f"{what} file {name} nests its JSON too deeply to be COCO") from None


def _is_number(value: Any) -> bool:
    """A finite JSON number (true and false are not numbers; Python's json reads NaN and Infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _known(value: Any, ids: Any) -> bool:
    """Whether ``value`` is one of ``ids``; a JSON list, object or boolean as an id is never one."""
    return not isinstance(value, (list, dict, bool)) and value in ids


def _box_problem(box: Any, empty: bool) -> Optional[str]:
    """What makes ``box`` no COCO box: [x, y, width, height], finite, width and height > 0 (>= 0 with
    ``empty``: ground truths as released hold a few degenerate boxes, which COCOeval handles); None for a box."""
    if not (isinstance(box, list) and len(box) == 4):
        return "not a list of 4 numbers"
    if not all(_is_number(v) for v in box):
        return "with a value that is not a finite number"
    if min(box[2], box[3]) < 0 or (not empty and min(box[2], box[3]) == 0):
        return "with a width or height < 0" if empty else "with a width or height <= 0"
    return None


# pycocotools writes the counts of a compressed RLE 5 bits to a character, as chr(48) to chr(111).
_RLE_CHARACTERS = frozenset(map(chr, range(48, 112)))


def _mask_problem(seg: Any, image: dict[str, Any], polygons: bool) -> Optional[str]:
    """What makes ``seg`` no mask of ``image``: an RLE of its size, or (``polygons``) a list of
    polygons of 3 or more points; None for a mask."""
    if isinstance(seg, dict):
        size = [image["height"], image["width"]]
        if seg.get("size") != size:
            return f"a mask of size {short(seg.get('size'))}, but image {short(image['id'])} is {size}"
        counts = seg.get("counts")
        if isinstance(counts, str) and set(counts) <= _RLE_CHARACTERS:
            return None
        if polygons and isinstance(counts, list):  # COCO's uncompressed RLE (crowd regions of the ground truth)
            runs = all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
            return None if runs and sum(counts) == size[0] * size[1] else f"an RLE whose counts do not cover {size[0]}x{size[1]} pixels"
        return "an RLE whose counts are not pycocotools' compressed string"
    if polygons and isinstance(seg, list) and seg and all(
        isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_is_number(v) for v in p) for p in seg
    ):
        return None
    return "a segmentation that is not an RLE object with size and counts" + (", nor a list of polygons" if polygons else "")


def _check_gt(path: Path, data: Any, iou_type: str) -> None:
    where = _shown(path)
    if not isinstance(data, dict):
        raise DataError(_MISSING_GT_KEY.format(path=where, problem=f"got a JSON {type(data).__name__}"))
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problem = f"'{key}' is missing" if key not in data else f"'{key}' is a {type(data[key]).__name__}"
            raise DataError(_MISSING_GT_KEY.format(path=where, problem=problem))
    needs = {"images": ("id", "height", "width"), "categories": ("id",)}
    needs["annotations"] = (
        "id", "image_id", "category_id", "area", "iscrowd", "bbox" if iou_type == "bbox" else "segmentation"
    )
    for key, fields in needs.items():
        seen: dict[Any, int] = {}
        for i, entry in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise DataError(f"{where}: {key}[{i}] has no '{missing[0]}' (each needs {', '.join(fields)})")
            if isinstance(entry["id"], bool) or not isinstance(entry["id"], (int, str)):
                raise DataError(f"{where}: {key}[{i}] has id {short(entry['id'])}; ids are integers")
            if entry["id"] in seen:  # pycocotools indexes by id: a second one would replace the first
                raise DataError(f"{where}: {key}[{i}] has id {short(entry['id'])}, as {key}[{seen[entry['id']]}] does; ids are unique")
            seen[entry["id"]] = i
    for i, img in enumerate(data["images"]):
        for side in ("height", "width"):
            value = img[side]
            if not (_is_number(value) and value >= 1 and value == int(value)):
                raise DataError(f"{where}: images[{i}] has {side} {short(value)}; it is a whole number of pixels >= 1")
    images = {img["id"]: img for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        name = f"{where}: annotations[{i}]"
        which = f"(annotation id {short(ann['id'])})"
        if not _known(ann["image_id"], images):
            raise DataError(f"{name} names image_id {short(ann['image_id'])}, which is not in images {which}")
        if not _known(ann["category_id"], category_ids):
            raise DataError(f"{name} names category_id {short(ann['category_id'])}, which is not in categories {which}")
        if not (_is_number(ann["area"]) and ann["area"] >= 0):
            raise DataError(f"{name} has area {short(ann['area'])}, not a number >= 0 {which}")
        if isinstance(ann["iscrowd"], (list, dict)) or ann["iscrowd"] not in (0, 1):
            raise DataError(f"{name} has iscrowd {short(ann['iscrowd'])}, not 0 or 1 {which}")
        box = ann.get("bbox")
        problem = None if box is None else _box_problem(box, empty=True)
        if problem:
            raise DataError(f"{name} has bbox {short(box)}, {problem} {which}; a box is [x, y, width, height]")
        if iou_type == "segm":
            problem = _mask_problem(ann["segmentation"], images[ann["image_id"]], polygons=True)
            if problem:
                raise DataError(f"{name} has {problem} {which}")


def _check_detections(path: Path, dets: Any, gt: dict[str, Any], iou_type: str) -> None:
    where = _shown(path)
    shape = "bbox" if iou_type == "bbox" else "segmentation (RLE)"
    if not isinstance(dets, list):
        raise DataError(f"{where}: detections must be a JSON list of objects, but got a JSON {type(dets).__name__}")
    images = {img["id"]: img for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}

    def bad(index: int, problem: str) -> DataError:
        return DataError(_BAD_DETECTION.format(path=where, index=index, problem=problem, shape=shape))

    for i, det in enumerate(dets):
        if not isinstance(det, dict):
            raise bad(i, f"is a {type(det).__name__}, not an object")
        for key in ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation"):
            if key not in det:
                raise bad(i, f"has no '{key}'")
        if not _is_number(det["score"]):
            raise bad(i, f"has score {short(det['score'])}, not a number")
        if not _known(det["image_id"], images):
            raise bad(i, f"names image_id {short(det['image_id'])}, which the ground truth does not have")
        if not _known(det["category_id"], category_ids):
            raise bad(i, f"names category_id {short(det['category_id'])}, which the ground truth does not have")
        if "bbox" in det:
            problem = _box_problem(det["bbox"], empty=True)
            if problem:
                raise bad(i, f"has bbox {short(det['bbox'])}, {problem}; a box is [x, y, width, height]")
        if iou_type == "segm":
            problem = _mask_problem(det["segmentation"], images[det["image_id"]], polygons=False)
            if problem:
                raise bad(i, f"has {problem}")


def load_coco_pair(
    gt_path: str | os.PathLike, dets_path: str | os.PathLike, iou_type: str
) -> tuple[COCO, list[dict[str, Any]]]:
    """The ground truth and detections files checked for ``coco-eval``: every problem is a one-line ``DataError``."""
    if iou_type not in IOU_TYPES:
        raise DataError(f"--iou-type must be one of {', '.join(IOU_TYPES)}, but got {iou_type!r}")
    gt_path, dets_path = Path(gt_path), Path(dets_path)
    gt = _load_json(gt_path, "ground truth")
    _check_gt(gt_path, gt, iou_type)
    dets = _load_json(dets_path, "detections")
    _check_detections(dets_path, dets, gt, iou_type)
    try:
        coco = _quiet_coco(gt)
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"cannot index ground truth {_shown(gt_path)!r}: {_one_line(err)}") from err
    return coco, dets


def evaluate_files(gt_path: str | os.PathLike, dets_path: str | os.PathLike, iou_type: str = "bbox") -> dict[str, float]:
    """COCO AP of a detections file against a ground truth file, for ``recipe-search coco-eval``."""
    coco, dets = load_coco_pair(gt_path, dets_path, iou_type)
    return coco_evaluate(coco, dets, [iou_type])


def summarize_detection_data(name: str, fraction: float, max_images: Optional[int], seed: int) -> DatasetSummary:
    """The training images a detection recipe selects (``data.fraction``, ``data.max_images``), identified by file."""
    root = digits_det_root() if name == "digits-det" else Path(name)
    layout = coco_layout(root)
    train = CocoDetection(layout.train_json, layout.train_images)
    ids = train.image_ids
    if fraction < 1.0 or max_images is not None:
        ids = subset_image_ids(ids, fraction, max_images, seed)
    files = [train.coco.imgs[i]["file_name"] for i in ids]
    stat = layout.train_json.stat()  # the annotations by size and time: reading them twice costs seconds on COCO
    digest = hashlib.sha256(json.dumps([files, stat.st_size, stat.st_mtime_ns]).encode()).hexdigest()[:16]
    return DatasetSummary(name if name == "digits-det" else Path(name).name, str(layout.train_json), digest, len(ids))
