"""A stand-in chest X-ray feature extractor for ``cheff eval fid --extractor`` tests: the
documented interface (``build(weights) -> nn.Module``, uint8 (N, 3, H, W) -> (N, D))."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class TinyExtractor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(images.float() / 255))
        return x.mean((2, 3))


def build(weights: Path | None) -> nn.Module:
    model = TinyExtractor()
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model
