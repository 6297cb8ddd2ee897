"""``cheff train sr``: the super-resolution diffusion model as a :class:`~cheff.train.loop.Task`.

As the SR3-style ``GaussianDiffusion`` trains it: x0 = 2 x_HR - 1 (the target at
``data.image_size``), the condition = bicubic(2 x_LR - 1) to that size without antialias
(:func:`cheff.models.sr.sr_condition`, what sampling uses), t uniform in [0, T), x_t =
q_sample(x0, t, eps) on the cosine schedule, and the loss between eps and the U-Net's
prediction (L1 by default, ``loss``). x_LR is ``machex.resize`` (antialiased bicubic) of the
target to ``low_size``; when fine-tuning with an autoencoder it is instead the autoencoder's
reconstruction of x_LR (posterior mean, decoded) through :func:`cheff.glue.official_glue`,
exactly what the cascade feeds the SR model. Every draw uses the loop's generator, so a
resumed run repeats the uninterrupted one exactly.

One optimiser, ``unet`` (Adam). Checkpoints hold ``sr.safetensors`` (and ``sr-ema.safetensors``
with an EMA), both readable by :func:`cheff.checkpoints.load_sr` and ``cheff sample --sr``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cheff.checkpoints import check_state, read_checkpoint, save_sr
from cheff.config import SRTrainConfig
from cheff.diffusion import NoiseSchedule, ddim, noise_with, noising_scales
from cheff.glue import official_glue
from cheff.models.autoencoder import AutoencoderKL
from cheff.models.sr import SuperResolution, sr_condition
from cheff.models.sr_unet import SRUNet
from cheff.train.distributed import BatchDraws, in_process_group
from cheff.train.loop import EMA, RunInfo, Trainer, TrainingError

log = logging.getLogger(__name__)

SR_FILE = "sr.safetensors"
EMA_FILE = "sr-ema.safetensors"


class SRTask:
    """The SR U-Net's noise-prediction loss on (low, high) pairs made from each batch."""

    losses = ("unet",)

    def __init__(
        self,
        config: SRTrainConfig,
        *,
        autoencoder: AutoencoderKL | None = None,
        initial: SuperResolution | None = None,
    ) -> None:
        self.config = config
        self.unet = initial.unet if initial is not None else SRUNet(config.model)
        self.unet.gradient_checkpointing = config.train.grad_checkpointing
        self.autoencoder = None if autoencoder is None else autoencoder.eval().requires_grad_(False)
        s = config.schedule
        self.schedule = NoiseSchedule.sr_cosine(s.timesteps, s.s)
        self.sr = SuperResolution(self.unet, self.schedule)  # saved with it: sampling uses it
        self._alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)  # official buffer
        self._scales = noising_scales(self._alphas_cumprod).float()  # moved by loss()
        try:  # fail now, not at the first grid
            self.schedule.ddim_timesteps(config.grid_steps)
        except ValueError as error:
            raise TrainingError(f"grid_steps {config.grid_steps}: {error}") from None
        train = config.train
        self._optimizers = {
            "unet": torch.optim.Adam(self.unet.parameters(), lr=train.lr, betas=train.betas)
        }
        self.ema_of: Callable[[], EMA | None] = lambda: None
        # the held-out set left out, for the saved files' headers (train.data.holdout_record)
        self.holdout_record: dict[str, str] = {}
        self._ema_unet: SRUNet | None = None

    def modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"unet": self.unet}  # first: the loop's EMA averages it
        if self.autoencoder is not None:
            modules["autoencoder"] = self.autoencoder
        return modules

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def active(self, name: str, step: int) -> bool:
        return True

    # -- pairs and the loss ------------------------------------------------------------------

    @torch.no_grad()
    def low_resolution(self, high: Tensor) -> Tensor:
        """Targets (B, 1, H, W) in [0, 1] -> the model's input (B, 1, low, low) in [0, 1]."""
        from machex import resize

        low = resize(high.float(), self.config.low_size)
        if self.autoencoder is None:
            return low
        channels = self.autoencoder.config.in_channels
        x = (low * 2 - 1).expand(-1, channels, -1, -1)
        return official_glue(self.autoencoder.decode(self.autoencoder.encode(x).mean))

    def pair(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(x0 in [-1, 1], condition) at the target size from a batch of images in [-1, 1]."""
        high = (batch["image"].float() + 1) / 2
        condition = sr_condition(self.low_resolution(high), high.shape[-1])
        return high * 2 - 1, condition

    def loss(
        self, name: str, batch: dict[str, Any], step: int, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x0, condition = self.pair(batch)
        count, device = x0.shape[0], x0.device
        draws = BatchDraws(generator, self.config.train.batch_size, device)
        t = draws.integers(self.schedule.num_timesteps, count)
        noise = draws.normal(tuple(x0.shape))
        if self._scales.device != device:
            self._scales = self._scales.to(device)
        x_t = noise_with(self._scales, x0, t.to(device), noise)
        eps = self.sr.eps(x_t, t.to(device), condition).float()
        loss = F.l1_loss(eps, noise) if self.config.loss == "l1" else F.mse_loss(eps, noise)
        return loss, {"unet/total": loss.detach()}

    # -- grids -------------------------------------------------------------------------------

    @torch.no_grad()
    def images(self, batch: dict[str, Any]) -> Tensor:
        """Rows of: the upsampled inputs, the targets, and DDIM samples (eta 0, fixed noise)."""
        x0, condition = self.pair({"image": batch["image"][: self.config.grid_samples]})
        generator = torch.Generator().manual_seed(self.config.grid_seed)
        x_T = torch.randn(x0.shape, generator=generator).to(x0.device)
        timesteps = self.schedule.ddim_timesteps(self.config.grid_steps)
        was_training = self.unet.training
        self.unet.eval()
        try:
            samples = ddim(
                lambda x, t: self.sr.eps(x, t, condition).float(),
                x_T,
                self._alphas_cumprod,
                timesteps,
            )
        finally:
            self.unet.train(was_training)
        return torch.cat([condition.clamp(-1, 1), x0, samples.clamp(-1, 1)])

    # -- weights -----------------------------------------------------------------------------

    def save_weights(self, folder: Path, step: int) -> None:
        # The sides it was trained at: `cheff upscale` and the cascade default to them.
        sizes = {
            "image_size": str(self.config.data.image_size),
            "low_size": str(self.config.low_size),
            **self.holdout_record,
        }
        save_sr(self.sr, folder / SR_FILE, step=str(step), weights="live", **sizes)
        ema = self.ema_of()
        if ema is not None:
            if self._ema_unet is None:
                self._ema_unet = SRUNet(self.unet.config)
            self._ema_unet.load_state_dict(ema.shadow)
            averaged = SuperResolution(self._ema_unet, self.schedule)
            save_sr(
                averaged, folder / EMA_FILE, step=str(step), weights=f"ema {ema.decay}", **sizes
            )

    def load_weights(self, folder: Path) -> None:
        path = folder / SR_FILE
        state = read_checkpoint(path).subtree("unet.")
        self.unet.load_state_dict(check_state(self.unet, state, path))


@in_process_group
def train_sr(
    config: SRTrainConfig, run: Path, *, resume: bool = False, progress: bool = True
) -> tuple[RunInfo, SRTask]:
    """Train (or resume, or fine-tune) a super-resolution run in ``run``.

    ``config.data.data`` is a built MaCheX, read at ``data.image_size`` with the held-out set
    ``data.holdout`` left out. ``finetune_from`` starts from an SR file (official or ours; its
    architecture wins over ``config.model``); ``ae`` makes the inputs D(E(x_LR)).
    """
    from cheff.checkpoints import load_autoencoder, load_sr
    from cheff.train.data import batch_source, holdout_record, open_stream, run_steps

    data = config.data
    if not data.data:
        raise ValueError("no training data: give --data, a built MaCheX")
    autoencoder = None
    if config.ae:
        if not Path(config.ae).is_file():
            raise TrainingError(f"autoencoder checkpoint {config.ae} not found")
        autoencoder = load_autoencoder(config.ae)
        if config.low_size % autoencoder.config.downsampling:
            raise TrainingError(
                f"low_size {config.low_size} is not a multiple of the autoencoder's factor "
                f"{autoencoder.config.downsampling}"
            )
    initial = None
    if config.finetune_from:
        if not Path(config.finetune_from).is_file():
            raise TrainingError(f"--finetune-from {config.finetune_from}: no such file")
        initial = load_sr(config.finetune_from)
        initial.train()
        _check_schedule(initial, config)
        if initial.unet.config != config.model:
            log.info(
                "fine-tuning the architecture of %s: %s", config.finetune_from, initial.unet.config
            )
            config = _with_model(config, initial.unet.config)
    elif autoencoder is not None:
        log.warning(
            "training on D(E(x_LR)) inputs from scratch; the paper fine-tunes a base "
            "model (--finetune-from)"
        )
    batch = config.train.batch_size
    stream = open_stream(data, batch, config.train.seed)
    max_steps = run_steps(config.train, stream.epoch_size)
    torch.manual_seed(config.train.seed)
    task = SRTask(config, autoencoder=autoencoder, initial=initial)
    task.holdout_record = holdout_record(data.data, data.holdout)
    trainer = Trainer(
        run,
        config.train,
        task,
        batch_source(stream, data, batch),
        max_steps=max_steps,
        run_config=config.to_dict(),
        progress=progress,
    )
    task.ema_of = lambda: trainer.ema
    return trainer.fit(resume=resume), task


def _check_schedule(initial: SuperResolution, config: SRTrainConfig) -> None:
    """Fine-tuning keeps the base model's noise schedule: a base file that stores another one
    than the run's settings would be trained (and saved) on a schedule it never saw."""
    if initial.schedule is None:  # a released file, or ours from before schedules were stored
        return
    s = config.schedule
    wanted = NoiseSchedule.sr_cosine(s.timesteps, s.s)
    if torch.equal(initial.schedule.alphas_cumprod, wanted.alphas_cumprod):  # False: lengths
        return
    raise TrainingError(
        f"--finetune-from {config.finetune_from} was trained with another noise schedule "
        f"({initial.schedule.num_timesteps} steps) than this run's (schedule.timesteps "
        f"{s.timesteps}, schedule.s {s.s}): give the base run's settings with --set "
        "schedule.timesteps=... --set schedule.s=..."
    )


def _with_model(config: SRTrainConfig, model: Any) -> SRTrainConfig:
    import dataclasses

    return dataclasses.replace(config, model=model)
