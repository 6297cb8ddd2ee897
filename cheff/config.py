"""Model configurations and the named presets (``paper``, ``tiny``).

Every paper hyper-parameter lives here, in the ``paper`` preset, with the source it comes from;
``tiny`` is the same architecture shrunk so that tests and the demo run in seconds on a CPU.
The latent diffusion training configs are also reachable by their CLI names through
:data:`SDM_PRESETS` (``paper-uncond``, ``paper-report``, ``paper-labels`` and their ``tiny``
counterparts).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
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
class DataConfig:
    """Which MaCheX images a run trains on, streamed in a seeded, resumable order."""

    data: str = ""  # the built MaCheX folder (machex build --out)
    sources: tuple[str, ...] = ()  # () = every built source
    where: str | None = None  # a pandas query over the manifests, as MaCheX(where=...)
    composition: str | None = None  # e.g. "paper-2023"
    holdout: str | None = None  # the held-out set to exclude (evaluation's test set)
    image_size: int = 256
    shuffle_buffer: int = 1000
    num_workers: int = 4
    # A latents folder's MaCheX (its held-out sets, reports and labels) where it is now; None:
    # where latents.json says it was encoded from.
    machex: str | None = None


#: ``torch.compile`` modes for ``train.compile_mode``: ``max-autotune`` tunes convolution and
#: matrix kernels (long compiles), ``reduce-overhead`` adds CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: How the optimisers run (``cheff.train.optimizers``): ``auto`` is fused kernels on CUDA and
#: torch's own choice elsewhere.
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "loop")


@dataclass(frozen=True)
class TrainConfig:
    """The loop's settings, the same for every model. ``lr`` is the effective learning rate:
    never scaled by batch size or device count."""

    batch_size: int = 64  # per device
    lr: float = 4.5e-6
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: float | None = None  # over the selection; max_steps wins when both are set
    max_steps: int | None = None
    grad_accum: int = 1
    grad_clip: float | None = None  # max global norm per optimizer; None: no clipping
    ema_decay: float | None = None  # None: no EMA
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA), "bf16", "fp32"
    device: str = "auto"  # "auto": cuda, then mps, then cpu
    seed: int = 0
    checkpoint_every: int = 5000
    keep_last: int = 3
    log_every: int = 50
    image_every: int = 1000
    grad_checkpointing: bool = False  # recompute activations in backward: memory for compute
    channels_last: bool = False  # NHWC weights and images: faster convolutions on GPUs
    compile: bool = False  # torch.compile the trained modules (minutes to compile, then faster)
    compile_mode: str = "default"  # torch.compile's mode (COMPILE_MODES)
    # with compile: Inductor lays the convolutions and the kernels around them out channels-last
    # (its force_layout_optimization). Its own rule refuses any graph with a convolution of at
    # least twice as many input as output channels, as in every U-Net decoder; cuDNN then
    # transposes NCHW <-> NHWC around each convolution: 15 % of the compiled paper SDM step's
    # GPU time on an H100 (docs/benchmarks.md)
    compile_channels_last: bool = False
    # CUDA: let cuDNN time its convolution algorithms for each shape on first use (the shapes
    # are fixed in training): +7 % images/s for the compiled paper SDM on an H100
    # (docs/benchmarks.md); false for run-to-run identical kernel choices
    cudnn_benchmark: bool = True
    # sdm only: the U-Net's GroupNorms in the autocast dtype (fp32 statistics; weight, bias and
    # their gradients rounded to bf16) instead of the official fp32 round trip; less memory
    # traffic in bf16 (cheff.models.unet.GroupNorm32)
    norm_in_compute_dtype: bool = False
    # Adam's kernels (OPTIMIZER_IMPLS): "auto" runs the fused one on CUDA (one pass over the
    # weights, gradients and moments) and torch's default elsewhere; the others force one
    optimizer_impl: str = "auto"
    # On several ranks, every how many steps they agree on whether a stop signal came
    # (cheff.train.stopping; one small collective each time); one rank alone checks every step
    stop_check_every: int = 10

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision {self.precision!r}: choose auto, bf16 or fp32")
        if self.optimizer_impl not in OPTIMIZER_IMPLS:
            choices = ", ".join(OPTIMIZER_IMPLS)
            raise ValueError(f"optimizer_impl {self.optimizer_impl!r}: choose one of {choices}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode {self.compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}"
            )
        if self.compile_channels_last and not self.compile:
            raise ValueError("compile_channels_last sets torch.compile's layout: add compile=true")
        counts = ("batch_size", "grad_accum", "checkpoint_every", "keep_last", "log_every")
        for name in (*counts, "image_every", "stop_check_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas: two numbers in [0, 1) (Adam's), got {self.betas}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")


@dataclass(frozen=True)
class AELossConfig:
    """The autoencoder's loss (latent diffusion's ``LPIPSWithDiscriminator``, the official
    Cheff AE config): L1 + LPIPS + KL + a hinge-loss patch discriminator."""

    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    disc_start: int = 5001  # the discriminator's loss is on from this step
    disc_weight: float = 0.5  # times the adaptive weight ||grad nll|| / ||grad g||
    disc_factor: float = 1.0
    disc_layers: int = 3
    disc_lr: float | None = None  # None: the AE's learning rate
    logvar_init: float = 0.0
    perceptual_vgg16: str | None = None  # torchvision's vgg16 ImageNet weight file
    perceptual_heads: str | None = None  # LPIPS v0.1 linear layers (vgg.pth)
    random_perceptual: bool = False  # allow random VGG features (tests, tiny runs only)


@dataclass(frozen=True)
class AETrainConfig:
    """``cheff train ae``: the model, its loss, the loop and the data."""

    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AELossConfig = field(default_factory=AELossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        _sdm_only(self.train, "the autoencoder")
        if self.train.grad_checkpointing:
            raise ValueError(
                "train.grad_checkpointing: the autoencoder has no checkpointed blocks (the "
                "official one trained without); it is a U-Net option (sdm, sr)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sdm_only(train: TrainConfig, model: str) -> None:
    if train.norm_in_compute_dtype:
        raise ValueError(
            f"train.norm_in_compute_dtype is an sdm option (the latent U-Net's GroupNorm32); "
            f"{model} keeps its normalisation as autocast sets it"
        )


# Imported here, not at the top: ``cheff.models`` imports this module for AutoencoderConfig,
# which is defined above by now, so either import order works. get_type_hints (and with it
# apply_overrides) needs the name in this module's namespace.
from cheff.models.sr_unet import SRUNetConfig  # noqa: E402
from cheff.models.text_encoder import TextEncoderConfig  # noqa: E402
from cheff.models.unet import PAPER as _UNET_PAPER  # noqa: E402
from cheff.models.unet import UNetConfig  # noqa: E402


@dataclass(frozen=True)
class ScheduleConfig:
    """The noise schedule of both Cheff LDMs (FORMAT.md 3c): T steps, "linear" in sqrt(beta)."""

    timesteps: int = 1000
    linear_start: float = 0.0015
    linear_end: float = 0.0295


@dataclass(frozen=True)
class ConditionConfig:
    """What a latent diffusion model is conditioned on (``cheff.conditioning``).

    ``kind`` None trains the unconditional model; ``"report"`` a report-to-X-ray model on the
    images that have a report (``report_text``: the reports-manifest column, default
    ``text_v1``, what the original MaCheX fed the released model; ``vocab``: the BERT-uncased
    ``vocab.txt``); ``"labels"`` a model conditioned on the 14 unified findings, on the
    images with at least one finding stated. ``encoder`` is the trainable transformer that
    turns the tokens into the U-Net's context (its width is the U-Net's ``context_dim``).
    ``drop``: the probability a training condition is replaced by the null condition
    (classifier-free guidance; 0 = the paper).
    """

    kind: str | None = None
    encoder: TextEncoderConfig | None = None
    report_text: str = "text_v1"
    # Reports in these languages (ISO 639-1) condition a report model; PadChest's are "es"
    # (stemmed Spanish): kept in the manifests, left out of an English model unless named
    report_languages: tuple[str, ...] = ("en",)
    vocab: str | None = None
    drop: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in (None, "report", "labels"):
            raise ValueError(f"condition.kind {self.kind!r}: choose none, report or labels")
        if self.kind is not None and self.encoder is None:
            raise ValueError(f"a {self.kind} model needs condition.encoder")
        if not 0.0 <= self.drop < 1.0:
            raise ValueError(f"condition.drop (--cond-drop) must be in [0, 1), got {self.drop}")
        from machex.records import REPORT_TEXTS

        if self.report_text not in REPORT_TEXTS:
            raise ValueError(
                f"condition.report_text {self.report_text!r}: choose from {list(REPORT_TEXTS)}"
            )
        languages = tuple(sorted({str(x).strip().lower() for x in self.report_languages}))
        if not all(languages):
            raise ValueError("condition.report_languages: name at least one language, e.g. en")
        object.__setattr__(self, "report_languages", languages)


@dataclass(frozen=True)
class SDMTrainConfig:
    """``cheff train sdm``: the unconditional latent diffusion model (the cascade's first stage).

    ``data.data`` is a built MaCheX (images, encoded by the frozen autoencoder every step) or a
    ``cheff encode`` latents folder (told apart by its ``latents.json``). ``ae`` is the
    autoencoder checkpoint; with latents it defaults to the one they were encoded with.
    ``scale_factor`` multiplies the AE's latents before diffusion: 1.0 for the Cheff
    unconditional model (FORMAT.md 3a); ``latents.json`` also records ``1 / std`` (latent
    diffusion's ``scale_by_std``) for who wants it. Grids: ``grid_samples`` latents drawn from
    ``grid_seed`` (the same ones at every grid) and DDIM with ``grid_steps`` steps, eta 0.
    """

    model: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    scale_factor: float = 1.0
    ae: str | None = None
    grid_samples: int = 8
    grid_steps: int = 10
    grid_seed: int = 0

    def __post_init__(self) -> None:
        if self.scale_factor <= 0:
            raise ValueError(f"scale_factor must be positive, got {self.scale_factor}")
        if self.model.in_channels != self.model.out_channels:
            raise ValueError("an eps-predicting U-Net needs in_channels == out_channels")
        encoder = self.condition.encoder if self.condition.kind else None
        width = None if encoder is None else encoder.n_embed
        if self.model.context_dim != width:
            raise ValueError(
                f"the U-Net's context_dim {self.model.context_dim} must be the condition "
                f"encoder's width {width} (None for the unconditional model)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SRScheduleConfig:
    """The SR model's cosine schedule (FORMAT.md 4): T steps, offset s."""

    timesteps: int = 2000
    s: float = 0.008


@dataclass(frozen=True)
class SRTrainConfig:
    """``cheff train sr``: the super-resolution model (the cascade's last stage).

    Pairs come from a built MaCheX: the target at ``data.image_size`` (1024), the input made
    from it by ``machex.resize`` (antialiased bicubic) to ``low_size`` (256). With ``ae``
    (fine-tuning, usually with ``finetune_from``) the input is the autoencoder's
    reconstruction of it, D(E(x_LR)) through the official glue, so SR learns to undo the
    autoencoder's blur as the cascade needs. ``loss``: ``l1`` or ``l2`` on the predicted
    noise. Grids: DDIM with ``grid_steps`` on the first ``grid_samples`` inputs of a batch.
    """

    model: SRUNetConfig = field(default_factory=SRUNetConfig)
    schedule: SRScheduleConfig = field(default_factory=SRScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(image_size=1024))
    low_size: int = 256
    loss: str = "l1"
    ae: str | None = None
    finetune_from: str | None = None
    grid_samples: int = 4
    grid_steps: int = 20
    grid_seed: int = 0

    def __post_init__(self) -> None:
        _sdm_only(self.train, "the SR U-Net")
        if self.loss not in ("l1", "l2"):
            raise ValueError(f"loss {self.loss!r}: choose l1 or l2")
        if self.low_size >= self.data.image_size:
            raise ValueError(
                f"low_size {self.low_size} must be below the target size {self.data.image_size}"
            )
        if self.data.image_size % self.model.downsampling:
            raise ValueError(
                f"image_size {self.data.image_size} is not a multiple of the SR U-Net's "
                f"factor {self.model.downsampling}"
            )
        if self.model.channels != 2 or self.model.out_dim != 1:
            raise ValueError("the SR U-Net takes 2 channels (target, condition) and predicts 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    """One named set of configurations for the whole cascade (more fields come per model)."""

    name: str
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    train_ae: AETrainConfig = field(default_factory=AETrainConfig)
    train_sdm: SDMTrainConfig = field(default_factory=SDMTrainConfig)
    train_sr: SRTrainConfig = field(default_factory=SRTrainConfig)


#: The paper's MaCheX (651,471 images): the (source, split) pairs of
#: ``manifests/compositions/paper-2023.csv``. The paper presets train on it; without it a run
#: would also take the NIH, CheXpert and VinDr test and validation splits, and any other
#: source built into the folder.
PAPER_COMPOSITION = "paper-2023"

PAPER = Preset(
    name="paper",
    autoencoder=AutoencoderConfig(),
    # The official Cheff AE config: Adam betas (0.5, 0.9), lr 4.5e-6, batch 64, 3 epochs.
    train_ae=AETrainConfig(
        train=TrainConfig(batch_size=64, lr=4.5e-6, betas=(0.5, 0.9), epochs=3.0),
        data=DataConfig(composition=PAPER_COMPOSITION),
    ),
    # The paper's unconditional SDM ("paper-uncond"): all of MaCheX at 256 px (3 x 64 x 64
    # latents; selected when encoding: `cheff encode --composition paper-2023`), batch 256,
    # 500k steps, Adam (default betas) at 5e-5 (the effective rate, never scaled), an EMA of
    # the U-Net with latent diffusion's decay 0.9999, scale factor 1.0.
    # U-Net channel_mult (1, 2, 4, 4): what the paper and the official YAML say. The released
    # weights were trained with (1, 2, 3, 4) (cheff.models.unet.UNCOND_RELEASED, which
    # load_ldm reads off the shapes); set model.channel_mult=1,2,3,4 to train that one.
    train_sdm=SDMTrainConfig(
        model=_UNET_PAPER,
        train=TrainConfig(
            batch_size=256,
            lr=5e-5,
            betas=(0.9, 0.999),
            max_steps=500_000,
            ema_decay=0.9999,
            checkpoint_every=5000,
            image_every=5000,
        ),
        data=DataConfig(image_size=256, composition=PAPER_COMPOSITION),
        scale_factor=1.0,
        grid_samples=16,
        grid_steps=50,
    ),
    # The paper's SR base model: 256 -> 1024 pairs from MaCheX, 1M steps, batch 32, Adam at
    # 5e-5, the released architecture. Fine-tuning (`--finetune-from --ae`): 500k steps at
    # 2e-5 on D(E(x_LR)) inputs (SR_FINETUNE below). No EMA: the released files hold one U-Net.
    train_sr=SRTrainConfig(
        train=TrainConfig(
            batch_size=32,
            lr=5e-5,
            betas=(0.9, 0.999),
            max_steps=1_000_000,
            checkpoint_every=5000,
            image_every=5000,
        ),
        data=DataConfig(image_size=1024, composition=PAPER_COMPOSITION),
    ),
)
# What every tiny run shares: a CPU in fp32, Adam's usual betas, checkpoints and grids every
# 100 steps, metrics every 10.
_TINY_LOOP = TrainConfig(
    betas=(0.9, 0.999),
    precision="fp32",
    device="cpu",
    checkpoint_every=100,
    log_every=10,
    image_every=100,
)
_TINY_AE = AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1)
TINY = Preset(
    name="tiny",
    # Same downsampling factor 4 as the paper, so a 256 px image has the paper's 64 x 64 latent.
    autoencoder=_TINY_AE,
    train_ae=AETrainConfig(
        model=_TINY_AE,
        # No LPIPS by default: VGG16 costs seconds per step on a CPU (with
        # loss.perceptual_weight=1 a tiny run uses random VGG features and says so in its log).
        # The discriminator starts after the 300 steps, and Adam's usual betas: in 300 steps
        # on 32 images at 32 px this reaches about 32 dB PSNR, (0.5, 0.9) about 29.
        loss=AELossConfig(perceptual_weight=0.0, disc_start=1000, random_perceptual=True),
        train=dataclasses.replace(_TINY_LOOP, batch_size=8, lr=2e-3, max_steps=300),
        data=DataConfig(image_size=32, num_workers=0, shuffle_buffer=32),
    ),
    # The paper's U-Net shrunk: 2 levels (latent 8 x 8 -> 4 x 4), one block each, attention at
    # level 1 and in the middle, on the tiny AE's 32 px images (3 x 8 x 8 latents). A high
    # learning rate and a short EMA so that 200 CPU steps show a falling loss and a usable EMA.
    train_sdm=SDMTrainConfig(
        model=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(1,),
            num_head_channels=32,
        ),
        train=dataclasses.replace(_TINY_LOOP, batch_size=8, lr=1e-3, max_steps=200, ema_decay=0.99),
        data=DataConfig(image_size=32, num_workers=0, shuffle_buffer=32),
        grid_samples=8,
        grid_steps=10,
    ),
    # The SR structure shrunk (5 levels, linear attention on the two lowest down levels and
    # the highest up level) at 16 -> 64 px, the paper's factor 4: a CPU runs 200 steps in
    # about 40 s (most of it decoding the 1024 px shards).
    train_sr=SRTrainConfig(
        model=SRUNetConfig(dim=8, dim_mults=(1, 1, 2, 2, 2), attention_layers=3),
        train=dataclasses.replace(_TINY_LOOP, batch_size=4, lr=1e-3, max_steps=200),
        data=DataConfig(image_size=64, num_workers=0, shuffle_buffer=32),
        low_size=16,
        grid_samples=2,
        grid_steps=5,
    ),
)
_TINY_UNET_CROSS = dataclasses.replace(TINY.train_sdm.model, context_dim=64)
_TINY_ENCODER = TextEncoderConfig(n_embed=64, n_layer=2, heads=2, head_dim=32, ff_mult=2)
# The paper's report-to-X-ray model ("paper-report"): the unconditional procedure (batch 256,
# Adam at 5e-5, EMA 0.9999) for 750k steps with the released t2i architecture: the U-Net of
# channel_mult (1, 2, 4, 4) with a SpatialTransformer (8 heads, depth 1, context 1280) at
# levels 1-3 and in the middle, the trainable 32-layer, 1280-wide encoder over 150 BERT
# WordPiece tokens, scale factor 0.18215; on the MIMIC images with a report (text_v1). The
# paper held out 10,000 images: make them with `machex holdout --size 10000 --by image`.
PAPER_REPORT = dataclasses.replace(
    PAPER.train_sdm,
    model=UNetConfig(num_head_channels=None, num_heads=8, context_dim=1280),
    condition=ConditionConfig(kind="report", encoder=TextEncoderConfig()),
    train=dataclasses.replace(PAPER.train_sdm.train, max_steps=750_000),
    data=DataConfig(image_size=256, sources=("mimic",), composition=PAPER_COMPOSITION),
    scale_factor=0.18215,
)
# Beyond the paper: the same U-Net conditioned on the 14 findings of every labelled source,
# with a 4-layer encoder over the 14 label tokens and 10 % null conditions for guidance. The
# encoder depth, the drop rate and the length (the unconditional model's 500k) are our choice.
PAPER_LABELS = dataclasses.replace(
    PAPER_REPORT,
    condition=ConditionConfig(
        kind="labels",
        encoder=TextEncoderConfig(vocab_size=56, max_seq_len=14, n_layer=4),
        drop=0.1,
    ),
    train=PAPER.train_sdm.train,
    data=DataConfig(image_size=256, composition=PAPER_COMPOSITION),
)
# The tiny SDM with cross-attention (context 64) and a 2-layer, 64-wide encoder; 64 report
# tokens (the CPU's share of the released 150). Scale factor 1.0, as the tiny SDM.
TINY_REPORT = dataclasses.replace(
    TINY.train_sdm,
    model=_TINY_UNET_CROSS,
    condition=ConditionConfig(
        kind="report", encoder=dataclasses.replace(_TINY_ENCODER, max_seq_len=64)
    ),
)
TINY_LABELS = dataclasses.replace(
    TINY.train_sdm,
    model=_TINY_UNET_CROSS,
    condition=ConditionConfig(
        kind="labels",
        encoder=dataclasses.replace(_TINY_ENCODER, vocab_size=56, max_seq_len=14),
        drop=0.1,
    ),
)
PRESETS: dict[str, Preset] = {preset.name: preset for preset in (PAPER, TINY)}
#: What ``--finetune-from`` changes in a preset's SR config (the paper: 500k steps at 2e-5).
SR_FINETUNE = {"paper": {"train.max_steps": 500_000, "train.lr": 2e-5}, "tiny": {}}
# ``cheff train sdm --preset NAME``: the paper's unconditional model goes by ``paper-uncond``
# (``paper`` is accepted for it too), the report-conditioned one by ``paper-report``.
SDM_PRESETS: dict[str, SDMTrainConfig] = {
    "paper-uncond": PAPER.train_sdm,
    "paper-report": PAPER_REPORT,
    "paper-labels": PAPER_LABELS,
    "tiny": TINY.train_sdm,
    "tiny-report": TINY_REPORT,
    "tiny-labels": TINY_LABELS,
}
_SDM_ALIASES = {"paper": "paper-uncond"}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None


def get_sdm_preset(name: str) -> SDMTrainConfig:
    """The SDM training config of ``name`` (:data:`SDM_PRESETS`; ``paper`` = ``paper-uncond``)."""
    try:
        return SDM_PRESETS[_SDM_ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(
            f"unknown SDM preset {name!r}; choose from {sorted(SDM_PRESETS)}"
        ) from None


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """``config`` with dotted fields replaced, e.g. ``{"train.lr": "1e-4"}``.

    Values may be strings (from a command line): each is converted to the field's type. An
    unknown field is a ``ValueError`` that lists the valid ones. All overrides are applied
    before any config checks itself, so settings that must agree (``model.context_dim`` and
    ``condition.encoder.n_embed``, ``model.channel_mult`` and ``model.attention_levels``) can
    be changed together, in any order.
    """
    items = [(dotted.split("."), value, dotted) for dotted, value in overrides.items()]
    return _apply(config, items)


def _apply(config: Any, items: list[tuple[list[str], Any, str]]) -> Any:
    """``config`` with ``items`` (path, value, dotted name) applied in one ``replace`` per
    dataclass: the nested ones first, then this one (its ``__post_init__`` checks run once,
    on the final values)."""
    if not dataclasses.is_dataclass(config):  # e.g. condition.* on an unconditional preset
        dotted = items[0][2]
        parent = dotted[: -len(".".join(items[0][0])) - 1]
        raise ValueError(
            f"unknown setting {dotted!r}: {parent} is {config!r} here, not settings with fields"
        )
    hints = typing.get_type_hints(type(config))
    changes: dict[str, Any] = {}
    nested: dict[str, list[tuple[list[str], Any, str]]] = {}
    for path, value, dotted in items:
        name = path[0]
        if name not in hints:
            valid = ", ".join(f.name for f in fields(config))
            raise ValueError(f"unknown setting {dotted!r}: {name!r} is not one of {valid}")
        if len(path) > 1:
            nested.setdefault(name, []).append((path[1:], value, dotted))
        else:
            changes[name] = _convert(value, hints[name], dotted)
    for name, inner in nested.items():
        changes[name] = _apply(changes.get(name, getattr(config, name)), inner)
    return dataclasses.replace(config, **changes) if changes else config


def _convert(value: Any, kind: Any, dotted: str) -> Any:
    if not isinstance(value, str):
        return value
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null", "") and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    try:
        if origin is tuple:
            items = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
            element = args[0] if args else str
            return tuple(_convert(v.strip(), element, dotted) for v in items)
        if kind is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        return kind(value)
    except (TypeError, ValueError):
        what = "a tuple" if origin is tuple else getattr(kind, "__name__", str(kind))
        raise ValueError(f"{dotted}={value!r}: expected {what}") from None
