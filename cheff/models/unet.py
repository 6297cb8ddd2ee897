"""The denoising U-Net of Cheff's latent diffusion models (latent diffusion's ``openaimodel``).

Module and parameter names follow the official ``UNetModel`` one to one (``time_embed``,
``input_blocks.N.M``, ``middle_block``, ``output_blocks.N.M``, ``out``), so the released
``model.diffusion_model.*`` weights load without a key map. The quirks that matter for parity
(``../shared/cheff-official/FORMAT.md`` section 3): the time embedding is laid out
[cos, sin] with frequencies exp(-ln(10000) i / half); GroupNorm(32, eps 1e-5) computed in fp32;
downsampling is a stride-2 3x3 convolution with symmetric padding 1 (unlike the autoencoder's);
attention splits its ``qkv`` rows per head as [q_h; k_h; v_h] (the "legacy" order).

Every attention block is made by an :data:`AttentionFactory` and called as
``block(x, context)``: the unconditional model's ``AttentionBlock`` by default, the
report-conditioned model's ``SpatialTransformer`` (:mod:`cheff.models.spatial_transformer`)
when the config has a ``context_dim``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUPS = 32
EPS = 1e-5
MAX_PERIOD = 10000


@dataclass(frozen=True)
class UNetConfig:
    """The U-Net's architecture; field names follow the official constructor where they can.

    ``attention_levels`` are resolution levels (0 = the latent's full resolution, level ``l``
    is downsampled by ``2 ** l``), as in :class:`~cheff.config.AutoencoderConfig`. The official
    ``attention_resolutions`` are those downsampling factors: (8, 4, 2) = levels (3, 2, 1); the
    property :attr:`attention_resolutions` gives them back. Heads: ``num_head_channels`` per
    head (heads = channels // it, the unconditional model's 32) or, with it ``None``, a fixed
    ``num_heads``. The middle block always has attention, whatever the levels say.
    ``context_dim`` set makes every attention block a ``SpatialTransformer`` of
    ``transformer_depth`` blocks cross-attending to a context of that width (the t2i model).
    """

    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 224
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # paper / shipped YAML; released: (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1, 2, 3)  # attention_resolutions [8, 4, 2]
    num_head_channels: int | None = 32
    num_heads: int | None = None  # only when num_head_channels is None
    dropout: float = 0.0
    conv_resample: bool = True  # learned 3x3 up/down convolutions (else nearest / avg-pool)
    context_dim: int | None = None  # report-conditioned: SpatialTransformers (1280 released)
    transformer_depth: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        levels = tuple(sorted({int(a) for a in self.attention_levels}))
        object.__setattr__(self, "attention_levels", levels)
        bad = [a for a in levels if not 0 <= a < len(self.channel_mult)]
        if bad:
            raise ValueError(
                f"attention_levels {bad} outside the {len(self.channel_mult)} resolution levels"
            )
        if self.context_dim is not None and (self.context_dim < 1 or self.transformer_depth < 1):
            raise ValueError("context_dim and transformer_depth must be positive")
        if self.num_res_blocks < 1 or not self.channel_mult:
            raise ValueError("a U-Net needs at least one level and one residual block per level")
        if (self.num_head_channels is None) == (self.num_heads is None):
            raise ValueError("set exactly one of num_head_channels and num_heads")
        for channels in self.level_channels:
            if channels % GROUPS:
                raise ValueError(f"{channels} channels: GroupNorm(32) needs a multiple of 32")
        attended = [self.level_channels[a] for a in levels] + [self.level_channels[-1]]
        for channels in attended:
            self.heads(channels)  # raises when the heads do not divide the channels

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def attention_resolutions(self) -> tuple[int, ...]:
        """The official name: downsampling factors at which attention runs, e.g. (2, 4, 8)."""
        return tuple(2**level for level in self.attention_levels)

    @property
    def downsampling(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads(self, channels: int) -> int:
        """Attention heads of a block with ``channels`` channels (the official rule)."""
        if self.num_head_channels is not None:
            if channels % self.num_head_channels:
                raise ValueError(
                    f"{channels} channels do not split into heads of {self.num_head_channels}"
                )
            return channels // self.num_head_channels
        assert self.num_heads is not None
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels do not split into {self.num_heads} heads")
        return self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown U-Net config keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_official(cls, unet: dict[str, Any]) -> UNetConfig:
        """From the official ``unet_config`` params (``attention_resolutions`` are factors).

        ``image_size``, ``use_checkpoint`` and ``legacy`` (no numerical effect here) are
        dropped; options this U-Net does not have (class labels, scale-shift norm, ...) are
        refused by name. ``use_spatial_transformer`` needs ``context_dim`` and vice versa.
        """
        spatial = bool(unet.get("use_spatial_transformer", False))
        if spatial != (unet.get("context_dim") is not None):
            raise ValueError("use_spatial_transformer and context_dim go together")
        unsupported = {
            "num_classes": None,
            "use_scale_shift_norm": False,
            "resblock_updown": False,
            "use_new_attention_order": False,
            "use_fp16": False,
            "dims": 2,
        }
        odd = [f"{k}={unet[k]!r}" for k, v in unsupported.items() if unet.get(k, v) != v]
        if odd:
            raise ValueError(f"U-Net options not supported here: {', '.join(odd)}")
        mult = tuple(int(m) for m in unet["channel_mult"])
        factors = {int(f) for f in unet.get("attention_resolutions", ())}
        head_channels = int(unet.get("num_head_channels", -1))
        return cls(
            in_channels=int(unet["in_channels"]),
            out_channels=int(unet["out_channels"]),
            model_channels=int(unet["model_channels"]),
            channel_mult=mult,
            num_res_blocks=int(unet["num_res_blocks"]),
            # The official code compares each level's factor with the list, so factors beyond
            # the last level are ignored there too.
            attention_levels=tuple(lv for lv in range(len(mult)) if 2**lv in factors),
            num_head_channels=None if head_channels == -1 else head_channels,
            num_heads=int(unet["num_heads"]) if head_channels == -1 else None,
            dropout=float(unet.get("dropout", 0.0)),
            conv_resample=bool(unet.get("conv_resample", True)),
            context_dim=int(unet["context_dim"]) if spatial else None,
            transformer_depth=int(unet.get("transformer_depth", 1)),
        )


# The architectures in play (FORMAT.md sections 3a and 3b). The released unconditional weights fit
# only (1, 2, 3, 4); the paper's shipped YAML says (1, 2, 4, 4). The lead puts them in presets.
PAPER = UNetConfig()
UNCOND_RELEASED = UNetConfig(channel_mult=(1, 2, 3, 4))
T2I_RELEASED = UNetConfig(num_head_channels=None, num_heads=8, context_dim=1280)


def embedding_frequencies(dim: int, max_period: int = MAX_PERIOD) -> Tensor:
    """f_i = exp(-ln(max_period) i / half) for i < half = dim // 2, in fp32 on the CPU, exactly
    as the official code computes them."""
    half = dim // 2
    return torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
    )


def timestep_embedding(
    t: Tensor, dim: int, max_period: int = MAX_PERIOD, freqs: Tensor | None = None
) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), laid out [cos(t f), sin(t f)] (official order),
    with f from :func:`embedding_frequencies`; an odd ``dim`` gets a zero column. ``t`` may be
    fractional. ``freqs``: those frequencies already on ``t``'s device (the U-Net keeps them
    as a buffer: copying them from the CPU at each call would make a GPU step wait)."""
    if freqs is None:
        freqs = embedding_frequencies(dim, max_period).to(device=t.device)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input and weight dtypes (the official rule).

    ``in_compute_dtype = True`` (a training speed option, off by default): a bf16 or fp16
    input is normalised by the framework's own kernel in that dtype, which keeps its statistics
    in fp32; but the weight and bias are rounded to that dtype first (CUDA's kernel takes them
    in the input's dtype), and so are their gradients. Eager autocast otherwise moves every
    GroupNorm's activations through memory three more times (to fp32, normalised in fp32,
    back), backward too: about a third of the paper SDM step's memory traffic
    (benchmarks/roofline.py). fp32 inputs are unaffected, so parity with the official code
    holds either way. A per-module switch, not saved with the weights: a reloaded model
    normalises by the official rule until it is set again.
    """

    in_compute_dtype = False

    def forward(self, x: Tensor) -> Tensor:
        if self.in_compute_dtype and x.dtype in (torch.bfloat16, torch.float16):
            weight = None if self.weight is None else self.weight.to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            with torch.autocast(x.device.type, enabled=False):  # autocast would upcast it
                return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(GROUPS, channels, eps=EPS)


class TimestepBlock(nn.Module):
    """A block that takes the time embedding: ``forward(x, emb)``."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        raise NotImplementedError


class ContextBlock(nn.Module):
    """An attention block: ``forward(x, context)``; unconditional ones ignore ``context``."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """The official container: hands ``emb`` to ResBlocks and ``context`` to attention."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, ContextBlock):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(TimestepBlock):
    """norm -> SiLU -> conv, + the projected time embedding per channel, norm -> SiLU -> conv.

    ``skip_connection`` is a 1x1 convolution only when the channel count changes.
    """

    def __init__(
        self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


def legacy_attention(qkv: Tensor, heads: int) -> Tensor:
    """The official ``QKVAttentionLegacy`` on (B, 3 C, T) -> (B, C, T), through SDPA.

    Rows are split per head as [q_h; k_h; v_h] (head-major), not [all q; all k; all v].
    softmax((q d^-1/4) . (k d^-1/4)) = softmax(q . k / sqrt(d)), SDPA's default scale; the fused
    kernels keep the softmax statistics in fp32 and never hold the T x T weights in memory.
    """
    batch, width, length = qkv.shape
    d = width // (3 * heads)
    # (B, heads, T, 3d), contiguous: the fused kernels need a unit stride along d.
    per_head = qkv.reshape(batch, heads, 3 * d, length).transpose(2, 3).contiguous()
    q, k, v = per_head.split(d, dim=-1)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d)
    return out.transpose(2, 3).reshape(batch, heads * d, length)


class AttentionBlock(ContextBlock):
    """Multi-head self-attention over all pixels, ``qkv`` and ``proj_out`` as 1x1 Conv1d."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = legacy_attention(self.qkv(self.norm(x)), self.heads)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


AttentionFactory = Callable[[int, UNetConfig], nn.Module]
"""Builds the attention block of a level with ``channels`` channels.

The block is called ``block(x, context)`` when it is a :class:`ContextBlock`, else ``block(x)``.
"""


def self_attention(channels: int, config: UNetConfig) -> nn.Module:
    """The unconditional model's attention: :class:`AttentionBlock`."""
    return AttentionBlock(channels, config.heads(channels))


def spatial_transformer(channels: int, config: UNetConfig) -> nn.Module:
    """The report-conditioned model's attention: a ``SpatialTransformer`` (heads chunk ``ch``)."""
    from cheff.models.spatial_transformer import SpatialTransformer

    heads = config.heads(channels)
    return SpatialTransformer(
        channels, heads, channels // heads, config.transformer_depth, config.context_dim
    )


class Downsample(nn.Module):
    """``op``: a 3x3 convolution, stride 2, padding 1 on every side (or 2x2 average pooling)."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.op: nn.Module = (
            nn.Conv2d(channels, channels, 3, stride=2, padding=1)
            if use_conv
            else nn.AvgPool2d(kernel_size=2, stride=2)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then ``conv`` 3x3 (when ``use_conv``)."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class UNetModel(nn.Module):
    """eps-prediction U-Net: ``forward(x, t, context=None)`` -> eps with x's shape.

    ``x`` is (B, in_channels, H, W) with H and W multiples of ``config.downsampling``; ``t``
    holds B timesteps (integer or float; a scalar is used for the whole batch). ``attention``
    builds every attention block (default :func:`self_attention`, the unconditional model's,
    or :func:`spatial_transformer` when ``config.context_dim`` is set).
    ``gradient_checkpointing = True`` recomputes each block's activations in the backward
    pass: less memory, about a third more compute per training step.
    """

    def __init__(
        self, config: UNetConfig | None = None, attention: AttentionFactory | None = None
    ) -> None:
        super().__init__()
        self.config = config = config or UNetConfig()
        default = self_attention if config.context_dim is None else spatial_transformer
        make_attention = attention or default
        ch, emb_dim = config.model_channels, config.time_embed_dim
        self.time_embed = nn.Sequential(
            nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        # Not in the state dict (the released files have no such entry); moves with the model.
        self.register_buffer("time_frequencies", embedding_frequencies(ch), persistent=False)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))]
        )
        skips = [ch]
        last = len(config.channel_mult) - 1
        for level, out in enumerate(config.level_channels):
            for _ in range(config.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, out, config.dropout)]
                ch = out
                if level in config.attention_levels:
                    layers.append(make_attention(ch, config))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != last:
                self.input_blocks.append(
                    TimestepEmbedSequential(Downsample(ch, config.conv_resample))
                )
                skips.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, config.dropout),
            make_attention(ch, config),
            ResBlock(ch, emb_dim, ch, config.dropout),
        )

        self.output_blocks = nn.ModuleList()
        for level, out in reversed(list(enumerate(config.level_channels))):
            for index in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb_dim, out, config.dropout)]
                ch = out
                if level in config.attention_levels:
                    layers.append(make_attention(ch, config))
                if level and index == config.num_res_blocks:
                    layers.append(Upsample(ch, config.conv_resample))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.Conv2d(ch, config.out_channels, 3, padding=1)
        )
        # Trade compute for memory in training: each block's activations are recomputed in the
        # backward pass (the official ``use_checkpoint``). Off by default; no effect in eval.
        self.gradient_checkpointing = False

    @property
    def norm_in_compute_dtype(self) -> bool:
        """Whether every GroupNorm runs in the autocast dtype (:class:`GroupNorm32`)."""
        return all(m.in_compute_dtype for m in self.modules() if isinstance(m, GroupNorm32))

    @norm_in_compute_dtype.setter
    def norm_in_compute_dtype(self, value: bool) -> None:
        for module in self.modules():
            if isinstance(module, GroupNorm32):
                module.in_compute_dtype = bool(value)

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor | None = None) -> Tensor:
        factor = self.config.downsampling
        if x.ndim != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"expected latents (B, {self.config.in_channels}, H, W) with H and W multiples "
                f"of {factor}, got {tuple(x.shape)}"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        t_emb = timestep_embedding(t, self.config.model_channels, freqs=self.time_frequencies)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        run = _checkpointed if self.gradient_checkpointing and self.training else _direct
        h, skips = x, []
        for block in self.input_blocks:
            h = run(block, h, emb, context)
            skips.append(h)
        h = run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


def _direct(block: nn.Module, *args: Any) -> Tensor:
    return block(*args)


def _checkpointed(block: nn.Module, *args: Any) -> Tensor:
    """Recompute the block's activations in the backward pass instead of keeping them."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(block, *args, use_reentrant=False)
