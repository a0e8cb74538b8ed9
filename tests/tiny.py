"""Tiny models, batches and grid checks shared by the training tests."""

import torch
from torch import nn

from fedlpt.models import ConvNet
from fedlpt.quant import BFP, quantize


def on_grid(t: torch.Tensor, fmt: BFP) -> bool:
    return torch.equal(quantize(t, BFP(fmt.bits, fmt.block, "nearest")), t)


def batches(n: int = 4, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 1, 8, 8, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
        for _ in range(n)
    ]


def small_convnet() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet(in_channels=1, num_classes=10, image_size=8, width=8)
