"""The detection trainable: GN everywhere, backbone initialization, the schedule, training and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torchvision.ops.misc import FrozenBatchNorm2d

import timm
import timm.layers

from spaces import DataError, resolve_recipe
from trainables.coco import write_digits_det
from trainables.engine import build_step_scheduler
from trainables.detection import build_detector, load_backbone_weights, train_detector, train_sizes
from trainables.session import LocalSession

TINY = {
    "model.fpn_channels": 32,
    "model.roi_batch_size": 16,
    "model.proposals": 20,
    "schedule.iterations": 4,
    "schedule.steps": [3],
    "schedule.warmup_iters": 1,
    "schedule.eval_period": 2,
    "optim.batch_size": 2,
}


def _recipe(**overrides):
    return resolve_recipe("scratch-det-digits", {**TINY, **overrides})


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    return str(write_digits_det(tmp_path_factory.mktemp("coco") / "digits-det", train_images=8, val_images=4))


@pytest.mark.parametrize("name", ["mask_rcnn", "faster_rcnn"])
def test_gn_model_has_no_batchnorm_and_gn_in_fpn_and_heads(name):
    model = build_detector(_recipe(**{"model.name": name}), num_classes=11)
    norms = [type(m) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d))]
    assert norms == []
    for part in [model.backbone.fpn, model.roi_heads.box_head] + ([model.roi_heads.mask_head] if name == "mask_rcnn" else []):
        assert any(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in part.modules()), part.__class__.__name__
    convs = [m for m in model.roi_heads.box_head.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.roi_heads.box_head.modules() if isinstance(m, nn.Linear)]
    assert (len(convs), len(fcs)) == (4, 1)  # 4conv1fc


def test_frozen_bn_is_the_classic_fine_tuning_baseline():
    model = build_detector(_recipe(**{"model.norm": "frozen_bn"}), num_classes=11)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules())
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())
    assert not any(isinstance(m, nn.Conv2d) for m in model.roi_heads.box_head.modules())  # 2fc head


def test_backbone_loads_a_timm_classifier_of_this_project(tmp_path):
    classifier = timm.create_model("resnet18", num_classes=10, norm_layer=timm.layers.GroupNorm)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": classifier.state_dict(), "epoch": 3}, path)  # the layout train_classifier writes
    model = build_detector(_recipe(**{"model.init": "pretrained", "model.pretrained": str(tmp_path)}), num_classes=11)
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, classifier.conv1.weight)
    assert torch.equal(body.layer4[1].bn2.weight, classifier.layer4[1].bn2.weight)


def test_backbone_init_errors_are_one_line(tmp_path):
    backbone = timm.create_model("resnet18")
    with pytest.raises(DataError, match="does not exist"):
        load_backbone_weights(backbone, str(tmp_path / "missing.pt"))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(DataError, match="not a readable PyTorch checkpoint"):
        load_backbone_weights(backbone, str(tmp_path / "text.pt"))
    torch.save(timm.create_model("resnet50").state_dict(), tmp_path / "r50.pt")
    with pytest.raises(DataError, match="same architecture") as err:
        load_backbone_weights(backbone, str(tmp_path / "r50.pt"))
    assert "\n" not in str(err.value)


def test_warmup_then_lr_divided_by_10_at_each_step():
    recipe = _recipe(**{"schedule.iterations": 100, "schedule.steps": [60, 90], "schedule.warmup_iters": 10, "schedule.eval_period": 50})
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=recipe.optim.lr)
    scheduler = build_step_scheduler(recipe, optimizer)
    lr = recipe.optim.lr

    def at(iteration):
        scheduler.step_update(num_updates=iteration)
        return optimizer.param_groups[0]["lr"]

    assert at(0) == pytest.approx(lr * 0.001)
    assert at(5) == pytest.approx(lr * (0.001 + 0.999 * 0.5))
    assert at(10) == pytest.approx(lr)
    assert at(59) == pytest.approx(lr)
    assert at(60) == pytest.approx(lr * 0.1)  # detectron2: iteration 60 runs at the dropped LR
    assert at(90) == pytest.approx(lr * 0.01)


def test_scale_jitter_draws_train_sizes_around_train_size():
    assert train_sizes(_recipe()) == (64,)
    assert train_sizes(_recipe(**{"data.scale_jitter": 0.25})) == (48, 56, 64, 72, 80)


def test_a_list_of_train_sizes_is_drawn_per_image_as_detectron2_does():
    from spaces import RecipeError

    recipe = _recipe(**{"data.train_size": [48, 56, 64], "data.max_size": 200})
    assert train_sizes(recipe) == (48, 56, 64)
    model = build_detector(recipe, num_classes=11)
    model.train()
    torch.manual_seed(0)
    image = torch.rand(3, 32, 48)
    shorter = {min(model.transform([image])[0].image_sizes[0]) for _ in range(30)}  # torchvision draws one per image
    assert shorter == {48, 56, 64}
    with pytest.raises(RecipeError, match="with a list of train sizes set it to 0"):
        _recipe(**{"data.train_size": [48, 64], "data.scale_jitter": 0.1})
    # The paper presets keep Detectron's single 800, which produced the paper's numbers.
    assert resolve_recipe("scratch-maskrcnn-r50-gn-3x").data.train_size == 800


def test_freeze_at_2_freezes_the_stem_and_res2_of_a_pretrained_backbone(tmp_path):
    from spaces import RecipeError

    classifier = timm.create_model("resnet18", num_classes=10)
    torch.save({"model": classifier.state_dict()}, tmp_path / "checkpoint.pt")
    recipe = _recipe(**{"model.init": "pretrained", "model.pretrained": str(tmp_path), "model.norm": "bn", "model.freeze_at": 2})
    body = build_detector(recipe, num_classes=11).backbone.body
    frozen = {name.split(".")[0] for name, p in body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1"}  # bn1 and layer1's BNs became frozen BN: no parameters left to train
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert isinstance(body.bn1, FrozenBatchNorm2d) and not any(isinstance(m, nn.BatchNorm2d) for m in body.layer1.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in body.layer2.modules())
    assert torch.equal(body.bn1.running_mean, classifier.bn1.running_mean)  # its pretrained statistics, kept
    # Detectron and detectron2: pretrained presets freeze 2, scratch ones 0; freezing random weights is refused.
    assert resolve_recipe("pretrained-maskrcnn-r50-gn-3x").model.freeze_at == 2
    assert resolve_recipe("scratch-maskrcnn-r50-gn-3x").model.freeze_at == 0
    with pytest.raises(RecipeError, match="would freeze randomly initialized stages"):
        _recipe(**{"model.freeze_at": 2})


def test_training_reports_coco_ap_every_eval_period_and_resumes_exactly(tiny_coco):
    recipe = _recipe(**{"data.name": tiny_coco})
    full = LocalSession(keep_checkpoints=True)
    train_detector(recipe, full)
    assert [r.progress.done for r in full.reports] == [2, 4]
    last = full.reports[-1].metrics
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl", "segm_AP", "segm_AP50"):
        assert math.isfinite(last[f"val/{key}"])
    assert full.reports[-1].progress.total == 4 and full.reports[-1].completed and last["train/loss"] > 0 and "train/loss_mask" in last
    assert last["lr"] == pytest.approx(recipe.optim.lr * 0.1)
    ckpt = torch.load(f"{full.checkpoints[0]}/checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 2

    resumed = LocalSession(resume_from=full.checkpoints[0])
    train_detector(recipe, resumed)
    assert [r.progress.done for r in resumed.reports] == [4]
    assert resumed.reports[0].metrics["train/loss"] == pytest.approx(last["train/loss"], rel=1e-5)
    assert resumed.reports[0].metrics["val/bbox_AP"] == pytest.approx(last["val/bbox_AP"], abs=1e-6)


def test_less_data_subset_and_faster_rcnn(tiny_coco):
    session = LocalSession()
    train_detector(_recipe(**{"data.name": tiny_coco, "model.name": "faster_rcnn", "data.max_images": 4, "schedule.iterations": 2, "schedule.steps": [1], "schedule.warmup_iters": 0}), session)
    assert [r.progress.done for r in session.reports] == [2]
    assert not any(k.startswith("val/segm") for k in session.reports[0].metrics)


def test_one_training_loader_with_living_workers_serves_every_eval_period(tiny_coco, monkeypatch):
    from trainables import detection

    made = []

    class Loader(detection.DataLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(detection, "DataLoader", Loader)
    session = LocalSession()
    train_detector(_recipe(**{"data.name": tiny_coco, "runtime.cpus_per_worker": 2}), session)  # one loader worker process
    assert [r.progress.done for r in session.reports] == [2, 4]  # two periods, an evaluation between them
    training = [loader for loader in made if loader.drop_last]
    assert len(training) == 1 and training[0].num_workers == 1 and training[0].persistent_workers
