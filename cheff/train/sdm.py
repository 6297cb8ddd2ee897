"""``cheff train sdm``: a latent diffusion model (unconditional, report- or label-conditioned)
as a :class:`~cheff.train.loop.Task`.

As latent diffusion trains it (``LatentDiffusion.p_losses`` with the Cheff config): z0 is a
posterior **sample** of the frozen autoencoder times ``scale_factor``, t is uniform in [0, T),
x_t = q_sample(z0, t, eps), and the loss is the MSE between eps and the U-Net's prediction
(``l_simple``; the official logvar is fixed at 0 and the ELBO weight is 0, so nothing else
enters). z0 comes from images encoded on the fly or from a ``cheff encode`` latents folder
(moments stored, the sample still drawn here). Every draw uses the loop's generator, so a
resumed run repeats the uninterrupted one exactly.

A conditioned model (``config.condition``) also trains its encoder, as the official t2i
config does (``cond_stage_trainable``): each image's report or labels (looked up by key, see
:mod:`cheff.train.conditions`) become token ids, a fraction ``condition.drop`` of them the
null condition (classifier-free guidance), and the encoder's output is the U-Net's context.

One optimiser, ``unet`` (Adam), over the U-Net and the encoder. The U-Net is the task's
first module, so the loop's EMA averages it (the official EMA covers the U-Net only; the
encoder is used live). Each checkpoint holds ``ldm.safetensors`` (the live U-Net with the AE
and encoder: what the run resumes from and what the official samplers would use) and, with an
EMA, ``ldm-ema.safetensors`` (the averaged U-Net with the same AE and encoder); both load with
``load_ldm``. A report model's files carry the tokenizer's vocabulary, so sampling needs no
``--vocab``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cheff.checkpoints import check_state, read_checkpoint, save_ldm
from cheff.conditioning import Conditioner, drop_conditions
from cheff.config import AutoencoderConfig, SDMTrainConfig
from cheff.diffusion import SAMPLERS, NoiseSchedule, noise_with, noising_scales
from cheff.models.autoencoder import AutoencoderKL, DiagonalGaussian
from cheff.models.ldm import LatentDiffusion
from cheff.models.text_encoder import TextEncoder
from cheff.models.unet import AttentionBlock, ResBlock, UNetModel
from cheff.train.conditions import ConditionTable, load_conditions
from cheff.train.distributed import BatchDraws, in_process_group
from cheff.train.loop import EMA, RunInfo, Trainer, TrainingError

log = logging.getLogger(__name__)

LDM_FILE = "ldm.safetensors"
EMA_FILE = "ldm-ema.safetensors"
REFERENCES = 8  # training images shown above the samples in every grid


def zero_init(unet: UNetModel) -> UNetModel:
    """Zero the layers the official ``openaimodel`` wraps in ``zero_module``: each ResBlock's
    last convolution, each attention block's (or SpatialTransformer's) ``proj_out`` and the
    output convolution. Every block then starts as the identity and the first prediction is
    0 (loss 1 at step 0)."""
    from cheff.models.spatial_transformer import SpatialTransformer

    for module in unet.modules():
        if isinstance(module, ResBlock):
            layer: nn.Module = module.out_layers[-1]
        elif isinstance(module, (AttentionBlock, SpatialTransformer)):
            layer = module.proj_out
        else:
            continue
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    nn.init.zeros_(unet.out[-1].weight)
    nn.init.zeros_(unet.out[-1].bias)
    return unet


class SDMTask:
    """The U-Net's noise-prediction loss over AE latents; the AE is frozen (eval, no grad)."""

    losses = ("unet",)

    def __init__(
        self,
        config: SDMTrainConfig,
        autoencoder: AutoencoderKL,
        *,
        latent_side: int,
        conditions: ConditionTable | None = None,
        conditioner: Conditioner | None = None,
    ) -> None:
        self.config = config
        self.unet = zero_init(UNetModel(config.model))
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.conditions, self.conditioner = conditions, conditioner
        self.text_encoder: TextEncoder | None = None
        if config.condition.kind is not None:
            if conditions is None or conditioner is None:
                raise TrainingError(f"a {config.condition.kind} model needs its conditions")
            assert config.condition.encoder is not None  # checked by the config
            encoder_config = dataclasses.replace(
                config.condition.encoder, vocab_size=conditioner.vocab_size
            )
            self.text_encoder = TextEncoder(encoder_config)
            # Kept for the released layout; no loss reaches it (DDP would call it unused).
            self.text_encoder.transformer.to_logits.requires_grad_(False)
            self.text_encoder.gradient_checkpointing = config.train.grad_checkpointing
            self._null_ids = conditioner.null_ids(1)
        self.unet.gradient_checkpointing = config.train.grad_checkpointing
        self.unet.norm_in_compute_dtype = config.train.norm_in_compute_dtype
        s = config.schedule
        self.schedule = NoiseSchedule.ldm(s.timesteps, s.linear_start, s.linear_end)
        self.model = self._ldm(self.unet)  # saved with the schedule: sampling uses it
        self.latent_shape = (config.model.in_channels, latent_side, latent_side)
        try:  # fail now, not at the first grid hours into a run
            self.schedule.ddim_timesteps(config.grid_steps)
        except ValueError as error:
            raise TrainingError(f"grid_steps {config.grid_steps}: {error}") from None
        train = config.train
        trained = [p for m in self._trained() for p in m.parameters() if p.requires_grad]
        self._optimizers = {"unet": torch.optim.Adam(trained, lr=train.lr, betas=train.betas)}
        self._scales = noising_scales(self.schedule.alphas_cumprod).float()  # moved by loss()
        # Set by train_sdm to the trainer's EMA (the loop creates it when fit starts).
        self.ema_of: Callable[[], EMA | None] = lambda: None
        # the held-out set left out, for the saved files' headers (train.data.holdout_record)
        self.holdout_record: dict[str, str] = {}
        self._ema_unet: UNetModel | None = None

    def _ldm(self, unet: UNetModel) -> LatentDiffusion:
        return LatentDiffusion(
            unet,
            self.autoencoder,
            scale_factor=self.config.scale_factor,
            conditioning_key=None if self.text_encoder is None else "crossattn",
            text_encoder=self.text_encoder,
            condition=self.config.condition.kind,
            schedule=self.schedule,
        )

    def _trained(self) -> list[nn.Module]:
        return [self.unet] + ([] if self.text_encoder is None else [self.text_encoder])

    def modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"unet": self.unet}  # the U-Net first: EMA'd
        if self.text_encoder is not None:
            modules["text_encoder"] = self.text_encoder
        return modules | {"autoencoder": self.autoencoder}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def active(self, name: str, step: int) -> bool:
        return True

    # -- the loss ----------------------------------------------------------------------------

    def context(self, keys: list[str], generator: torch.Generator | None = None) -> Tensor | None:
        """The encoder's context for the images ``keys`` (None for the unconditional model);
        with ``generator``, each condition is dropped to the null one with ``condition.drop``."""
        if self.text_encoder is None:
            return None
        assert self.conditions is not None and self.conditioner is not None
        ids = self.conditioner.ids(self.conditions.lookup(list(keys)))
        device = next(self.text_encoder.parameters()).device
        # Tokens go to the device before the drop, which is drawn there: a copy back to the
        # CPU would make each step wait for the GPU. Pinned, the copy waits for nothing.
        ids = (ids.pin_memory() if device.type == "cuda" else ids).to(device, non_blocking=True)
        if generator is not None:
            if self._null_ids.device != device:
                self._null_ids = self._null_ids.to(device)
            draws = BatchDraws(generator, self.config.train.batch_size, device)
            ids = drop_conditions(ids, self._null_ids, self.config.condition.drop, draws.uniform)
        return self.text_encoder(ids)

    def latents(self, batch: dict[str, Any], generator: torch.Generator) -> Tensor:
        """z0 = scale_factor * a posterior sample, from stored moments or encoded images."""
        if "moments" in batch:
            posterior = DiagonalGaussian.from_moments(batch["moments"].float())
        else:
            image = batch["image"]
            x = image.expand(-1, self.autoencoder.config.in_channels, -1, -1)
            # fp32 as `cheff encode`: under the loop's bf16 autocast the frozen encoder's mean
            # moved by ~1 % and a small posterior std was lost to bf16 rounding.
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                posterior = self.autoencoder.encode(x.float())
        with torch.no_grad():
            draws = BatchDraws(generator, self.config.train.batch_size, posterior.mean.device)
            noise = draws.normal(tuple(posterior.mean.shape))
            return posterior.sample(noise=noise).float() * self.config.scale_factor

    def loss(
        self, name: str, batch: dict[str, Any], step: int, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        z0 = self.latents(batch, generator)
        if z0.shape[1:] != self.latent_shape:
            raise TrainingError(
                f"latents of shape {tuple(z0.shape[1:])}, but the U-Net is set up for "
                f"{self.latent_shape}"
            )
        count, device = z0.shape[0], z0.device
        draws = BatchDraws(generator, self.config.train.batch_size, device)
        t = draws.integers(self.schedule.num_timesteps, count)
        noise = draws.normal(tuple(z0.shape))
        if self._scales.device != device:
            self._scales = self._scales.to(device)
        x_t = noise_with(self._scales, z0, t.to(device), noise)
        context = None if self.text_encoder is None else self.context(batch["key"], generator)
        eps = self.unet(x_t, t.to(device), context)
        loss = F.mse_loss(eps.float(), noise)
        return loss, {"unet/total": loss.detach()}

    # -- grids -------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, count: int, steps: int, seed: int, keys: list[str] | None = None) -> Tensor:
        """``count`` latents by DDIM (eta 0, ``steps`` steps) from a fixed seed: the same
        starting noise at every grid, so grids of one run are comparable. Live weights. A
        conditioned model samples under the conditions of ``keys`` (cycled to ``count``)."""
        device = next(self.unet.parameters()).device
        generator = torch.Generator().manual_seed(seed)
        x_T = torch.randn((count, *self.latent_shape), generator=generator).to(device)
        modules = self._trained()
        was_training = [m.training for m in modules]
        for module in modules:
            module.eval()
        try:
            context = None
            if self.text_encoder is not None:
                if not keys:
                    raise ValueError("a conditioned model samples under conditions: give keys")
                context = self.context([keys[i % len(keys)] for i in range(count)])
            return SAMPLERS["ddim"](
                lambda x, t: self.model.eps(x, t, context), x_T, self.schedule, steps
            )
        finally:
            for module, mode in zip(modules, was_training):
                module.train(mode)

    def images(self, batch: dict[str, Any]) -> Tensor:
        """Up to 8 training images (AE round trips of the posterior mean) above the samples,
        all decoded through the autoencoder."""
        if "moments" in batch:
            mean = DiagonalGaussian.from_moments(batch["moments"][:REFERENCES].float()).mean
        else:
            x = batch["image"][:REFERENCES]
            channels = self.autoencoder.config.in_channels
            mean = self.autoencoder.encode(x.expand(-1, channels, -1, -1)).mean
        references = self.autoencoder.decode(mean)
        keys = list(batch["key"][:REFERENCES])  # conditioned grids: the references' conditions
        z = self.sample(
            self.config.grid_samples, self.config.grid_steps, self.config.grid_seed, keys
        )
        return torch.cat([references, self.model.decode_latents(z)])

    # -- weights -----------------------------------------------------------------------------

    def save_weights(self, folder: Path, step: int) -> None:
        # The image side it was trained at: `cheff sample` samples at it by default.
        side = self.latent_shape[-1] * self.autoencoder.config.downsampling
        extra = {"step": str(step), "image_size": str(side), **self.holdout_record}
        if self.conditioner is not None and self.conditioner.kind == "report":
            extra["vocab"] = self.conditioner.tokenizer.vocab_text()
        save_ldm(self.model, folder / LDM_FILE, weights="live", **extra)
        ema = self.ema_of()
        if ema is not None:
            if self._ema_unet is None:
                self._ema_unet = UNetModel(self.config.model)
            self._ema_unet.load_state_dict(ema.shadow)
            averaged = self._ldm(self._ema_unet)
            save_ldm(averaged, folder / EMA_FILE, weights=f"ema {ema.decay}", **extra)

    def load_weights(self, folder: Path) -> None:
        path = folder / LDM_FILE
        checkpoint = read_checkpoint(path)
        state = checkpoint.subtree("unet.")
        self.unet.load_state_dict(check_state(self.unet, state, path))
        if self.text_encoder is not None:
            state = checkpoint.subtree("text_encoder.")
            self.text_encoder.load_state_dict(check_state(self.text_encoder, state, path))


# --------------------------------------------------------------------------- the run


def _autoencoder(config: SDMTrainConfig, info: dict[str, Any] | None) -> AutoencoderKL:
    """The frozen AE: ``config.ae``, else the one the latents were encoded with."""
    from cheff.checkpoints import load_autoencoder
    from cheff.latents import file_sha256

    path = config.ae or (info or {}).get("ae")
    if not path:
        raise TrainingError(
            "latent diffusion trains on an autoencoder's latents: give --ae CKPT (the "
            "autoencoder checkpoint; a latents folder made from a checkpoint file names its own)"
        )
    if not Path(path).is_file():
        raise TrainingError(f"autoencoder checkpoint {path} not found; give --ae CKPT")
    autoencoder = load_autoencoder(path)
    if info is not None:
        if autoencoder.config != AutoencoderConfig.from_dict(info["autoencoder"]):
            raise TrainingError(
                f"the autoencoder {path} is not the one the latents were encoded with "
                f"({info['autoencoder']} != {autoencoder.config.to_dict()})"
            )
        if info.get("ae_sha256") and file_sha256(Path(path)) != info["ae_sha256"]:
            log.warning(
                "%s is not the file the latents were encoded with (%s): same architecture, "
                "maybe other weights; grids decode with this one",
                path,
                info.get("ae"),
            )
    return autoencoder


def _trained_without(config: SDMTrainConfig, info: dict[str, Any] | None) -> tuple[Any, Any]:
    """(the MaCheX, the held-out set) a run leaves out: ``data.holdout`` of ``data.data``, or
    for latents the set left out at encoding or training, of the MaCheX they came from."""
    name = config.data.holdout
    if info is None:
        return config.data.data, name
    from cheff.latents import source_collection

    encoded_without = info.get("exclude_holdout") or []
    name = name or (encoded_without[0] if encoded_without else None)
    try:
        return source_collection(info, config.data.machex), name
    except ValueError:  # moved, with no --machex: the name alone is recorded
        return None, name


def _holdout_keys(config: SDMTrainConfig, info: dict[str, Any]) -> list[str] | None:
    """Keys to drop from latents encoded without leaving the held-out set out: its images
    and, for a set drawn by patient, every image of its patients (as ``MaCheX`` leaves out)."""
    name = config.data.holdout
    if not name or name in (info.get("exclude_holdout") or []):
        return None
    from cheff.latents import source_collection
    from machex.holdout import kept_out, load_holdout, load_holdout_info
    from machex.manifests import load_manifest

    root = Path(config.data.machex or info.get("data") or "")
    try:
        root = source_collection(info, config.data.machex)
        held, by = load_holdout(root, name), load_holdout_info(root, name).get("by")
        images = load_manifest(root, "images", columns=["key", "patient_id"])
        keys = images.loc[kept_out(images, held, by), "key"].tolist()
    except Exception as error:
        raise TrainingError(
            f"the latents were encoded without leaving out the held-out set {name!r}, and it "
            f"cannot be read from their MaCheX {root} ({error}); encode again with "
            "--holdout, or train with --holdout none"
        ) from None
    log.info("leaving out the %d keys of the held-out set %r", len(keys), name)
    return keys


def _conditions(
    config: SDMTrainConfig, info: dict[str, Any] | None
) -> tuple[ConditionTable | None, Conditioner | None]:
    """The conditions of a conditioned run, read from the MaCheX the data comes from."""
    condition = config.condition
    if condition.kind is None:
        return None, None
    assert condition.encoder is not None
    try:
        conditioner = Conditioner.create(
            condition.kind, condition.vocab, max_length=condition.encoder.max_seq_len
        )
    except (FileNotFoundError, ValueError) as error:
        raise TrainingError(
            f"{error}; a report model needs --vocab (bert-base-uncased's vocab.txt for the "
            "paper's tokenisation)"
        ) from None
    from cheff.latents import source_collection

    try:
        root = (
            source_collection(info, config.data.machex)
            if info is not None
            else Path(config.data.data)
        )
        table = load_conditions(root, condition, config.data.sources)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    return table, conditioner


@in_process_group
def train_sdm(
    config: SDMTrainConfig, run: Path, *, resume: bool = False, progress: bool = True
) -> tuple[RunInfo, SDMTask]:
    """Train (or resume) a latent diffusion run in ``run``; returns what ran and the task.

    ``config.data.data`` is a built MaCheX (images at ``data.image_size``, the held-out set
    ``data.holdout`` left out, encoded every step) or a latents folder from ``cheff encode``
    (told apart by its ``latents.json``).
    """
    from cheff.latents import is_latents, open_latent_stream, read_info
    from cheff.train.data import batch_source, holdout_record, open_stream, run_steps

    data = config.data
    if not data.data:
        raise ValueError("no training data: give --data, a built MaCheX or a latents folder")
    info = read_info(data.data) if is_latents(data.data) else None
    autoencoder = _autoencoder(config, info)
    ae_config = autoencoder.config
    if config.model.in_channels != ae_config.embed_dim:
        raise TrainingError(
            f"the U-Net takes {config.model.in_channels} channels, the autoencoder's latents "
            f"have {ae_config.embed_dim}"
        )
    conditions, conditioner = _conditions(config, info)
    keys = None if conditions is None else conditions.keys
    batch = config.train.batch_size
    if info is not None:
        stream = open_latent_stream(
            data.data, data, batch, config.train.seed, _holdout_keys(config, info), keys
        )
        side = int(info["latent_shape"][-1])
        log.info(
            "training on %d latents of %s (%s px); scale factor %g (the latents' 1/std: %s)",
            stream.epoch_size,
            data.data,
            info["image_size"],
            config.scale_factor,
            info.get("scale_by_std"),
        )
    else:
        if data.image_size % ae_config.downsampling:
            raise ValueError(
                f"image_size {data.image_size} is not a multiple of the AE's factor "
                f"{ae_config.downsampling}"
            )
        stream = open_stream(data, batch, config.train.seed, keys)
        side = data.image_size // ae_config.downsampling
    if side % config.model.downsampling:
        raise TrainingError(
            f"latents of {side} x {side} do not fit a U-Net that downsamples by "
            f"{config.model.downsampling}"
        )
    max_steps = run_steps(config.train, stream.epoch_size)
    torch.manual_seed(config.train.seed)  # the same initial weights for the same seed
    task = SDMTask(
        config, autoencoder, latent_side=side, conditions=conditions, conditioner=conditioner
    )
    task.holdout_record = holdout_record(*_trained_without(config, info))
    ae_path = config.ae or (info or {}).get("ae")
    run_config = config.to_dict() | {"resolved": {"latents": info is not None, "ae": ae_path}}
    trainer = Trainer(
        run,
        config.train,
        task,
        batch_source(stream, data, batch),
        max_steps=max_steps,
        run_config=run_config,
        progress=progress,
    )
    task.ema_of = lambda: trainer.ema
    return trainer.fit(resume=resume), task
