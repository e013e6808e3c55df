"""The tiny BiT model is a real GN+WS ResNet-v2 built by timm; BiT .npz checkpoints load through timm."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import StdConv2d

import trainables.bit as bit
from spaces import DataError, RecipeError
from trainables.bit import TINY_MODEL, gn_ws_violations, is_gn_ws, load_bit_npz, zero_init_head


def _tiny(num_classes: int = 10, **kwargs) -> nn.Module:
    return timm.create_model(TINY_MODEL, num_classes=num_classes, **kwargs)


def _bit_npz(model: nn.Module, path, prefix: str = "resnet/") -> None:
    """Write ``model`` in the original BiT checkpoint layout (the names timm's loader reads)."""

    def hwio(tensor: torch.Tensor) -> np.ndarray:
        array = tensor.detach().numpy()
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array

    weights = {
        f"{prefix}root_block/standardized_conv2d/kernel": hwio(model.stem.conv.weight),
        f"{prefix}group_norm/gamma": hwio(model.norm.weight),
        f"{prefix}group_norm/beta": hwio(model.norm.bias),
        f"{prefix}head/conv2d/kernel": hwio(model.head.fc.weight),
        f"{prefix}head/conv2d/bias": hwio(model.head.fc.bias),
    }
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            unit = f"{prefix}block{i + 1}/unit{j + 1:02d}/"
            layers = (("a", block.conv1, block.norm1), ("b", block.conv2, block.norm2), ("c", block.conv3, block.norm3))
            for part, conv, norm in layers:
                weights[f"{unit}{part}/standardized_conv2d/kernel"] = hwio(conv.weight)
                weights[f"{unit}{part}/group_norm/gamma"] = hwio(norm.weight)
                weights[f"{unit}{part}/group_norm/beta"] = hwio(norm.bias)
            if block.downsample is not None:
                weights[f"{unit}a/proj/standardized_conv2d/kernel"] = hwio(block.downsample.conv.weight)
    np.savez(path, **weights)


def _randomize(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    return model


def test_tiny_model_is_gn_ws_with_no_batchnorm():
    model = _tiny()
    assert gn_ws_violations(model) == []
    convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not n.startswith("head")]
    assert convs and all(isinstance(m, StdConv2d) for m in convs)
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_real_bit_r50x1_is_gn_ws():
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False)  # architecture only: nothing is downloaded
    assert is_gn_ws(model), gn_ws_violations(model)
    assert callable(model.load_pretrained)


def test_batchnorm_resnet_is_not_gn_ws():
    violations = gn_ws_violations(timm.create_model("test_resnet", num_classes=10))
    assert any("BatchNorm2d is not GroupNorm" in v for v in violations)
    assert any("Conv2d is not weight-standardized" in v for v in violations)


@pytest.mark.parametrize("size", [32, 64])
def test_forward_gives_one_row_of_logits_per_image(size):
    model = _tiny(num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, size, size)).shape == (3, 7)


def test_head_is_zero_initialized_so_first_logits_are_zero():
    model = _tiny().eval()
    assert torch.count_nonzero(model.head.fc.weight) == 0 and torch.count_nonzero(model.head.fc.bias) == 0
    with torch.no_grad():
        assert torch.equal(model(torch.randn(2, 3, 32, 32)), torch.zeros(2, 10))


def test_factory_takes_timm_arguments():
    model = _tiny(num_classes=5, drop_path_rate=0.1)
    assert any(type(m).__name__ == "DropPath" for m in model.modules())
    assert timm.data.resolve_data_config({}, model=model)["mean"] == (0.5, 0.5, 0.5)
    headless = _tiny(num_classes=0)
    assert headless(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_tiny_model_trains():
    model = _tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    images, labels = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    assert torch.count_nonzero(model.head.fc.weight) > 0


def test_zero_init_head_works_on_timm_bit_models():
    model = zero_init_head(timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=3))
    assert torch.count_nonzero(model.head.fc.weight) == 0


def test_registration_is_idempotent_on_reload():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(bit)
    assert TINY_MODEL in timm.list_models("resnetv2_bit*")


def test_bit_npz_round_trips_through_timm_loader(tmp_path):
    source = _randomize(_tiny()).eval()
    path = tmp_path / "BiT-tiny.npz"
    _bit_npz(source, path)
    target = _tiny().eval()
    load_bit_npz(target, path)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(source(images), target(images))


def test_bit_npz_keeps_a_new_zero_head(tmp_path):
    path = tmp_path / "BiT-tiny.npz"
    _bit_npz(_randomize(_tiny(num_classes=10)), path)
    target = _tiny(num_classes=3)
    load_bit_npz(target, path)
    assert torch.count_nonzero(target.head.fc.weight) == 0
    assert torch.count_nonzero(target.stem.conv.weight) > 0


def _one_line_data_error(model, path) -> str:
    with pytest.raises(DataError) as info:
        load_bit_npz(model, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_load_bit_npz_missing_file(tmp_path):
    assert "does not exist" in _one_line_data_error(_tiny(), tmp_path / "BiT-M-R50x1.npz")


@pytest.mark.parametrize("kind", ["text", "npy", "other npz"])
def test_load_bit_npz_rejects_files_that_are_not_bit_npz(tmp_path, kind):
    path = tmp_path / "weights.npz"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "npy":
        with open(path, "wb") as handle:
            np.save(handle, np.zeros(3))
    else:
        np.savez(path, kernel=np.zeros(3))
    assert "is not a BiT .npz archive" in _one_line_data_error(_tiny(), path)


def test_load_bit_npz_rejects_a_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "BiT-tiny.npz"
    _bit_npz(_tiny(), path)
    deeper = timm.create_model(TINY_MODEL, layers=[1, 2, 1, 1], num_classes=10)
    assert "does not fit" in _one_line_data_error(deeper, path)
    wider = timm.create_model(TINY_MODEL, channels=(64, 128, 256, 1024), num_classes=10)
    assert "does not fit" in _one_line_data_error(wider, path)


def test_load_bit_npz_needs_a_resnetv2(tmp_path):
    with pytest.raises(RecipeError, match="ResNetV2"):
        load_bit_npz(timm.create_model("test_resnet"), tmp_path / "x.npz")


def test_data_preparation_follows_the_model_where_the_recipe_sets_nothing():
    """Mean, std, interpolation and test crop from the model's pretrained config (BiT weights expect [-1, 1])."""
    from spaces import resolve_recipe
    from trainables.classification import data_config

    bit = data_config(resolve_recipe("bit-hyperrule", {}))
    assert (bit["mean"], bit["std"], bit["interpolation"]) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    # ResNet-50: ImageNet's mean and std; the A1-A3 presets set bicubic and 0.95 themselves, which timm's agree with.
    assert data_config(resolve_recipe("rsb-a3", {})) == {
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic", "crop_pct": 0.95}
    # Unset in a recipe: the model's. Set: the recipe's.
    unset = resolve_recipe("bit-hyperrule", {"data.interpolation": None, "data.crop_pct": None})
    assert (data_config(unset)["interpolation"], data_config(unset)["crop_pct"]) == ("bicubic", 0.875)  # resnetv2_50x1_bit's
    mine = data_config(resolve_recipe("bit-hyperrule", {"data.mean": [0.1, 0.2, 0.3], "data.std": [1, 1, 1], "data.crop_pct": 0.9}))
    assert (mine["mean"], mine["std"], mine["crop_pct"]) == ((0.1, 0.2, 0.3), (1, 1, 1), 0.9)


def test_bit_crop_squashes_a_non_square_image_then_crops_and_tests_on_the_whole_squashed_image():
    from PIL import Image
    from torchvision.transforms import functional as F

    from spaces import resolve_recipe
    from trainables.classification import build_transforms

    recipe = resolve_recipe("bit-hyperrule", {"data.precrop": 1.25, "data.train_size": 32, "data.test_size": 32})
    image = Image.new("RGB", (90, 30), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 15, 30))  # a white band along the left edge: a center crop cuts it off
    train, evaluation = build_transforms(recipe)
    tested = evaluation(image)
    assert tested.shape == (3, 32, 32)
    # Squashed whole to 32 x 32 (no center crop: the band stays), in [-1, 1].
    expected = F.normalize(F.to_tensor(F.resize(image, [32, 32], F.InterpolationMode.BILINEAR)), [0.5] * 3, [0.5] * 3)
    assert torch.allclose(tested, expected) and tested.max() == 1.0 and tested.min() == -1.0
    torch.manual_seed(0)
    crops = [train(image) for _ in range(8)]
    assert all(c.shape == (3, 32, 32) for c in crops)
    # Random 32 crops of the 40 x 40 squash: they move (unlike a center crop), and each keeps 32/40 of the width.
    assert len({tuple(c[0, 16].tolist()) for c in crops}) > 1

