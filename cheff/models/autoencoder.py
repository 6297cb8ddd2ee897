"""The KL-regularised autoencoder of latent diffusion, as Cheff uses it (f = 4, 3 channels).

Module and parameter names follow the official implementation one to one, so the released
``cheff_autoencoder.pt`` state dict loads without a key map. The quirks that matter for
parity (``../shared/cheff-official/FORMAT.md`` section 2): GroupNorm(32, eps 1e-6), swish,
downsampling that zero-pads only right and bottom before a stride-2 3x3 convolution, one
single-head attention block in the middle of encoder and decoder, log-variance clamped to
[-30, 20].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cheff.config import AutoencoderConfig

GROUPS = 32
EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv, twice; a 1x1 ``nin_shortcut`` when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-convolution projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(conv: nn.Conv2d) -> Tensor:  # (B, 1, H*W, C): one head
            return conv(h).reshape(b, 1, c, height * width).transpose(2, 3)

        # softmax(q k^T / sqrt(C)) v, as the official code computes it with bmm; the fused
        # kernel keeps the 4096 x 4096 weights of a 64 x 64 map out of memory on a GPU.
        out = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        out = out.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 convolution with stride 2 (official)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block``s, ``attn``s and an optional resampler (official names)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Middle(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _run_level(level: _Level, h: Tensor, index: int) -> Tensor:
    h = level.block[index](h)
    return level.attn[index](h) if len(level.attn) else h


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2 z, H / f, W / f)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch, mult = config.base_channels, config.channel_mult
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels = ch
        for index, m in enumerate(mult):
            level = _Level()
            for _ in range(config.num_res_blocks):
                level.block.append(ResnetBlock(channels, ch * m, config.dropout))
                channels = ch * m
                if index in config.attention_levels:
                    level.attn.append(AttnBlock(channels))
            if index != len(mult) - 1:
                level.downsample = Downsample(channels)
            self.down.append(level)
        self.mid = _Middle(channels, config.dropout)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for index in range(len(level.block)):
                h = _run_level(level, h, index)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, out, h f, w f); ``up`` is indexed by level (0 = full)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch, mult = config.base_channels, config.channel_mult
        channels = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, channels, 3, padding=1)
        self.mid = _Middle(channels, config.dropout)
        levels: list[_Level] = []
        for index in reversed(range(len(mult))):
            level = _Level()
            for _ in range(config.num_res_blocks + 1):
                level.block.append(ResnetBlock(channels, ch * mult[index], config.dropout))
                channels = ch * mult[index]
                if index in config.attention_levels:
                    level.attn.append(AttnBlock(channels))
            if index != 0:
                level.upsample = Upsample(channels)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for index in range(len(level.block)):
                h = _run_level(level, h, index)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's posterior q(z | x): a diagonal Gaussian per latent element."""

    mean: Tensor
    logvar: Tensor  # clamped to LOGVAR_RANGE, as in the official code

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean, logvar.clamp(*LOGVAR_RANGE))

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(
        self, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """mean + std * noise; ``noise`` drawn from ``generator`` unless given."""
        if noise is None:
            device = self.mean.device if generator is None else generator.device
            noise = torch.randn(self.mean.shape, generator=generator, device=device)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over the latent (the official reduction)."""
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Encoder, decoder and the 1x1 ``quant_conv`` / ``post_quant_conv`` between them.

    Images are (B, 3, H, W) in [-1, 1] (grayscale replicated to 3 channels); H and W must be
    multiples of ``config.downsampling``. ``encode`` gives the posterior, whose ``mean`` is
    what the official wrapper returns as "the latent" (no scale factor is applied here).
    """

    def __init__(self, config: AutoencoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or AutoencoderConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * self.config.z_channels, 2 * self.config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.config.embed_dim, self.config.z_channels, 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """The posterior of images ``x`` (B, in_channels, H, W) in [-1, 1].

        Any floating dtype is taken and cast to the weights' (float64 from numpy, float32 into
        a bf16 model), so the result is in the model's precision; integer images are refused,
        since 8-bit values would have to be mapped to [-1, 1] first.
        """
        factor, channels = self.config.downsampling, self.config.in_channels
        if x.ndim != 4 or x.shape[1] != channels or x.shape[-1] % factor or x.shape[-2] % factor:
            grey = x.ndim == 4 and x.shape[1] == 1 and channels == 3
            hint = " (grey images: x.expand(-1, 3, -1, -1))" if grey else ""
            raise ValueError(
                f"expected images (B, {channels}, H, W) with H and W multiples of {factor}, "
                f"got {tuple(x.shape)}{hint}"
            )
        x = _as_weights_dtype(x, self.encoder.conv_in.weight, "images in [-1, 1]")
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, embed_dim, h, w) -> images (B, out_channels, H, W) in about [-1, 1]; a
        floating ``z`` of another dtype is cast to the weights' as in :meth:`encode`."""
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"expected latents (B, {self.config.embed_dim}, h, w), got {tuple(z.shape)}"
            )
        z = _as_weights_dtype(z, self.post_quant_conv.weight, "latents")
        return self.decoder(self.post_quant_conv(z))

    def reconstruct(
        self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Decode of the posterior mean (the official round trip) or, with ``sample``, of a
        posterior sample whose noise ``generator`` draws (seeded reconstructions)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample else posterior.mean)

    def forward(self, x: Tensor, *, sample: bool = True) -> tuple[Tensor, DiagonalGaussian]:
        """Training-time pass: reconstruction from a posterior sample, and the posterior."""
        posterior = self.encode(x)
        return self.decode(posterior.sample() if sample else posterior.mean), posterior


def _as_weights_dtype(x: Tensor, weight: Tensor, what: str) -> Tensor:
    """``x`` in the dtype of ``weight``: floating inputs are cast, integer ones refused."""
    if not x.is_floating_point():
        raise ValueError(
            f"expected floating point {what}, got dtype {str(x.dtype).removeprefix('torch.')}"
        )
    return x.to(weight.dtype)
