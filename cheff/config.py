"""Model configurations and the named presets (``paper``, ``tiny``).

Every paper hyper-parameter lives here, in the ``paper`` preset, with the source it comes from;
``tiny`` is the same architecture shrunk so that tests and the demo run in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class AutoencoderConfig:
    """The KL autoencoder of latent diffusion, in Cheff's configuration.

    Field names are ours; ``from_official`` / ``to_official`` translate the official
    ``ddconfig`` + ``embed_dim``. Attention is given per resolution level (0 = full resolution)
    rather than as pixel sizes, so the config does not depend on the training resolution.
    """

    in_channels: int = 3  # grayscale replicated to RGB, as the released model expects
    out_channels: int = 3
    base_channels: int = 128  # FORMAT.md section 2: ch 128
    channel_mult: tuple[int, ...] = (1, 2, 4)  # downsampling factor 2 ** (len - 1) = 4
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = ()  # attn_resolutions [] in the released config
    z_channels: int = 3
    embed_dim: int = 3  # latent 3 x 64 x 64 for a 256 x 256 input
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(int(a) for a in self.attention_levels))
        bad = [a for a in self.attention_levels if not 0 <= a < len(self.channel_mult)]
        if bad:
            raise ValueError(
                f"attention_levels {bad} outside the {len(self.channel_mult)} resolution levels"
            )
        for channels in (self.base_channels * m for m in self.channel_mult):
            if channels % 32:
                raise ValueError(f"{channels} channels: GroupNorm(32) needs a multiple of 32")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoencoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown autoencoder config keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_official(
        cls, ddconfig: dict[str, Any], embed_dim: int, resolution: int | None = None
    ) -> AutoencoderConfig:
        """From the official ``ddconfig`` dict (``attn_resolutions`` are pixel sizes)."""
        resolution = int(resolution or ddconfig["resolution"])
        levels = tuple(
            level
            for level in range(len(ddconfig["ch_mult"]))
            if resolution // 2**level in set(ddconfig.get("attn_resolutions", ()))
        )
        if not ddconfig.get("double_z", True):
            raise ValueError("double_z False is not a KL autoencoder")
        return cls(
            in_channels=int(ddconfig.get("in_channels", 3)),
            out_channels=int(ddconfig.get("out_ch", 3)),
            base_channels=int(ddconfig["ch"]),
            channel_mult=tuple(ddconfig["ch_mult"]),
            num_res_blocks=int(ddconfig["num_res_blocks"]),
            attention_levels=levels,
            z_channels=int(ddconfig["z_channels"]),
            embed_dim=int(embed_dim),
            dropout=float(ddconfig.get("dropout", 0.0)),
        )


@dataclass(frozen=True)
class Preset:
    """One named set of configurations for the whole cascade (more fields come per model)."""

    name: str
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)


PAPER = Preset(name="paper", autoencoder=AutoencoderConfig())
TINY = Preset(
    name="tiny",
    # Same downsampling factor 4 as the paper, so a 256 px image has the paper's 64 x 64 latent.
    autoencoder=AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1),
)
PRESETS: dict[str, Preset] = {preset.name: preset for preset in (PAPER, TINY)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
