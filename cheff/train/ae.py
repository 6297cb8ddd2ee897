"""``cheff train ae``: the autoencoder as a :class:`~cheff.train.loop.Task`.

Two optimisers, as the official training: Adam over the autoencoder's parameters (the loss's
log-variance is not among them, as in the official code) and Adam over the discriminator's,
which only steps once the discriminator is switched on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cheff.checkpoints import check_state, read_checkpoint, save_autoencoder, save_checkpoint
from cheff.config import AETrainConfig
from cheff.losses import AutoencoderLoss
from cheff.models.autoencoder import AutoencoderKL
from cheff.train.distributed import BatchDraws, in_process_group
from cheff.train.loop import EMA, RunInfo, Trainer, TrainingError

log = logging.getLogger(__name__)

AE_FILE = "autoencoder.safetensors"
AE_EMA_FILE = "autoencoder-ema.safetensors"  # with train.ema_decay: the averaged weights
DISC_FILE = "discriminator.safetensors"


def build_perceptual(config: AETrainConfig) -> nn.Module:
    """LPIPS from the weight files named in the config; random features only if allowed."""
    from cheff.models.perceptual import LPIPS

    loss = config.loss
    if loss.perceptual_weight == 0:
        return nn.Module()  # no perceptual term (the tiny preset: VGG16 is slow on a CPU)
    if loss.perceptual_vgg16 and loss.perceptual_heads:
        return LPIPS.from_files(vgg16=loss.perceptual_vgg16, heads=loss.perceptual_heads)
    if loss.perceptual_weight > 0 and not loss.random_perceptual:
        raise TrainingError(
            "the perceptual loss needs its weights: --perceptual-vgg16 FILE (torchvision's "
            "ImageNet vgg16 state dict, e.g. vgg16-397923af.pth) and --perceptual-heads FILE "
            "(LPIPS v0.1 vgg.pth, shipped in the `lpips` package); nothing is downloaded"
        )
    log.warning("perceptual loss with RANDOM VGG16 features (no weight files given)")
    return LPIPS()


class AutoencoderTask:
    losses = ("ae", "disc")

    def __init__(self, config: AETrainConfig, perceptual: nn.Module) -> None:
        self.config = config
        self.model = AutoencoderKL(config.model)
        self.loss_fn = AutoencoderLoss(config.loss, perceptual, config.model.in_channels)
        self.ema_of: Callable[[], EMA | None] = lambda: None  # the trainer's, once it runs
        # the held-out set left out, for the saved files' headers (train.data.holdout_record)
        self.holdout_record: dict[str, str] = {}
        self._ema_model: AutoencoderKL | None = None  # what the average is saved from
        train = config.train
        self._optimizers = {
            "ae": torch.optim.Adam(self.model.parameters(), lr=train.lr, betas=train.betas),
            "disc": torch.optim.Adam(
                self.loss_fn.discriminator.parameters(),
                lr=config.loss.disc_lr or train.lr,
                betas=train.betas,
            ),
        }

    def modules(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.model, "loss": self.loss_fn}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def compile_targets(self) -> list[nn.Module]:
        """``train.compile``: the parts whose ``forward`` the loss calls."""
        return [self.model.encoder, self.model.decoder, self.loss_fn.discriminator]

    def active(self, name: str, step: int) -> bool:
        return name == "ae" or self.loss_fn.disc_factor(step) > 0

    def _inputs(self, batch: dict[str, Any]) -> Tensor:
        image = batch["image"]
        return image.expand(-1, self.config.model.in_channels, -1, -1)

    def loss(
        self, name: str, batch: dict[str, Any], step: int, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x = self._inputs(batch)
        draws = BatchDraws(generator, self.config.train.batch_size, x.device)
        if name == "ae":
            posterior = self.model.encode(x)
            noise = draws.normal(tuple(posterior.mean.shape))
            reconstruction = self.model.decode(posterior.sample(noise=noise))
            last_layer = self.model.decoder.conv_out.weight
            return self.loss_fn.generator_loss(x, reconstruction, posterior, step, last_layer)
        with torch.no_grad():
            posterior = self.model.encode(x)
            noise = draws.normal(tuple(posterior.mean.shape))
            reconstruction = self.model.decode(posterior.sample(noise=noise))
        return self.loss_fn.discriminator_loss(x, reconstruction, step)

    def images(self, batch: dict[str, Any]) -> Tensor:
        """Originals above their reconstructions (from the posterior mean)."""
        x = self._inputs(batch)[:8]
        return torch.cat([x, self.model.reconstruct(x)])

    def save_weights(self, folder: Path, step: int) -> None:
        record = self.holdout_record
        save_autoencoder(self.model, folder / AE_FILE, step=str(step), **record)
        ema = self.ema_of()
        if ema is not None:
            if self._ema_model is None:
                self._ema_model = AutoencoderKL(self.config.model)
            self._ema_model.load_state_dict(ema.shadow)
            save_autoencoder(
                self._ema_model,
                folder / AE_EMA_FILE,
                step=str(step),
                weights=f"ema {ema.decay}",
                **record,
            )
        save_checkpoint(
            self.loss_fn.discriminator,
            folder / DISC_FILE,
            kind="discriminator",
            config={"n_layers": self.config.loss.disc_layers},
        )

    def load_weights(self, folder: Path) -> None:
        for module, name in ((self.model, AE_FILE), (self.loss_fn.discriminator, DISC_FILE)):
            path = folder / name
            state = read_checkpoint(path).state_dict
            module.load_state_dict(check_state(module, state, path))


@in_process_group
def train_autoencoder(
    config: AETrainConfig, run: Path, *, resume: bool = False, progress: bool = True
) -> tuple[RunInfo, AutoencoderTask]:
    """Train (or resume) an autoencoder run in ``run``; returns what ran and the task."""
    from cheff.train.data import batch_source, holdout_record, open_stream, run_steps

    stream = open_stream(config.data, config.train.batch_size, config.train.seed)
    max_steps = run_steps(config.train, stream.epoch_size)
    torch.manual_seed(config.train.seed)  # the same initial weights for the same seed
    task = AutoencoderTask(config, build_perceptual(config))
    task.holdout_record = holdout_record(config.data.data, config.data.holdout)
    trainer = Trainer(
        run,
        config.train,
        task,
        batch_source(stream, config.data, config.train.batch_size),
        max_steps=max_steps,
        run_config=config.to_dict(),
        progress=progress,
    )
    task.ema_of = lambda: trainer.ema
    return trainer.fit(resume=resume), task
