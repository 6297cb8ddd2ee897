"""The report encoder of Cheff's text-to-image LDM (the official ``BERTEmbedder``).

It is not pretrained BERT: a pre-norm transformer (latent-diffusion's copy of
x-transformers) trained from scratch with the LDM. Parameter names follow the released
``cond_stage_model.*`` entries without that prefix, so the state dict loads without a key
map. Parity quirks (``../shared/cheff-official/FORMAT.md`` section 3b): learned absolute
positions added unscaled, 8 heads x 64 regardless of width, exact GELU, and **no padding
mask** - the pad tokens take part in attention, so the context depends on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PREFIX = "cond_stage_model."
HEADS = 8
HEAD_DIM = 64


@dataclass(frozen=True)
class TextEncoderConfig:
    """Sizes of the encoder; the defaults are the released ``cheff_diff_t2i.pt``."""

    vocab_size: int = 30522
    max_seq_len: int = 150
    n_embed: int = 1280
    n_layer: int = 32
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    ff_mult: int = 4

    @classmethod
    def from_official(cls, cond_stage: Mapping[str, Any]) -> TextEncoderConfig:
        """From the official ``BERTEmbedder`` arguments (``n_embed``, ``n_layer``, ...)."""
        return cls(
            vocab_size=int(cond_stage.get("vocab_size", cls.vocab_size)),
            max_seq_len=int(cond_stage.get("max_seq_len", cls.max_seq_len)),
            n_embed=int(cond_stage["n_embed"]),
            n_layer=int(cond_stage["n_layer"]),
        )


def strip_prefix(state: Mapping[str, Tensor], prefix: str = PREFIX) -> dict[str, Tensor]:
    """The text-encoder entries of a full LDM state dict, without ``cond_stage_model.``."""
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def config_from_state(state: Mapping[str, Tensor]) -> TextEncoderConfig:
    """Read the sizes off the tensor shapes (with or without the ``cond_stage_model.`` prefix).

    The head split is not recoverable from shapes; it is fixed at 8 x 64 as released.
    """
    if any(key.startswith(PREFIX) for key in state):
        state = strip_prefix(state)
    vocab_size, n_embed = state["transformer.token_emb.weight"].shape
    max_seq_len = state["transformer.pos_emb.emb.weight"].shape[0]
    layers = {
        int(key.split(".")[3]) for key in state if key.startswith("transformer.attn_layers.layers.")
    }
    if not layers or len(layers) % 2:
        raise ValueError(f"expected attention/feed-forward pairs, got {len(layers)} layers")
    hidden = state["transformer.attn_layers.layers.1.1.net.0.0.weight"].shape[0]
    inner = state["transformer.attn_layers.layers.0.1.to_q.weight"].shape[0]
    if inner != HEADS * HEAD_DIM:
        raise ValueError(f"attention inner width {inner} != {HEADS} x {HEAD_DIM}")
    if hidden % n_embed:
        raise ValueError(f"feed-forward width {hidden} is not a multiple of {n_embed}")
    return TextEncoderConfig(
        vocab_size=int(vocab_size),
        max_seq_len=int(max_seq_len),
        n_embed=int(n_embed),
        n_layer=len(layers) // 2,
        ff_mult=int(hidden // n_embed),
    )


class Attention(nn.Module):
    """Multi-head self-attention; bias-free q/k/v, heads as contiguous chunks, no mask."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape

        def split(t: Tensor) -> Tensor:  # (B, N, h*d) -> (B, h, N, d)
            return t.reshape(b, n, self.heads, -1).transpose(1, 2)

        # Default SDPA scale is head_dim^-0.5, the official one.
        out = F.scaled_dot_product_attention(
            split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        )
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """Linear -> exact GELU -> Linear; the nesting reproduces the keys ``net.0.0``, ``net.2``."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU()),
            nn.Identity(),  # the official dropout (p = 0) slot, keeps the index of net.2
            nn.Linear(dim * mult, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AbsolutePositionalEmbedding(nn.Module):
    """Learned positions, added without scaling (``pos_emb.emb``)."""

    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, length: int) -> Tensor:
        return self.emb(torch.arange(length, device=self.emb.weight.device))


class Encoder(nn.Module):
    """Alternating pre-norm attention (even index) and feed-forward (odd index) layers."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        dim = config.n_embed
        layers = []
        for _ in range(config.n_layer):
            attn = Attention(dim, config.heads, config.head_dim)
            layers.append(nn.ModuleList([nn.LayerNorm(dim), attn]))
            layers.append(nn.ModuleList([nn.LayerNorm(dim), FeedForward(dim, config.ff_mult)]))
        self.layers = nn.ModuleList(layers)
        self.gradient_checkpointing = False  # see TextEncoder

    def forward(self, x: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training:
            from torch.utils.checkpoint import checkpoint

            for norm, block in self.layers:
                x = x + checkpoint(_pre_norm, norm, block, x, use_reentrant=False)
            return x
        for norm, block in self.layers:
            x = x + block(norm(x))
        return x


def _pre_norm(norm: nn.Module, block: nn.Module, x: Tensor) -> Tensor:
    return block(norm(x))


class TransformerWrapper(nn.Module):
    """Embeddings, encoder and final norm; ``to_logits`` is kept only so the file loads."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.max_seq_len = config.max_seq_len
        self.token_emb = nn.Embedding(config.vocab_size, config.n_embed)
        self.pos_emb = AbsolutePositionalEmbedding(config.n_embed, config.max_seq_len)
        self.attn_layers = Encoder(config)
        self.norm = nn.LayerNorm(config.n_embed)
        self.to_logits = nn.Linear(config.n_embed, config.vocab_size)  # unused by inference

    def forward(self, token_ids: Tensor) -> Tensor:
        length = token_ids.shape[-1]
        if length > self.max_seq_len:
            raise ValueError(f"sequence length {length} > max_seq_len {self.max_seq_len}")
        x = self.token_emb(token_ids) + self.pos_emb(length)
        return self.norm(self.attn_layers(x))


class TextEncoder(nn.Module):
    """``BERTEmbedder``: token ids (B, L) -> context (B, L, n_embed) for cross-attention.

    Also the label model's encoder (:mod:`cheff.conditioning`: 56 label tokens, 14 positions).
    :attr:`gradient_checkpointing` recomputes each layer in the backward pass: the released
    size (582M parameters, 150 positions) otherwise keeps 64 layers of activations per report.
    """

    def __init__(self, config: TextEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or TextEncoderConfig()
        self.transformer = TransformerWrapper(self.config)

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Tensor], config: TextEncoderConfig | None = None
    ) -> TextEncoder:
        """Build and load strictly from a full LDM state dict or a prefix-free one."""
        if any(key.startswith(PREFIX) for key in state):
            state = strip_prefix(state)
        model = cls(config or config_from_state(state))
        model.load_state_dict(dict(state), strict=True)
        return model

    @property
    def gradient_checkpointing(self) -> bool:
        return self.transformer.attn_layers.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.transformer.attn_layers.gradient_checkpointing = bool(value)

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.transformer(token_ids.long())
