"""The training loop, run bare: it learns, is reproducible, checkpoints, resumes, and stops on divergence."""

from __future__ import annotations

import pytest

from spaces import TrainingError, resolve_recipe
from trainables import LocalSession, load_checkpoint, train_classifier


def _train(epochs=3, keep=False, resume_from=None, **extra):
    recipe = resolve_recipe("digits-smoke", {"schedule.epochs": epochs, **extra})
    session = LocalSession(keep_checkpoints=keep, resume_from=resume_from)
    train_classifier(recipe, session)
    return session


def test_learns_and_reports_every_epoch():
    session = _train()
    assert [(r.progress.done, r.progress.total, r.progress.unit.value) for r in session.reports] == [(1, 3, "epoch"), (2, 3, "epoch"), (3, 3, "epoch")]
    assert [r.outcome.value for r in session.reports] == ["running", "running", "completed"]
    last = session.reports[-1].metrics
    for key in ("train/loss", "val/top1", "val/top5", "val/loss", "lr", "images_per_s", "epoch_s"):
        assert key in last
    assert last["val/top1"] > 0.5  # chance is 0.1
    assert last["val/top5"] >= last["val/top1"]
    assert last["images_per_s"] > 0


def test_same_recipe_and_seed_give_the_same_result():
    first = _train(epochs=2, **{"data.rand_augment": "rand-m5-mstd0.5-inc1", "reg.mixup_alpha": 0.2})
    second = _train(epochs=2, **{"data.rand_augment": "rand-m5-mstd0.5-inc1", "reg.mixup_alpha": 0.2})
    assert [r.metrics["val/top1"] for r in first.reports] == [r.metrics["val/top1"] for r in second.reports]
    other = _train(epochs=2, **{"data.rand_augment": "rand-m5-mstd0.5-inc1", "reg.mixup_alpha": 0.2, "runtime.seed": 1})
    assert [r.metrics["train/loss"] for r in other.reports] != [r.metrics["train/loss"] for r in first.reports]


def test_checkpoints_load_weights_only_and_resume_where_they_stopped(tmp_path):
    full = _train(epochs=3, keep=True)
    ckpt = load_checkpoint(full.checkpoints[0])  # torch.load(weights_only=True)
    assert ckpt["epoch"] == 1
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "ema", "epoch", "recipe", "rng"}
    assert ckpt["recipe"]["optim"]["lr"] == 0.1
    resumed = _train(epochs=3, resume_from=full.checkpoints[0])
    assert [r.progress.done for r in resumed.reports] == [2, 3]
    # Model, optimizer, schedule and every random stream come back: the resumed run is the same run.
    assert [r.metrics["val/top1"] for r in resumed.reports] == [r.metrics["val/top1"] for r in full.reports[1:]]


def test_ema_weights_are_scored_and_the_raw_model_kept():
    session = _train(epochs=2, **{"reg.ema_decay": 0.9})
    last = session.reports[-1].metrics
    assert "val_model/top1" in last and "val/top1" in last


def test_a_run_of_an_ema_recipe_hands_on_its_ema_weights():
    """``model.init=run:NAME`` and an upstream backbone read a run's checkpoint: they get the weights
    the run was scored and chosen on (its EMA), not the raw ones it also keeps for resuming."""
    from trainables.checkpoints import read_state_dict

    session = _train(epochs=2, keep=True, **{"reg.ema_decay": 0.9})
    ckpt = load_checkpoint(session.checkpoints[-1])
    weights = read_state_dict(session.checkpoints[-1])
    key = "fc.weight"
    assert weights[key].equal(ckpt["ema"][f"module.{key}"]) and not weights[key].equal(ckpt["model"][key])
    plain = _train(epochs=1, keep=True)
    assert read_state_dict(plain.checkpoints[-1])[key].equal(load_checkpoint(plain.checkpoints[-1])["model"][key])


def test_bce_trains():
    session = _train(epochs=1, **{"loss.name": "bce", "loss.target_threshold": 0.2})
    assert session.reports[-1].metrics["train/loss"] > 0


def test_repeated_augmentation_is_refused_on_one_worker():
    from spaces import RecipeError

    recipe = resolve_recipe("digits-smoke", {"data.repeated_aug": 3})  # loads: sweeps stored such recipes
    with pytest.raises(RecipeError, match=r"data.repeated_aug=3 needs runtime.workers >= 2"):
        train_classifier(recipe, LocalSession())


def test_repeated_augmentation_sends_an_images_repeats_to_different_workers_in_a_seeded_order():
    from trainables.classification import SeededRepeatAugSampler

    dataset = list(range(600))

    def epoch(seed, rank, number=1):
        sampler = SeededRepeatAugSampler(dataset, num_replicas=3, rank=rank, num_repeats=3, seed=seed)
        sampler.set_epoch(number)
        return list(sampler)

    ranks = [epoch(0, rank) for rank in range(3)]
    assert ranks[0] == ranks[1] == ranks[2]  # rank r gets the r-th copy of the same images
    assert len(set(ranks[0])) == len(ranks[0]) > 150  # no image twice on one worker
    assert epoch(0, 0) == epoch(0, 0) and epoch(1, 0) != epoch(0, 0) and epoch(0, 0, number=2) != epoch(0, 0)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_warmup_keeps_early_ema_weights_close_to_the_raw_ones(warmup):
    """With decay 0.99 and ~20 updates, the EMA without warmup still holds most of its random init."""
    session = _train(epochs=2, **{"reg.ema_decay": 0.99, "reg.ema_warmup": warmup})
    ema, raw = session.reports[-1].metrics["val/top1"], session.reports[-1].metrics["val_model/top1"]
    assert raw > 0.5
    if warmup:
        assert ema > 0.8 * raw  # measured: 0.68 against 0.79
    else:
        assert ema < 0.5 * raw  # measured: 0.12 against 0.79 (chance is 0.10)


def test_a_diverging_recipe_stops_within_one_check_period():
    from trainables.engine import CHECK_EVERY

    with pytest.raises(TrainingError, match=r"epoch 1, update (\d+) of the epoch .*diverged") as error:
        _train(epochs=3, **{"optim.lr": 100.0, "optim.name": "momentum", "optim.weight_decay": 0.0, "optim.batch_size": 16})
    assert int(error.value.args[0].split("update ")[1].split()[0]) <= CHECK_EVERY


# Tensor methods that make the host wait for the device (on a GPU: a stall of the step's pipeline).
_HOST_READS = {"item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu"}


def test_the_training_step_does_not_wait_for_the_device(monkeypatch):
    """The loss is checked for divergence once every CHECK_EVERY steps (and at the end of the epoch),
    not after each step: a run of many steps reads a tensor on the host a handful of times."""
    from torch.overrides import TorchFunctionMode

    from trainables import classification
    from trainables.engine import CHECK_EVERY

    reads, steps = [], []

    class HostReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in _HOST_READS:
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    train_epoch = classification.train_epoch

    def watched(training, data, *args):
        # The batches are made first: the data pipeline reads CPU tensors (in loader processes on a real run).
        data.train_loader = list(data.train_loader)
        steps.append(len(data.train_loader))
        with HostReads():
            return train_epoch(training, data, *args)

    monkeypatch.setattr(classification, "train_epoch", watched)
    _train(epochs=1, **{"optim.batch_size": 8})
    assert steps[0] > 3 * CHECK_EVERY  # enough steps that a read per step would show
    # One read per check (every CHECK_EVERY steps and at the end) and the epoch's mean loss.
    assert reads == ["item"] * (steps[0] // CHECK_EVERY + 2), reads


def test_batch_larger_than_the_data_is_an_error():
    from spaces import RecipeError

    with pytest.raises(RecipeError, match="exceeds"):
        _train(epochs=1, **{"optim.batch_size": 4096})


def _image_folder(root, classes=("a", "b"), per_class=12, broken=0):
    from PIL import Image

    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                color = (200 * index, 40 + 10 * i, 100)
                Image.new("RGB", (20, 20), color).save(folder / f"{i}.png")
    for i in range(broken):
        (root / "train" / classes[0] / f"broken{i}.png").write_bytes(b"not a png")
    return root


def test_image_folder_trains_and_counts_skipped_images(tmp_path):
    root = _image_folder(tmp_path / "data", per_class=60, broken=1)  # 1 of 241 images: under 1%
    session = _train(epochs=1, **{"data.name": str(root), "data.fraction": 1.0, "optim.batch_size": 16})
    assert session.reports[-1].metrics["data/skipped"] == 1
    assert 0.0 <= session.reports[-1].metrics["val/top1"] <= 1.0


def test_a_dataset_with_too_many_unreadable_images_fails(tmp_path):
    from spaces import DataError

    root = _image_folder(tmp_path / "data", per_class=10, broken=3)
    with pytest.raises(DataError, match="could not be decoded"):
        _train(epochs=1, **{"data.name": str(root), "data.fraction": 1.0, "optim.batch_size": 8})


def test_a_dataset_file_outside_the_root_is_refused(tmp_path):
    from spaces import DataError

    root = _image_folder(tmp_path / "data", per_class=4)
    outside = tmp_path / "secret.png"
    (root / "train" / "a" / "0.png").rename(outside)
    (root / "train" / "a" / "0.png").symlink_to(outside)
    with pytest.raises(DataError, match="outside the dataset root"):
        _train(epochs=1, **{"data.name": str(root), "data.fraction": 1.0, "optim.batch_size": 4})


def test_a_reused_process_builds_the_same_datasets_without_decoding_or_walking_the_folder_again(tmp_path, monkeypatch):
    from torchvision.datasets import DatasetFolder

    from spaces import resolve_recipe
    from trainables import data as data_module
    from trainables.classification import build_transforms

    def build(recipe):
        train_tf, eval_tf = build_transforms(recipe)
        return data_module.build_datasets(recipe.data, recipe.runtime.seed, train_tf, eval_tf)

    digits = resolve_recipe("digits-smoke", {})
    first, second = build(digits), build(digits)
    assert first.train.dataset.images[0] is second.train.dataset.images[0]  # decoded once
    assert first.train_targets == second.train_targets and len(first.val) == len(second.val)

    root = _image_folder(tmp_path / "data", per_class=6)
    folder = resolve_recipe("digits-smoke", {"data.name": str(root), "data.fraction": 1.0})
    before = build(folder)
    walks = []
    monkeypatch.setattr(DatasetFolder, "make_dataset", staticmethod(lambda *a, **k: walks.append(a) or []))
    after = build(folder)  # the next trial of a reused actor
    assert walks == [] and after.train.samples == before.train.samples and len(after.val) == 12


def _train_and_resume_on_two_ranks() -> dict:
    """Rank's view: 2 epochs uninterrupted, then the same recipe resumed from the first epoch's checkpoint."""
    import torch.distributed as dist

    from tests.trainables.ddp import DDPSession

    recipe = resolve_recipe("digits-smoke", {"schedule.epochs": 2, "runtime.workers": 2})
    whole = DDPSession()
    train_classifier(recipe, whole)
    first = [whole.checkpoints[0] if whole.checkpoints else None]
    dist.broadcast_object_list(first, src=0)  # rank 0 keeps the checkpoints
    resumed = DDPSession(resume_from=first[0])
    train_classifier(recipe, resumed)
    keys = ("train/loss", "val/top1", "val/loss")
    return {"whole": [whole.reports[-1].metrics[k] for k in keys], "resumed": [resumed.reports[-1].metrics[k] for k in keys],
            "resumed_reports": len(resumed.reports)}


def test_a_two_worker_ddp_trial_resumes_each_rank_with_its_own_random_streams(tmp_path):
    """Each rank augments with its own RNG: a checkpoint holding only rank 0's streams resumed rank 1 with
    rank 0's augmentations, and the resumed trial's numbers drifted from the uninterrupted one's."""
    from tests.trainables.ddp import run_ranks

    ranks = run_ranks(_train_and_resume_on_two_ranks, tmp_path)
    for rank in ranks:
        assert rank["resumed_reports"] == 1  # it went on from epoch 1: one epoch left
        assert rank["resumed"] == rank["whole"]
