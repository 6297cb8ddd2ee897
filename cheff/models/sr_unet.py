"""The super-resolution U-Net of the Cheff cascade (SR3-style, ``denoising-diffusion-pytorch``).

Not the latent diffusion U-Net: a small pixel-space network that predicts the noise of a
1024 x 1024 image given its bicubic-upsampled 256 x 256 version, concatenated on the channel
axis (noisy target first). Parameter names follow the released ``cheff_sr_base.pt`` /
``cheff_sr_fine.pt`` (``["model"]``) one to one. The quirks that matter for parity
(``../shared/cheff-official/FORMAT.md`` section 4):

- the time embedding is [sin, cos] of the raw integer t with frequencies
  exp(-ln(10000) i / (half - 1)) (not the LDM's [cos, sin] with / half);
- each ResnetBlock adds the time embedding *after* its first block's activation;
- linear attention sits on the lowest-resolution down levels and on the highest-resolution
  up levels (opposite ends), full softmax attention only in the middle;
- every up level upsamples with a transposed convolution, and the full-resolution skip of the
  first down level is never used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_HEADS = 4
ATTENTION_HEAD_DIM = 32


@dataclass(frozen=True)
class SRUNetConfig:
    """The SR U-Net's architecture; the defaults are the released ``cheff_sr_*.pt``.

    ``attention_layers`` is the official ``num_attention_layer``: linear attention on down level
    ``i`` and up level ``j`` when the index is at least ``len(dim_mults) - attention_layers + 1``
    (the four lowest-resolution down and the three highest-resolution up levels released).
    ``init_dim`` None is the official ``dim // 3 * 2``.
    """

    dim: int = 16
    dim_mults: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 32, 32)
    channels: int = 2  # noisy target + upsampled low resolution
    out_dim: int = 1
    init_dim: int | None = None
    attention_layers: int = 5
    groups: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim_mults", tuple(int(m) for m in self.dim_mults))
        if len(self.dim_mults) < 2:
            raise ValueError("an SR U-Net needs at least two levels")
        for channels in (self.dim * m for m in self.dim_mults):
            if channels % self.groups:
                raise ValueError(f"{channels} channels do not split into {self.groups} groups")

    @property
    def first_channels(self) -> int:
        return self.init_dim if self.init_dim is not None else self.dim // 3 * 2

    @property
    def level_pairs(self) -> list[tuple[int, int]]:
        """(in, out) channels of each down level."""
        dims = [self.first_channels, *(self.dim * m for m in self.dim_mults)]
        return list(zip(dims[:-1], dims[1:]))

    @property
    def attention_from(self) -> int:
        """The first level index (down and up) with linear attention."""
        return len(self.dim_mults) - self.attention_layers + 1

    @property
    def downsampling(self) -> int:
        """Image sides must be multiples of this."""
        return 2 ** (len(self.dim_mults) - 1)

    @property
    def time_dim(self) -> int:
        return 4 * self.dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SRUNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SR U-Net config keys {unknown}; known: {sorted(known)}")
        return cls(**data)


def sr_timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """(B,) raw integer steps -> (B, dim): [sin(t f), cos(t f)] with
    f_i = exp(-ln(10000) i / (half - 1)), half = dim // 2."""
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -scale)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        return sr_timestep_embedding(t, self.dim)


class Block(nn.Module):
    """3x3 convolution -> GroupNorm -> SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.norm(self.proj(x)))


class ResnetBlock(nn.Module):
    """block1, + the projected time embedding (after block1's activation), block2, + skip."""

    def __init__(self, dim: int, dim_out: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out))
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv: nn.Module = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, time: Tensor) -> Tensor:
        h = self.block1(x) + self.mlp(time)[:, :, None, None]
        return self.block2(h) + self.res_conv(x)


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class PreNorm(nn.Module):
    """GroupNorm(1, C) (a LayerNorm over channels and pixels), then ``fn``."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn  # registered first: the released files list fn.* before norm.*
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x))


def _heads(t: Tensor, heads: int) -> Tensor:
    """(B, h*c, H, W) -> (B, h, c, H*W)."""
    b, _, height, width = t.shape
    return t.reshape(b, heads, -1, height * width)


class LinearAttention(nn.Module):
    """Efficient attention: softmax(q) over each head's channels, softmax(k) over pixels,
    out = (k v^T)^T q, then a 1x1 convolution and GroupNorm(1, C)."""

    def __init__(self, dim: int, heads: int = ATTENTION_HEADS, dim_head: int = ATTENTION_HEAD_DIM):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, _, height, width = x.shape
        q, k, v = (_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, height, width))


class Attention(nn.Module):
    """Full softmax attention over pixels (the middle block), scale d^-0.5."""

    def __init__(self, dim: int, heads: int = ATTENTION_HEADS, dim_head: int = ATTENTION_HEAD_DIM):
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, height, width = x.shape
        q, k, v = (_heads(t, self.heads).transpose(-1, -2) for t in self.to_qkv(x).chunk(3, 1))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, height, width))


def _attention_or_identity(use: bool, dim: int) -> nn.Module:
    return Residual(PreNorm(dim, LinearAttention(dim))) if use else nn.Identity()


class SRUNet(nn.Module):
    """eps prediction: ``forward(x, t)`` with ``x`` = cat([noisy target, condition], 1)."""

    def __init__(self, config: SRUNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or SRUNetConfig()
        time_dim, groups = config.time_dim, config.groups
        self.init_conv = nn.Conv2d(config.channels, config.first_channels, 7, padding=3)
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(config.dim),
            nn.Linear(config.dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )
        pairs = config.level_pairs
        last, attend = len(pairs) - 1, config.attention_from
        self.downs = nn.ModuleList(
            nn.ModuleList(
                [
                    ResnetBlock(din, dout, time_dim, groups),
                    ResnetBlock(dout, dout, time_dim, groups),
                    _attention_or_identity(i >= attend, dout),
                    nn.Conv2d(dout, dout, 4, 2, 1) if i < last else nn.Identity(),
                ]
            )
            for i, (din, dout) in enumerate(pairs)
        )
        self.ups = nn.ModuleList(
            nn.ModuleList(
                [
                    ResnetBlock(dout * 2, din, time_dim, groups),
                    ResnetBlock(din, din, time_dim, groups),
                    _attention_or_identity(j >= attend, din),
                    nn.ConvTranspose2d(din, din, 4, 2, 1),
                ]
            )
            for j, (din, dout) in enumerate(reversed(pairs[1:]))
        )
        # Registered after the up path, as in the released files (their key order).
        mid = pairs[-1][1]
        self.mid_block1 = ResnetBlock(mid, mid, time_dim, groups)
        self.mid_attn = Residual(PreNorm(mid, Attention(mid)))
        self.mid_block2 = ResnetBlock(mid, mid, time_dim, groups)
        self.final_conv = nn.Sequential(
            Residual(
                nn.Sequential(
                    Block(config.dim, config.dim, groups), Block(config.dim, config.dim, groups)
                )
            ),
            nn.Conv2d(config.dim, config.out_dim, 1),
        )
        self.gradient_checkpointing = False  # recompute each level in backward (training)

    def forward(self, x: Tensor, t: Tensor | int) -> Tensor:
        factor = self.config.downsampling
        if x.ndim != 4 or x.shape[1] != self.config.channels or x.shape[-1] % factor:
            raise ValueError(
                f"expected (B, {self.config.channels}, H, W) with H and W multiples of "
                f"{factor}, got {tuple(x.shape)}"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        time = self.time_mlp(t)
        run = _checkpointed if self.gradient_checkpointing and self.training else _direct
        x = self.init_conv(x)
        skips = []
        for block1, block2, attention, downsample in self.downs:
            x = run(_level, block1, block2, attention, x, time)
            skips.append(x)
            x = downsample(x)
        x = self.mid_block1(x, time)
        x = self.mid_attn(x)
        x = self.mid_block2(x, time)
        for block1, block2, attention, upsample in self.ups:
            x = run(_level, block1, block2, attention, torch.cat([x, skips.pop()], 1), time)
            x = upsample(x)
        return self.final_conv(x)  # skips[0], the full-resolution one, stays unused


def _level(block1: nn.Module, block2: nn.Module, attention: nn.Module, x: Tensor, t: Tensor):
    return attention(block2(block1(x, t), t))


def _direct(fn: Any, *args: Any) -> Tensor:
    return fn(*args)


def _checkpointed(fn: Any, *args: Any) -> Tensor:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False)


def config_from_state(state: dict[str, Tensor]) -> SRUNetConfig:
    """Read the architecture off the tensor shapes of an SR U-Net state dict (no prefix)."""
    dim = state["time_mlp.1.weight"].shape[1]
    init_dim, channels = state["init_conv.weight"].shape[:2]
    levels = sorted({int(key.split(".")[1]) for key in state if key.startswith("downs.")})
    mults = [state[f"downs.{i}.0.block1.proj.weight"].shape[0] // dim for i in levels]
    attended = [i for i in levels if f"downs.{i}.2.fn.fn.to_qkv.weight" in state]
    groups = 8
    return SRUNetConfig(
        dim=int(dim),
        dim_mults=tuple(mults),
        channels=int(channels),
        out_dim=int(state["final_conv.1.weight"].shape[0]),
        init_dim=int(init_dim) if int(init_dim) != dim // 3 * 2 else None,
        attention_layers=len(levels) + 1 - (attended[0] if attended else len(levels) + 1),
        groups=groups,
    )
