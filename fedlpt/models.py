"""Models trained by the federated clients.

Every layer that a quantizer may follow (convolution, linear, activation, pooling) is a
plain ``nn`` module attribute, never a functional call inside ``forward``: the
low-precision wrapper walks the module tree and inserts a quantizer after each of them,
so a functional ``F.relu`` would silently escape quantization.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

MODEL_NAMES: tuple[str, ...] = ("convnet", "mlp", "resnet18")


class ConvNet(nn.Module):
    """ConvNet of "Low Precision Local Training is Enough for Federated Learning" (NeurIPS 2024).

    ``depth`` blocks of Conv2d 3x3 -> GroupNorm(width, width) -> ReLU -> AvgPool2d(2),
    then a linear classifier. GroupNorm with one group per channel is instance
    normalization with affine parameters; unlike BatchNorm it has no running statistics,
    which would otherwise have to be aggregated across clients.

    Args:
        in_channels: channels of the input images (1 for grayscale, 3 for RGB).
        num_classes: number of output logits.
        image_size: height (= width) of the square input images, in pixels.
        width: channels of every convolution.
        depth: number of conv blocks; each halves the spatial size.

    Shape:
        - Input: ``[B, in_channels, image_size, image_size]``, float.
        - Output: ``[B, num_classes]`` logits.

    For 28x28 inputs the first convolution pads by 3 (28 -> 32) so that three poolings
    give a 4x4 map, matching the reference implementation (fc has 2048 inputs for
    width 128); every other size pads by 1.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: int = 128,
        depth: int = 3,
    ) -> None:
        super().__init__()
        if min(in_channels, num_classes, image_size, width, depth) < 1:
            raise ValueError(
                "ConvNet needs positive in_channels, num_classes, image_size, width and "
                f"depth; got {in_channels=}, {num_classes=}, {image_size=}, {width=}, "
                f"{depth=}"
            )
        first_padding = 3 if image_size == 28 else 1
        # A 3x3 convolution with padding p maps size s to s + 2p - 2.
        feature_size = image_size + 2 * first_padding - 2
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for block in range(1, depth + 1):
            padding = first_padding if block == 1 else 1
            layers[f"conv{block}"] = nn.Conv2d(channels, width, kernel_size=3, padding=padding)
            layers[f"norm{block}"] = nn.GroupNorm(width, width, affine=True)
            layers[f"relu{block}"] = nn.ReLU()
            layers[f"pool{block}"] = nn.AvgPool2d(kernel_size=2, stride=2)
            feature_size //= 2
            if feature_size < 1:
                raise ValueError(
                    f"image_size={image_size} is too small for depth={depth}: block {block} "
                    "pools the feature map below 1x1"
                )
            channels = width
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(width * feature_size * feature_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``[B, C, H, W]`` to logits ``[B, num_classes]``."""
        return self.classifier(self.flatten(self.features(x)))


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs: Linear -> ReLU per hidden layer, then Linear.

    Args:
        in_features: number of input features after flattening (``C * H * W`` for images).
        num_classes: number of output logits.
        hidden: widths of the hidden layers, first to last.

    Shape:
        - Input: ``[B, *]`` with ``in_features`` elements per sample.
        - Output: ``[B, num_classes]`` logits.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (256, 128),
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                "MLP needs positive in_features, num_classes and hidden widths; got "
                f"{in_features=}, {num_classes=}, hidden={tuple(hidden)}"
            )
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        features = in_features
        for index, width in enumerate(hidden, start=1):
            layers[f"fc{index}"] = nn.Linear(features, width)
            layers[f"relu{index}"] = nn.ReLU()
            features = width
        layers[f"fc{len(hidden) + 1}"] = nn.Linear(features, num_classes)
        self.layers = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs ``[B, *]`` to logits ``[B, num_classes]``."""
        return self.layers(x)


def _group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups over ``num_channels`` channels.

    A module-level function rather than a lambda because torchvision stores the norm
    factory on the model, and a lambda would make the model unpicklable.
    """
    return nn.GroupNorm(min(32, num_channels), num_channels)


def resnet18_gn(in_channels: int, num_classes: int) -> nn.Module:
    """CIFAR-style ResNet-18 with GroupNorm, for ``[B, in_channels, H, W]`` -> ``[B, num_classes]``.

    The ImageNet stem (7x7 stride-2 conv and max-pool) is replaced by a 3x3 stride-1
    conv and no pooling, as usual for 32x32 inputs. GroupNorm replaces BatchNorm because
    running batch statistics do not aggregate meaningfully across non-IID clients.
    """
    if in_channels < 1 or num_classes < 1:
        raise ValueError(
            f"resnet18_gn needs positive in_channels and num_classes; got {in_channels=}, "
            f"{num_classes=}"
        )
    # torchvision is needed for this model only: a device training the ConvNet does
    # without it.
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, norm_layer=_group_norm)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same initialization torchvision applies to its own convolutions.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Build the model called ``name`` for ``[B, in_channels, image_size, image_size]`` inputs.

    Args:
        name: one of ``"convnet"``, ``"mlp"``, ``"resnet18"``.
        in_channels: channels of the input images.
        image_size: height (= width) of the square input images, in pixels.
        num_classes: number of output logits.

    Raises:
        ValueError: if ``name`` is not a known model.
    """
    if name == "convnet":
        return ConvNet(in_channels, num_classes, image_size)
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes)
    if name == "resnet18":
        return resnet18_gn(in_channels, num_classes)
    raise ValueError(f"unknown model {name!r}; valid names are {', '.join(MODEL_NAMES)}")
