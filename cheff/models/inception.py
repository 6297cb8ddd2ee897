"""The FID Inception network (TF "2015-12-05" Inception-v3) as a plain PyTorch module.

The network FID and KID are reported with: torch-fidelity's ``FeatureExtractorInceptionV3``
(which torchmetrics wraps), ported without torchvision. It loads the standard converted
weights file ``pt_inception-2015-12-05-6726825d.pth`` (472 float32 tensors, no code) from a
local path; parameter names follow that file. What must match
(``../shared/fid-inception/FORMAT.md``):

- input uint8 N x 3 x H x W (grey replicated), cast to float32;
- TensorFlow-1 bilinear resize to 299 (source position i * H / 299 in float32, no half-pixel
  offset, no antialias), always applied;
- scaling (x - 128) / 128;
- conv (no bias) -> batch norm with **eps 0.001** -> ReLU units; block average pools do not
  count padding; ``Mixed_7c``'s pool branch is a **max** pool;
- features: spatial means after the two stem max pools ('64', '192') and ``Mixed_6e``
  ('768'), pool3 ('2048', the FID feature), and the 1008-way logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_EPS = 1e-3
SIZE = 299
FEATURES = ("64", "192", "768", "2048", "logits_unbiased", "logits")


class Unit(nn.Module):
    """conv (no bias) -> batch norm (eps 0.001) -> ReLU; keys ``conv.weight``, ``bn.*``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = Unit(cin, 64, 1)
        self.branch5x5_1 = Unit(cin, 48, 1)
        self.branch5x5_2 = Unit(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Unit(cin, 64, 1)
        self.branch3x3dbl_2 = Unit(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Unit(96, 96, 3, padding=1)
        self.branch_pool = Unit(cin, pool, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class BlockB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = Unit(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Unit(cin, 64, 1)
        self.branch3x3dbl_2 = Unit(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Unit(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class BlockC(nn.Module):
    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.branch1x1 = Unit(cin, 192, 1)
        self.branch7x7_1 = Unit(cin, c, 1)
        self.branch7x7_2 = Unit(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Unit(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Unit(cin, c, 1)
        self.branch7x7dbl_2 = Unit(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Unit(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Unit(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Unit(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Unit(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for unit in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            double = unit(double)
        return torch.cat([self.branch1x1(x), seven, double, self.branch_pool(_avg_pool(x))], 1)


class BlockD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = Unit(cin, 192, 1)
        self.branch3x3_2 = Unit(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Unit(cin, 192, 1)
        self.branch7x7x3_2 = Unit(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Unit(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Unit(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        seven = self.branch7x7x3_1(x)
        for unit in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = unit(seven)
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1
        )


class BlockE(nn.Module):
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool  # Mixed_7c: a max pool (a quirk of the TF graph)
        self.branch1x1 = Unit(cin, 320, 1)
        self.branch3x3_1 = Unit(cin, 384, 1)
        self.branch3x3_2a = Unit(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Unit(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Unit(cin, 448, 1)
        self.branch3x3dbl_2 = Unit(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Unit(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Unit(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Unit(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(three),
                self.branch3x3_2b(three),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            1,
        )


def tf1_resize(x: Tensor, size: int = SIZE) -> Tensor:
    """TensorFlow-1 ``resize_bilinear`` (align_corners False, no half-pixel offset) of float
    images (N, C, H, W) to ``size`` x ``size``; source positions computed in float32."""
    height, width = x.shape[-2:]

    def axis(length: int) -> tuple[Tensor, Tensor, Tensor]:
        ratio = torch.tensor(length / size, dtype=torch.float32)
        position = torch.arange(size, dtype=torch.float32) * ratio
        low = position.floor()
        frac = position - low
        low_index = low.to(torch.int64)
        high_index = (low_index + 1).clamp(max=length - 1)
        return low_index.to(x.device), high_index.to(x.device), frac.to(x.device)

    y0, y1, fy = axis(height)
    x0, x1, fx = axis(width)
    top_rows, bottom_rows = x[..., y0, :], x[..., y1, :]
    top = top_rows[..., x0] + (top_rows[..., x1] - top_rows[..., x0]) * fx
    bottom = bottom_rows[..., x0] + (bottom_rows[..., x1] - bottom_rows[..., x0]) * fx
    return top + (bottom - top) * fy[:, None]


class FIDInceptionV3(nn.Module):
    """``forward(uint8 images (N, 3, H, W))`` -> dict of the features named in ``FEATURES``.

    :meth:`from_file` loads the standard ``pt_inception-2015-12-05-*.pth`` weights-only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = Unit(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Unit(32, 32, 3)
        self.Conv2d_2b_3x3 = Unit(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Unit(64, 80, 1)
        self.Conv2d_4a_3x3 = Unit(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> FIDInceptionV3:
        """The network with the weights of a local ``.pth`` (a plain dict of 472 tensors)."""
        from cheff.checkpoints import CheckpointError, check_state, safe_torch_load

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"{path}: no such file; the FID Inception weights are "
                "pt_inception-2015-12-05-6726825d.pth (see docs/weights.md)"
            )
        state = safe_torch_load(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state)}")
        model = cls()
        # The converted file has no BatchNorm counters (unused in inference): supply them.
        counters = {
            k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")
        }
        model.load_state_dict(check_state(model, counters | dict(state), path))
        return model.eval()

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, H, W) -> the network's input (N, 3, 299, 299): resize, (x - 128) / 128."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected uint8 images (N, 3, H, W) (grey replicated), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        return (tf1_resize(images.float()) - 128) / 128

    def forward(self, images: Tensor, features: Sequence[str] = ("2048",)) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        out["64"] = x.mean((2, 3))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        out["192"] = x.mean((2, 3))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        out["768"] = x.mean((2, 3))
        for block in (self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean((2, 3))
        out["2048"] = pool
        out["logits_unbiased"] = pool @ self.fc.weight.T
        out["logits"] = out["logits_unbiased"] + self.fc.bias
        return {name: out[name] for name in features}
