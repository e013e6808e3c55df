"""COCO detection data and evaluation: digits-det, CocoDetection, and AP identical to pycocotools."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from spaces import DataError
from trainables import coco as coco_module
from trainables.coco import (
    CocoDetection,
    coco_evaluate,
    coco_layout,
    collate_detection,
    detections_to_coco,
    digits_det_root,
    evaluate_files,
    load_coco_pair,
    subset_image_ids,
    write_digits_det,
)

H, W = 80, 100  # the hand-made fixture's images: height 80, width 100
SMALL = {"train_images": 20, "val_images": 10}


# --------------------------------------------------------------------------- fixtures


def _rect_polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _rect_rle(x, y, w, h):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def _ann(ann_id, image_id, category_id, box, crowd=False):
    x, y, w, h = box
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [float(v) for v in box],
        "area": float(w * h),
        "iscrowd": int(crowd),
        "segmentation": _rect_rle(*box) if crowd else _rect_polygon(*box),
    }


def _ground_truth():
    """Four images (the last one empty), three non-contiguous categories, one crowd region."""
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2, 3, 4)],
        "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}],
        "annotations": [
            _ann(1, 1, 1, (10, 10, 30, 20)),
            _ann(2, 1, 3, (50, 30, 40, 40)),
            _ann(3, 1, 1, (0, 72, 100, 8), crowd=True),
            _ann(4, 2, 7, (20, 20, 20, 20)),
            _ann(5, 2, 1, (60, 10, 25, 50)),
            _ann(6, 3, 3, (5, 5, 60, 60)),
        ],
    }


def _det(image_id, category_id, box, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": [float(v) for v in box], "score": score,
            "segmentation": _rect_rle(*box)}


def _detections():
    """Exact, shifted, one in the crowd region (ignored), and false positives."""
    return [
        _det(1, 1, (10, 10, 30, 20), 0.9),
        _det(1, 3, (58, 30, 40, 40), 0.8),  # shifted by 8 px
        _det(1, 1, (30, 72, 20, 8), 0.7),  # inside the crowd region
        _det(2, 7, (20, 20, 20, 20), 0.95),
        _det(2, 1, (60, 25, 25, 50), 0.6),  # shifted by 15 px
        _det(3, 3, (5, 5, 60, 60), 0.85),
        _det(3, 7, (70, 60, 20, 15), 0.5),  # nothing there
    ]


@pytest.fixture
def gt_file(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_ground_truth()))
    return path


@pytest.fixture
def coco_gt(gt_file):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(gt_file))


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for image_id in (1, 2, 3, 4):
        Image.fromarray(rng.integers(0, 255, size=(H, W, 3), dtype=np.uint8)).save(folder / f"{image_id}.png")
    return folder


@pytest.fixture(scope="module")
def digits_det(tmp_path_factory):
    return write_digits_det(tmp_path_factory.mktemp("digits") / "det", **SMALL)


def _pycocotools_stats(gt_file, results, iou_type, image_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dt = gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(gt, dt, iouType=iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats[:6]]


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("image_ids", [None, [1, 3]])
def test_evaluation_equals_pycocotools_run_directly(gt_file, coco_gt, iou_type, image_ids):
    results = _detections()
    metrics = coco_evaluate(coco_gt, results, [iou_type], image_ids=image_ids)
    expected = _pycocotools_stats(gt_file, results, iou_type, image_ids)
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert [metrics[f"{iou_type}_{n}"] for n in names] == expected
    assert 0.0 < metrics[f"{iou_type}_AP"] < 1.0  # the fixture is neither perfect nor hopeless
    assert results == _detections()  # the caller's list is left as it was


def test_both_iou_types_in_one_call(coco_gt):
    metrics = coco_evaluate(coco_gt, _detections(), ["bbox", "segm"])
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    assert sorted(metrics) == sorted(f"{t}_{n}" for t in ("bbox", "segm") for n in names)
    assert metrics["bbox_AP"] == coco_evaluate(coco_gt, _detections(), ["bbox"])["bbox_AP"]


def test_perfect_detections_score_one_and_none_score_zero(coco_gt):
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
         "segmentation": _rect_rle(*(int(v) for v in a["bbox"]))}
        for a in _ground_truth()["annotations"]
        if not a["iscrowd"]
    ]
    metrics = coco_evaluate(coco_gt, perfect, ["bbox", "segm"])
    assert metrics["bbox_AP"] == 1.0 and metrics["segm_AP"] == 1.0
    assert metrics["bbox_APl"] == -1.0  # no large object (over 96x96) in the ground truth: pycocotools' -1 is kept
    empty = coco_evaluate(coco_gt, [], ["bbox", "segm"])
    assert set(empty.values()) == {0.0} and len(empty) == 12


def test_unknown_iou_type_and_image_fail(coco_gt):
    with pytest.raises(DataError, match="keypoints"):
        coco_evaluate(coco_gt, _detections(), ["keypoints"])
    with pytest.raises(DataError, match="99"):
        coco_evaluate(coco_gt, [_det(99, 1, (0, 0, 5, 5), 0.5)], ["bbox"])


def test_model_outputs_of_the_ground_truth_score_one(digits_det):
    layout = coco_layout(digits_det)
    data = CocoDetection(layout.val_json, layout.val_images, masks=True)
    outputs, image_ids = [], []
    for image, target in (data[i] for i in range(len(data))):
        n = len(target["labels"])
        outputs.append(
            {
                "boxes": target["boxes"],
                "labels": target["labels"],
                "scores": torch.linspace(1.0, 0.5, n),
                "masks": target["masks"][:, None].float() * 0.9,  # probabilities above the 0.5 threshold
            }
        )
        image_ids.append(target["image_id"])
    results = detections_to_coco(outputs, image_ids, data.label_to_category, with_masks=True)
    assert len(results) == sum(len(o["labels"]) for o in outputs)
    first = results[0]
    assert isinstance(first["segmentation"]["counts"], str) and len(first["bbox"]) == 4
    json.dumps(results)  # writable as a results file
    metrics = coco_evaluate(data.coco, results, ["bbox", "segm"])
    assert metrics["bbox_AP"] == pytest.approx(1.0) and metrics["segm_AP"] == pytest.approx(1.0)


def test_detections_to_coco_converts_boxes_labels_and_masks():
    masks = torch.zeros((1, 1, 6, 8))
    masks[0, 0, 1:3, 2:5] = 0.7
    masks[0, 0, 4, 6] = 0.4  # below the threshold
    output = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0]]), "scores": torch.tensor([0.25]),
              "labels": torch.tensor([2]), "masks": masks}
    (result,) = detections_to_coco([output], [42], {1: 1, 2: 3, 3: 7}, with_masks=True)
    assert result["image_id"] == 42 and result["category_id"] == 3 and result["score"] == 0.25
    assert result["bbox"] == [2.0, 1.0, 3.0, 2.0]
    assert output["boxes"].tolist() == [[2.0, 1.0, 5.0, 3.0]]  # the model's tensor is untouched
    rle = result["segmentation"]
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert decoded.sum() == 6 and decoded[1:3, 2:5].all()
    assert "segmentation" not in detections_to_coco([output], [42], {1: 1, 2: 3, 3: 7}, with_masks=False)[0]


# --------------------------------------------------------------------------- files for coco-eval


def test_evaluate_files_matches_coco_evaluate(tmp_path, gt_file, coco_gt):
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(_detections()))
    for iou_type in ("bbox", "segm"):
        assert evaluate_files(gt_file, dets, iou_type) == coco_evaluate(coco_gt, _detections(), [iou_type])
    dets.write_text("[]")
    assert set(evaluate_files(gt_file, dets, "bbox").values()) == {0.0}


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


_GOOD_DET = _det(1, 1, (10, 10, 30, 20), 0.9)
MALFORMED = {
    "gt missing": ("gt", None, "bbox", "does not exist"),
    "gt not json": ("gt", "{'images': ", "bbox", "not valid JSON"),
    "gt a list": ("gt", [], "bbox", "needs the keys"),
    "gt without annotations": ("gt", _without(_ground_truth(), "annotations"), "bbox", "'annotations' is missing"),
    "gt without categories": ("gt", _without(_ground_truth(), "categories"), "bbox", "'categories' is missing"),
    "gt annotation without bbox": (
        "gt", {**_ground_truth(), "annotations": [_without(_ann(1, 1, 1, (1, 1, 5, 5)), "bbox")]}, "bbox", "no 'bbox'"),
    "dets missing": ("dets", None, "bbox", "does not exist"),
    "dets not json": ("dets", "[{", "bbox", "not valid JSON"),
    "dets an object": ("dets", {"image_id": 1}, "bbox", "must be a JSON list"),
    "det not an object": ("dets", [3], "bbox", "detection 0 is a int"),
    "det without score": ("dets", [_GOOD_DET, _without(_GOOD_DET, "score")], "bbox", "detection 1 has no 'score'"),
    "det without bbox": ("dets", [_without(_GOOD_DET, "bbox")], "bbox", "has no 'bbox'"),
    "det bad bbox": ("dets", [{**_GOOD_DET, "bbox": [1, 2, 3]}], "bbox", "has bbox"),
    "det without segmentation": ("dets", [_without(_GOOD_DET, "segmentation")], "segm", "has no 'segmentation'"),
    "det polygon segmentation": ("dets", [{**_GOOD_DET, "segmentation": [[1, 1, 5, 1, 5, 5]]}], "segm", "not an RLE"),
    "det unknown image": ("dets", [{**_GOOD_DET, "image_id": 99}], "bbox", "image_id 99"),
    "det unknown category": ("dets", [{**_GOOD_DET, "category_id": 2}], "bbox", "category_id 2"),
    "det score not a number": ("dets", [{**_GOOD_DET, "score": "high"}], "bbox", "not a number"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_load_coco_pair_reports_each_malformed_input_in_one_line(tmp_path, case):
    broken, content, iou_type, expected = MALFORMED[case]
    files = {"gt": tmp_path / "gt.json", "dets": tmp_path / "dets.json"}
    files["gt"].write_text(json.dumps(_ground_truth()))
    files["dets"].write_text(json.dumps([_GOOD_DET]))
    if content is None:
        files[broken].unlink()
    else:
        files[broken].write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError) as caught:
        load_coco_pair(files["gt"], files["dets"], iou_type)
    message = str(caught.value)
    assert "\n" not in message
    assert str(files[broken]) in message
    assert expected in message


def test_load_coco_pair_refuses_an_unknown_iou_type(gt_file):
    with pytest.raises(DataError, match="--iou-type must be one of bbox, segm, but got 'keypoints'"):
        load_coco_pair(gt_file, gt_file, "keypoints")


# --------------------------------------------------------------------------- digits-det


def test_digits_det_is_deterministic_and_reused(tmp_path, digits_det):
    again = write_digits_det(tmp_path / "again", **SMALL)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert (again / name).read_bytes() == (digits_det / name).read_bytes()
        assert (again / split / "000003.png").read_bytes() == (digits_det / split / "000003.png").read_bytes()
    before = (again / "annotations/instances_val.json").stat().st_mtime_ns
    assert write_digits_det(again, **SMALL) == again
    assert (again / "annotations/instances_val.json").stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary folder left behind
    with pytest.raises(DataError, match="already holds"):
        write_digits_det(again, train_images=21, val_images=10)


def test_digits_det_writer_that_loses_a_race_uses_the_winners_copy(tmp_path, monkeypatch, digits_det):
    root = tmp_path / "det"
    real_rename = coco_module.os.rename

    def winner_first(src, dst):
        shutil.copytree(digits_det, dst)  # another process renamed its copy into place first
        real_rename(src, dst)

    monkeypatch.setattr(coco_module.os, "rename", winner_first)
    assert write_digits_det(root, **SMALL) == root
    assert (root / "digits_det.json").read_bytes() == (digits_det / "digits_det.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det"]


def test_digits_det_instances_categories_and_masks(digits_det):
    layout = coco_layout(digits_det)
    kinds = set()
    for json_path, count in ((layout.train_json, SMALL["train_images"]), (layout.val_json, SMALL["val_images"])):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(json_path))
        assert sorted(coco.getImgIds()) == list(range(1, count + 1))
        assert [c["id"] for c in coco.dataset["categories"]] == list(range(1, 11))
        assert [c["name"] for c in coco.dataset["categories"]] == [str(d) for d in range(10)]
        assert any(a["iscrowd"] for a in coco.dataset["annotations"])
        for image_id in coco.getImgIds():
            instances = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
            assert 1 <= len(instances) <= 4
        for ann in coco.dataset["annotations"]:
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert np.abs(np.array(box) - np.array(ann["bbox"])).max() <= 1, ann["id"]
            assert ann["area"] > 0 and 1 <= ann["category_id"] <= 10
            if not ann["iscrowd"]:
                kinds.add("polygon" if isinstance(ann["segmentation"], list) else "rle")
        assert Image.open(layout.train_images / coco.imgs[1]["file_name"]).size == (64, 64)
    assert kinds == {"polygon", "rle"}


def test_digits_det_val_digits_are_not_train_digits():
    _, _, (train, val) = coco_module._digits_split()
    assert len(train) + len(val) == 1797 and not set(train.tolist()) & set(val.tolist())


def test_digits_det_root_uses_the_cache_folder(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(coco_module, "write_digits_det", lambda root: written.append(root) or root)
    monkeypatch.setenv("RECIPE_SEARCH_CACHE", str(tmp_path / "env"))
    assert digits_det_root() == tmp_path / "env" / "digits-det-v1"
    assert digits_det_root(tmp_path / "arg") == tmp_path / "arg" / "digits-det-v1"
    monkeypatch.delenv("RECIPE_SEARCH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert digits_det_root() == tmp_path / "home" / ".cache" / "recipe-search" / "digits-det-v1"
    assert len(written) == 3


# --------------------------------------------------------------------------- layout


def _touch_split(root, name):
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{name}.json").write_text("{}")
    (root / name).mkdir()


def test_coco_layout_accepts_coco_2017_names_and_reports_missing_or_ambiguous(tmp_path):
    _touch_split(tmp_path, "train2017")
    _touch_split(tmp_path, "val2017")
    layout = coco_layout(tmp_path)
    assert layout.train_json == tmp_path / "annotations" / "instances_train2017.json"
    assert layout.val_images == tmp_path / "val2017"
    _touch_split(tmp_path, "val")
    with pytest.raises(DataError, match="several val splits"):
        coco_layout(tmp_path)
    with pytest.raises(DataError, match="no annotations/ folder"):
        coco_layout(tmp_path / "nowhere")
    (tmp_path / "bare" / "annotations").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no train split \(expected annotations/instances_train\*\.json"):
        coco_layout(tmp_path / "bare")


# --------------------------------------------------------------------------- CocoDetection


def test_coco_detection_targets(gt_file, image_dir):
    data = CocoDetection(gt_file, image_dir, masks=True)
    assert len(data) == 4 and data.num_classes == 4
    assert data.label_to_category == {1: 1, 2: 3, 3: 7}
    image, target = data[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32 and 0.0 <= image.min() <= image.max() <= 1.0
    assert target["image_id"] == 1
    assert target["boxes"].dtype == torch.float32 and target["boxes"].tolist() == [[10, 10, 40, 30], [50, 30, 90, 70]]
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 2]  # the crowd region is dropped
    assert target["masks"].shape == (2, H, W) and target["masks"].dtype == torch.uint8
    assert target["masks"][1, 30:70, 50:90].all() and target["masks"][1].sum() == 40 * 40
    assert type(target["boxes"]) is torch.Tensor and type(image) is torch.Tensor
    _, empty = data[3]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["masks"].shape == (0, H, W)
    assert "masks" not in CocoDetection(gt_file, image_dir)[0][1]
    images, targets = collate_detection([data[0], data[3]])
    assert len(images) == 2 and [t["image_id"] for t in targets] == [1, 4]


def test_coco_detection_subset_and_tiny_boxes(tmp_path, image_dir):
    gt = _ground_truth()
    gt["annotations"].append(_ann(7, 3, 1, (1, 1, 0.5, 10)))  # under a pixel wide: dropped
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(gt))
    data = CocoDetection(path, image_dir, image_ids=[3])
    assert len(data) == 1 and data[0][1]["labels"].tolist() == [2]
    with pytest.raises(DataError, match="image ids"):
        CocoDetection(path, image_dir, image_ids=[5])


def test_coco_detection_hflip_flips_image_boxes_and_masks(gt_file, image_dir):
    plain = CocoDetection(gt_file, image_dir, masks=True)
    flipped = CocoDetection(gt_file, image_dir, masks=True, hflip=1.0)
    (image, target), (image_f, target_f) = plain[0], flipped[0]
    boxes, boxes_f = target["boxes"], target_f["boxes"]
    assert torch.equal(boxes_f[:, 0], W - boxes[:, 2]) and torch.equal(boxes_f[:, 2], W - boxes[:, 0])
    assert torch.equal(boxes_f[:, 1::2], boxes[:, 1::2])
    assert torch.equal(target_f["masks"], target["masks"].flip(-1))
    assert torch.equal(image_f, image.flip(-1))
    assert torch.equal(target_f["labels"], target["labels"])


@pytest.mark.parametrize("problem", ["missing", "undecodable"])
def test_coco_detection_unreadable_image_names_the_file(gt_file, image_dir, problem):
    bad = image_dir / "2.png"
    if problem == "missing":
        bad.unlink()
    else:
        bad.write_bytes(b"not a png")
    data = CocoDetection(gt_file, image_dir)
    with pytest.raises(DataError) as caught:
        data[1]
    assert str(bad) in str(caught.value) and "\n" not in str(caught.value)


def test_subset_image_ids_counts_and_seed():
    ids = list(range(1000, 1600))
    subset = subset_image_ids(ids, 0.1, None, seed=0)
    assert len(subset) == 60 and subset == sorted(subset) and set(subset) <= set(ids)
    assert subset == subset_image_ids(list(reversed(ids)), 0.1, None, seed=0)
    assert subset != subset_image_ids(ids, 0.1, None, seed=1)
    assert len(subset_image_ids(ids, 0.1, 25, seed=0)) == 25
    assert len(subset_image_ids(ids, 1.0, 100, seed=0)) == 100
    assert subset_image_ids(ids, 1.0, None, seed=0) == ids
    assert len(subset_image_ids(ids, 0.0001, None, seed=0)) == 1
