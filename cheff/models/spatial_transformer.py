"""The report-conditioned U-Net's attention: latent diffusion's ``SpatialTransformer``.

Names follow the official ``ldm.modules.attention`` one to one (``norm``, ``proj_in``,
``transformer_blocks.N.{attn1,ff,attn2,norm1,norm2,norm3}``, ``proj_out``), so the released
``cheff_diff_t2i.pt`` U-Net weights load without a key map (FORMAT.md section 3b):
GroupNorm(32, eps 1e-6) -> 1x1 conv -> tokens (B, H W, C) -> pre-LN transformer blocks
(self-attention, cross-attention on the text context, GEGLU feed-forward) -> 1x1 conv, plus
the block input. Heads are contiguous chunks of the inner width, scale d^-1/2, no mask.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cheff.models.unet import ContextBlock

NORM_EPS = 1e-6  # the SpatialTransformer's GroupNorm; the blocks' LayerNorms use 1e-5
GROUPS = 32


class CrossAttention(nn.Module):
    """Multi-head attention; ``to_k``/``to_v`` read ``context`` (self-attention without it)."""

    def __init__(
        self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        h = self.heads

        def split(t: Tensor) -> Tensor:  # (B, N, h d) -> (B, h, N, d)
            return t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)  # scale d^-1/2, softmax over keys
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    """``proj`` to twice the width, split (value, gate): value * GELU(gate), exact GELU."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """``net.0`` GEGLU(dim -> mult dim), ``net.1`` dropout, ``net.2`` Linear(mult dim -> dim)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN: x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None) -> None:
        super().__init__()
        # Registration order = the official state-dict order: attn1, ff, attn2, norm1..3.
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads=heads, dim_head=dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(ContextBlock):
    """Image (B, C, H, W) attends to itself and to ``context`` (B, L, context_dim)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(GROUPS, channels, eps=NORM_EPS)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, _, height, width = x.shape
        h = self.proj_in(self.norm(x))
        inner = h.shape[1]
        h = h.reshape(b, inner, height * width).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(b, inner, height, width)
        return x + self.proj_out(h)
