"""The PatchGAN discriminator of the autoencoder's training loss (taming's NLayerDiscriminator).

Layer order and names follow taming-transformers' ``taming/modules/discriminator/model.py``
(BatchNorm, no ActNorm), so the ``loss.discriminator.*`` entries of an official training
checkpoint load without a key map. Each output logit judges one overlapping patch (a 70 x 70
receptive field for ``n_layers=3``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

KERNEL = 4
PADDING = 1
SLOPE = 0.2
INIT_STD = 0.02


class NLayerDiscriminator(nn.Module):
    """conv(s2) + LeakyReLU, (n_layers - 1) x [conv(s2), BN, LeakyReLU], conv(s1), BN,
    LeakyReLU, conv(s1) to one channel; convolutions before a BatchNorm have no bias.

    ``generator``: where the initial weights are drawn from (:func:`weights_init`); None uses
    torch's global RNG, as taming does.
    """

    def __init__(
        self,
        input_nc: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, KERNEL, stride=2, padding=PADDING),
            nn.LeakyReLU(SLOPE, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            previous, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last of these keeps the resolution - 1
            layers += [
                nn.Conv2d(ndf * previous, ndf * mult, KERNEL, stride, PADDING, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(SLOPE, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, KERNEL, stride=1, padding=PADDING))
        self.main = nn.Sequential(*layers)
        weights_init(self, generator)

    def forward(self, x: Tensor) -> Tensor:
        """(B, input_nc, H, W) -> patch logits (B, 1, h, w); 64 x 64 -> 6 x 6 for n_layers=3."""
        return self.main(x)


@torch.no_grad()
def weights_init(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """taming's init: conv weights N(0, 0.02); BatchNorm weights N(1, 0.02), biases 0.

    Conv biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as in taming; with a
    ``generator`` they are redrawn from it, so the generator alone fixes the whole init.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, INIT_STD, generator=generator)
            if m.bias is not None and generator is not None:
                bound = 1 / math.sqrt(m.weight[0].numel())
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, INIT_STD, generator=generator)
            nn.init.zeros_(m.bias)
