"""Shapes, parameter counts and module structure of the models in fedlpt.models."""

import pytest
import torch
from torch import nn
from torchvision.models.resnet import ResNet

from fedlpt.models import MLP, ConvNet, build_model, resnet18_gn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_convnet_for_mnist_has_the_papers_317706_parameters() -> None:
    model = ConvNet(in_channels=1, num_classes=10, image_size=28)

    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes["features.conv1.weight"] == (128, 1, 3, 3)
    assert shapes["features.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["features.norm3.weight"] == (128,)
    assert shapes["classifier.weight"] == (10, 2048)
    assert count_parameters(model) == 317_706


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("image_size", [8, 28, 32])
def test_convnet_maps_images_to_one_logit_per_class(in_channels: int, image_size: int) -> None:
    model = ConvNet(in_channels=in_channels, num_classes=10, image_size=image_size)
    images = torch.randn(2, in_channels, image_size, image_size)

    logits = model(images)

    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_convnet_pads_28_pixel_inputs_to_32_and_others_by_one() -> None:
    assert ConvNet(1, 10, image_size=28).features.conv1.padding == (3, 3)
    assert ConvNet(1, 10, image_size=32).features.conv1.padding == (1, 1)
    assert ConvNet(1, 10, image_size=8).classifier.in_features == 128  # 8 -> 4 -> 2 -> 1


def test_convnet_layers_are_modules_in_block_order() -> None:
    kinds = [type(module) for module in ConvNet(3, 10, image_size=32).features]

    block = [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d]
    assert kinds == block * 3


def test_convnet_group_norm_normalizes_each_channel_separately() -> None:
    norm = ConvNet(1, 10, image_size=28).features.norm1

    assert norm.num_groups == norm.num_channels == 128
    assert norm.affine


def test_convnet_rejects_images_too_small_for_its_depth() -> None:
    with pytest.raises(ValueError, match="too small"):
        ConvNet(1, 10, image_size=4, depth=3)


def test_mlp_maps_flattened_images_to_logits() -> None:
    model = MLP(in_features=3 * 8 * 8, num_classes=7)

    logits = model(torch.randn(4, 3, 8, 8))

    assert logits.shape == (4, 7)
    linear_widths = [
        (m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)
    ]
    assert linear_widths == [(192, 256), (256, 128), (128, 7)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2


def test_resnet18_gn_maps_cifar_images_to_logits_without_batch_norm() -> None:
    model = resnet18_gn(in_channels=3, num_classes=100)

    logits = model(torch.randn(2, 3, 32, 32))

    assert logits.shape == (2, 100)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)


def test_resnet18_gn_accepts_grayscale_input() -> None:
    model = resnet18_gn(in_channels=1, num_classes=10)

    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "model_type"), [("convnet", ConvNet), ("mlp", MLP), ("resnet18", ResNet)]
)
def test_build_model_returns_the_named_architecture(name: str, model_type: type) -> None:
    model = build_model(name, in_channels=1, image_size=8, num_classes=10)

    assert isinstance(model, model_type)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_build_model_rejects_unknown_name_listing_valid_ones() -> None:
    with pytest.raises(ValueError, match="convnet, mlp, resnet18"):
        build_model("vgg", in_channels=1, image_size=28, num_classes=10)
