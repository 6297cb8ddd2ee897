"""Training-step throughput, peak memory and FLOPs of a Cheff model, at a preset's settings.

    python benchmarks/bench_train.py ae --preset both [--batch-size N] [--device auto|cpu|cuda]
        [--image-size S] [--warmup N] [--steps N] [--threads N] [--no-disc] [--json FILE]
    python benchmarks/bench_train.py sdm --preset both [--batch-sizes 1,2,4] [...]
    python benchmarks/bench_train.py sdm --preset tiny-report|paper-report|tiny-labels|...
        [--grad-checkpointing] [--no-optimizer] [...]
    python benchmarks/bench_train.py sr --preset both [--batch-sizes 1,2] [--grad-checkpointing]
    efficiency options, any model: [--precision auto|bf16|fp32] [--channels-last] [--compile]
        [--compile-mode default|reduce-overhead|max-autotune|max-autotune-no-cudagraphs]
        [--sdpa auto|flash|efficient|cudnn|math] [--cudnn-benchmark] [--peak-tflops T]
        [--norm-in-compute-dtype (sdm)] [--optimizer-impl auto|fused|foreach|loop]
        [--inductor KEY=VALUE ...]
        [--profile N [--profile-trace DIR]]

Models: ``ae`` (the KL autoencoder, ``cheff train ae``), ``sdm`` (the latent diffusion
U-Net, ``cheff train sdm``: ``paper`` and ``tiny`` unconditional, or a conditioned preset of
``cheff.config.SDM_PRESETS``: ``tiny-report``, ``paper-report``, ``tiny-labels``,
``paper-labels``) and ``sr`` (the super-resolution U-Net, ``cheff train sr``: ``paper`` 256 ->
1024 px with the released architecture, ``tiny`` 16 -> 64 px). ``--batch-sizes`` (or
``--batch-size N`` for one) gives one row per batch size, each measured on a freshly built
model; the list stops at the first out-of-memory (CUDA, or on the CPU an allocation refused,
e.g. under ``prlimit --as``), which is reported as a row of its own.

Defaults (``DEFAULTS``, batch sizes per device; warm-up + timed steps): ``ae`` paper batch 2,
1 + 3 on the CPU (16, 3 + 20 on a GPU), 256 px; tiny batch 8, 3 + 20 (5 + 50), 32 px. A paper
``ae`` step at 256 px costs ~4.3 TFLOP per image: minutes per step on a small CPU. ``sdm``
paper batches 1, 2 with 1 + 2 on the CPU (32, 64, 128, 256 with 3 + 20 on a GPU), 256 px
images = 3 x 64 x 64 latents; tiny batches 8, 32 with 3 + 20 (5 + 50), 32 px = 3 x 8 x 8. The
conditioned presets as their unconditional ones, except ``paper-report`` and ``paper-labels``:
batch 1 with 1 + 2 on the CPU (16, 32, 64, 128, 256 with 3 + 20 on a GPU). ``sr`` paper
batches 1, 2 with 1 + 2 on the CPU (8, 16, 32, 64 with 3 + 20 on a GPU; the paper trains at
32), 1024 px targets; tiny batches 4, 16 with 3 + 20 (4, 16, 64 with 5 + 50), 64 px.

One timed step is one optimiser step of the training loop itself, ``Trainer.train_step`` of a
``Trainer`` placed on the device (``placed_trainer``; one micro-batch): for each loss of the
task that is active at the step, zero the gradients of every module, compute the loss under the
loop's autocast, note its finiteness on the device (read once after the timed steps), backward,
clip (if the preset clips), ``optimizer.step()`` with the loop's kernels (``--optimizer-impl``,
default ``auto``: fused Adam on CUDA); then the EMA update (if the preset has one). For
``ae`` the step index is the preset's ``disc_start`` (the discriminator on, both optimisers
step, as in most of a paper run) unless ``--no-disc`` (step 0: the autoencoder's optimiser
only). The paper preset's perceptual loss is a random-init ``LPIPS()`` (same cost as the real
weights); ``tiny`` keeps its own setting (no LPIPS). ``--no-optimizer`` leaves out
``optimizer.step()``, so no Adam state is ever allocated: forward, backward, clipping (if the
preset clips) and the EMA, for a model whose optimiser state does not fit in memory (its rows
say so; not a training step).

``sdm`` trains from latents, as the paper does (``cheff encode`` writes them once): the step
is ``SDMTask.loss`` on stored moments (a posterior sample z0 = mean + std * eps drawn from
them, t uniform, x_t = q_sample(z0, t, noise), the U-Net's noise prediction, MSE), backward,
Adam on the U-Net, and the U-Net's EMA update (the paper preset's decay 0.9999, tiny 0.99). The
autoencoder's encoder is not in the step; the task holds a random-init, frozen autoencoder of
the preset's config (only grids decode with it) whose weights sit on the device as in a run.
``--grad-checkpointing`` sets the preset's ``train.grad_checkpointing``: the U-Net's blocks
(and a conditioned model's encoder layers) recompute their activations in the backward pass.

``sr`` trains from the high-resolution images alone, as ``cheff train sr`` does: the step is
``SRTask.loss`` on a batch of targets in [-1, 1] (the input is made inside the step:
``machex.resize``, antialiased bicubic, to the preset's ``low_size``, 256 for 1024 px, then
``sr_condition``, bicubic back up to the target size), t uniform over the cosine schedule's
2000 steps, x_t = q_sample(x0, t, noise), the SR U-Net's noise prediction on [x_t, condition]
(2 channels), the L1 loss, backward, Adam (no EMA and no clipping in either preset). No
autoencoder (the fine-tuning stage's D(E(x_LR)) inputs are not measured). ``--grad-checkpointing``
sets ``train.grad_checkpointing``: each U-Net level recomputes its activations in the backward
pass. ``--image-size S`` sets the target side (a multiple of the U-Net's factor: 128 paper, 16
tiny); the input side keeps the preset's factor 4.

A conditioned ``sdm`` step (``SDMTask`` with a ``ConditionTable`` and a ``Conditioner``) also
includes, inside ``SDMTask.loss``: looking up each image's condition by ``batch["key"]``,
tokenising it on the CPU (reports: WordPiece to the encoder's ``max_seq_len`` ids, labels: 14
ids), the condition dropout of the preset (``condition.drop``: 0 for reports, 0.1 for labels),
the text encoder's forward (random init, trained: its output is the context of every
cross-attention block of the U-Net) and its backward; the one Adam optimiser steps over the
U-Net and the encoder (its ``to_logits`` is frozen and unused, as in training), and the EMA
averages the U-Net only. Report conditions are synthetic (``synthetic_reports``: sentences of
radiology words, ~130 WordPiece tokens each, about a real report's length, distinct per image)
over a synthetic ``vocab.txt`` of the BERT-uncased size, 30522 lines (``synthetic_vocab``), so
the encoder's embedding has the released 30522 rows (the task sizes it from the tokenizer);
label conditions are random states (positive, negative, uncertain, not mentioned) per finding.

The input is one synthetic batch already on the device: ``{"image": rand(B, 1, S, S) * 2 - 1}``
for ``ae`` and ``sr``, ``{"moments": randn(B, 2 * embed_dim, S / 4, S / 4)}`` in float16 (as
a latents folder stores and streams them) and ``"key"`` (B image keys the condition table
knows) for ``sdm``. This measures the model step, not the data pipeline
(``benchmarks/bench_loader.py`` does that). ``--image-size S`` sets the image side (``sdm``:
the latent side is S / the autoencoder's factor 4, and must divide by the U-Net's factor: S a
multiple of 32 for the paper U-Net, of 8 for tiny; ``sr``: above). Precision: bf16 autocast
on CUDA, fp32 on the CPU (as the loop's ``precision=auto``). Each step is timed with
``time.perf_counter`` after ``torch.cuda.synchronize()`` on a GPU; images/s is the batch over
the mean step time. On a GPU the same number of steps then runs back to back with one
synchronisation at the end, as the training loop runs them (a step reads nothing back from the
device: since 2026-11-27 evening it launches a few small kernels that note the loss's
finiteness and keep the logged values, where it read them before): ``steady_step_s``,
``steady_images_per_s`` and ``mfu_steady``. The per-step figures also hold the host's work
between a synchronisation and the step's first kernel (drawing noise, launching); the steady
ones overlap it with the previous step, as training does. Then one more step runs under
torch's CUDA sync debug mode (``warn``), and the row lists where it made the host wait for the
GPU (``host_waits_per_step``, ``file:line``; the loop's step should have none).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps, synchronised and
steady (reset after the warm-up; weights, gradients and optimiser state included, as they stay
allocated). On the CPU the growth of the process's peak RSS (``VmHWM`` in ``/proc/self/status``,
reset with ``/proc/self/clear_refs`` before the model is built, after handing freed heap back
with glibc's ``malloc_trim``) over its RSS before the model was built: weights, optimiser and
EMA state and activations of warm-up and timed steps. One throwaway step of a small network runs
first, so that one-time set-up (lazy imports, kernel libraries) is not charged to the first row.
A model near the machine's memory is best run in a child process under an address-space limit
(``prlimit --as=BYTES python benchmarks/bench_train.py ...``): an overrun then ends its row as
out of memory instead of starving the machine.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over the first warm-up step (with
``--warmup 0`` an extra step after the timed ones): the matmul/convolution/attention FLOPs
dispatched in forward and backward of everything in the step (LPIPS, the discriminator, the
adaptive weight's extra gradients, the text encoder; the CPU's fused attention, which torch
does not count, with torch's formulas for the CUDA kernels; with ``--grad-checkpointing`` the
recomputed forward too: work done, not model FLOPs); elementwise work (norms, activations,
Adam, EMA) is not counted. On a GPU, MFU = achieved FLOP/s / the GPU's dense bf16 peak
(``PEAK_BF16_TFLOPS``, or ``--peak-tflops``); on the CPU the achieved GFLOP/s.

Efficiency options (each recorded in every JSON row, and named in the table's step column when
given; without them the step is unchanged): ``--channels-last`` moves the modules (their 4-d
weights) and the input batch's 4-d tensors to ``torch.channels_last``. ``--compile`` compiles
the modules the step calls (``nn.Module.compile()``: ``torch.compile`` in ``--compile-mode``;
ae: the encoder, decoder, discriminator and LPIPS; sdm: the U-Net and the text encoder; sr:
the U-Net),
after eager steps that count the FLOPs (FlopCounterMode does not see inside compiled
graphs) on the batch's first 1 and 2 rows, extrapolated linearly to the batch (an eager step of
the whole batch may not fit in memory beside the compiled one); the first warm-up step then
compiles, and its time is ``compile_s`` (at least one
warm-up step is run); ``torch._dynamo`` is reset before each row and its graph breaks recorded.
``--sdpa`` restricts ``F.scaled_dot_product_attention`` to one backend
(``torch.nn.attention.sdpa_kernel``; ``math`` is the unfused path). ``--cudnn-benchmark`` sets
``torch.backends.cudnn.benchmark`` (``train.cudnn_benchmark``; off unless given, unlike
``cheff train``, so that rows stay comparable with the earlier ones). ``--optimizer-impl``
sets ``train.optimizer_impl`` (each row records the kernels that ran, ``optimizer_impl``).
``--norm-in-compute-dtype`` (sdm) sets ``train.norm_in_compute_dtype``: the U-Net's
GroupNorms in bf16 under autocast. ``--inductor
KEY=VALUE`` (with ``--compile``) sets a ``torch._inductor.config`` value for the run, e.g. the
``coordinate_descent_tuning`` that tunes each pointwise and reduction kernel's launch
configuration. ``--profile N``
runs N more steps under ``torch.profiler`` after the timed ones and keeps where the time went
(``benchmarks/step_profile.py``: GPU kernels by kind and the GPU's busy share, or the CPU's
operators). Every row also records the fused attention kernels that
ran in the FLOP-counting step (``attention_ops``: aten ops such as
``_scaled_dot_product_flash_attention``; none for the math path), the TF32, cuDNN and SDPA
settings (``backends``), the FLOPs by aten op, and the warm-up step times. ``--json`` is
rewritten after every row (``complete`` false until the end), so a killed run keeps its rows.

Prints a Markdown table for ``docs/benchmarks.md`` and the machine, date, command and code
version; ``--json`` writes all of it. Adding a model: a setup function, a ``MODELS`` entry and
its ``DEFAULTS``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import step_profile
import torch
from bench_common import cpu_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import cheff
from cheff.config import COMPILE_MODES, OPTIMIZER_IMPLS, PRESETS, TrainConfig
from cheff.train.loop import Task, Trainer, compile_in_place, select_device

#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched in order against the name.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.0),
)
#: (model, preset, device type) -> (batch sizes per device, warm-up steps, timed steps).
DEFAULTS: dict[tuple[str, str, str], tuple[tuple[int, ...], int, int]] = {
    ("ae", "paper", "cpu"): ((2,), 1, 3),
    ("ae", "paper", "cuda"): ((16,), 3, 20),
    ("ae", "tiny", "cpu"): ((8,), 3, 20),
    ("ae", "tiny", "cuda"): ((8,), 5, 50),
    ("sdm", "paper", "cpu"): ((1, 2), 1, 2),
    ("sdm", "paper", "cuda"): ((32, 64, 128, 256), 3, 20),
    ("sdm", "tiny", "cpu"): ((8, 32), 3, 20),
    ("sdm", "tiny", "cuda"): ((8, 32), 5, 50),
    ("sdm", "paper-report", "cpu"): ((1,), 1, 2),
    ("sdm", "paper-report", "cuda"): ((16, 32, 64, 128, 256), 3, 20),
    ("sdm", "paper-labels", "cpu"): ((1,), 1, 2),
    ("sdm", "paper-labels", "cuda"): ((16, 32, 64, 128, 256), 3, 20),
    ("sdm", "tiny-report", "cpu"): ((8, 32), 3, 20),
    ("sdm", "tiny-report", "cuda"): ((8, 32), 5, 50),
    ("sdm", "tiny-labels", "cpu"): ((8, 32), 3, 20),
    ("sdm", "tiny-labels", "cuda"): ((8, 32), 5, 50),
    ("sr", "paper", "cpu"): ((1, 2), 1, 2),
    ("sr", "paper", "cuda"): ((8, 16, 32, 64), 3, 20),
    ("sr", "tiny", "cpu"): ((4, 16), 3, 20),
    ("sr", "tiny", "cuda"): ((4, 16, 64), 5, 50),
}
#: The BERT-uncased vocabulary's size: the released report encoder's embedding rows.
BERT_VOCAB_SIZE = 30522
#: Words of the synthetic reports, one WordPiece token each (they are in the synthetic vocab).
_REPORT_VOCABULARY = (
    "the heart size is normal mediastinal and hilar contours are unremarkable lungs clear no "
    "focal consolidation pleural effusion pneumothorax mild cardiomegaly small left right "
    "bilateral basilar atelectasis opacity lower lobe upper stable compared with prior "
    "radiograph there subsegmental interstitial edema vascular congestion tube line tip "
    "terminates in superior vena cava degenerative changes of thoracic spine acute osseous "
    "abnormality"
)
REPORT_WORDS = tuple(_REPORT_VOCABULARY.split())
REPORT_SENTENCES, REPORT_SENTENCE_WORDS = 12, 10  # 120 words + 12 periods: ~134 tokens


@dataclass
class Setup:
    """What a model's setup function gives: the task, its batch and the step index to run."""

    task: Task
    batch: dict[str, Any]
    step: int
    train: TrainConfig  # the preset's loop settings (EMA, clipping, seed, ...)
    params: dict[str, int]
    image_size: int
    input: str  # what the step reads, for the table: "32" or "256 (z 3x64x64)"
    disc: bool | None = None  # ae: whether the discriminator phase runs; None: no such thing
    checkpointing: bool | None = None  # sdm, sr: gradient checkpointing; None: not offered
    notes: dict[str, Any] = field(default_factory=dict)
    # What --compile compiles (``nn.Module.compile``, in place): the modules the step calls
    # through ``__call__``, by name (ae: encoder, decoder, discriminator, LPIPS; sdm: U-Net and
    # text encoder; sr: U-Net).
    compiled: dict[str, nn.Module] = field(default_factory=dict)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def synthetic_vocab(folder: Path, size: int = BERT_VOCAB_SIZE) -> Path:
    """A WordPiece ``vocab.txt`` of ``size`` lines in ``folder``: the special tokens, the report
    words and ``.``, then ``tok{i}`` fillers (so the encoder's embedding has ``size`` rows)."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *dict.fromkeys(REPORT_WORDS)]
    tokens += [f"tok{i}" for i in range(size - len(tokens))]
    path = folder / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def synthetic_reports(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct reports of ``REPORT_SENTENCES`` sentences of report words: about 134
    WordPiece tokens with ``[CLS]`` and ``[SEP]``, the length of a real report."""
    rng = random.Random(seed)
    return [
        " ".join(
            " ".join(rng.choices(REPORT_WORDS, k=REPORT_SENTENCE_WORDS)) + "."
            for _ in range(REPORT_SENTENCES)
        )
        for _ in range(count)
    ]


def _conditions(kind: str, keys: list[str], length: int) -> tuple[Any, Any, dict[str, Any]]:
    """The ``ConditionTable`` and ``Conditioner`` of ``keys`` for a ``kind`` model (synthetic
    reports over a 30522-line vocabulary, or random label states), and notes on them."""
    import numpy as np

    from cheff.conditioning import Conditioner
    from cheff.train.conditions import ConditionTable

    if kind == "report":
        with tempfile.TemporaryDirectory() as folder:
            vocab = synthetic_vocab(Path(folder))
            conditioner = Conditioner.create("report", str(vocab), max_length=length)
        reports = synthetic_reports(len(keys))
        table = ConditionTable("report", dict(zip(keys, reports)))
        pad = conditioner.tokenizer.pad_id
        used = (conditioner.ids(reports) != pad).sum(1).float().mean().item()
        what = f"synthetic reports, {used:.0f} of {length} tokens, vocab {conditioner.vocab_size}"
        return table, conditioner, {"condition": what}
    rng = np.random.default_rng(0)
    states = np.array([1.0, 0.0, -1.0, np.nan], dtype=np.float32)
    labels = {key: rng.choice(states, 14) for key in keys}
    notes = {"condition": "random label states, 14 tokens"}
    return ConditionTable("labels", labels), Conditioner.create("labels"), notes


def setup_ae(
    preset: str,
    batch: int,
    size: int | None,
    disc: bool,
    checkpointing: bool,
    device: torch.device,
) -> Setup:
    """The autoencoder's step (``checkpointing`` does not apply: refused by ``main``)."""
    from cheff.models.perceptual import LPIPS
    from cheff.train.ae import AutoencoderTask, build_perceptual

    config = PRESETS[preset].train_ae
    size = size or config.data.image_size
    lpips = config.loss.perceptual_weight > 0
    torch.manual_seed(0)
    task = AutoencoderTask(config, LPIPS() if lpips else build_perceptual(config))
    channels = 1  # grayscale, expanded to the model's channels by the task
    images = torch.rand(batch, channels, size, size, device=device) * 2 - 1
    return Setup(
        task=task,
        batch={"image": images},
        step=config.loss.disc_start if disc else 0,
        train=config.train,
        params={
            "autoencoder": count_parameters(task.model),
            "discriminator": count_parameters(task.loss_fn.discriminator),
            "lpips": count_parameters(task.loss_fn.perceptual_loss),
        },
        image_size=size,
        input=str(size),
        disc=disc,
        notes={"lpips": "random init" if lpips else "off", "disc_start": config.loss.disc_start},
        compiled={
            "encoder": task.model.encoder,
            "decoder": task.model.decoder,
            "discriminator": task.loss_fn.discriminator,
            **({"lpips": task.loss_fn.perceptual_loss} if lpips else {}),
        },
    )


def setup_sdm(
    preset: str,
    batch: int,
    size: int | None,
    disc: bool,
    checkpointing: bool,
    device: torch.device,
) -> Setup:
    """The SDM step from stored latents, unconditional or conditioned (``disc`` does not
    apply); ``checkpointing`` turns the preset's ``train.grad_checkpointing`` on."""
    from cheff.config import get_sdm_preset
    from cheff.models.autoencoder import AutoencoderKL
    from cheff.train.sdm import SDMTask

    config = get_sdm_preset(preset)
    if checkpointing:
        train = dataclasses.replace(config.train, grad_checkpointing=True)
        config = dataclasses.replace(config, train=train)
    ae_config = PRESETS[preset.split("-")[0]].autoencoder  # tiny-report: the tiny AE
    size = size or config.data.image_size
    factor = ae_config.downsampling * config.model.downsampling
    if size % factor:
        raise SystemExit(
            f"sdm {preset}: --image-size {size} is not a multiple of {factor} (the autoencoder's "
            f"factor {ae_config.downsampling} times the U-Net's {config.model.downsampling})"
        )
    side = size // ae_config.downsampling
    keys = [f"bench/{index}" for index in range(batch)]
    kind, encoder = config.condition.kind, config.condition.encoder
    conditions = conditioner = None
    condition, condition_notes = "", {}  # the table's input cell; the printed notes
    if kind is not None:
        assert encoder is not None  # checked by the config
        conditions, conditioner, condition_notes = _conditions(kind, keys, encoder.max_seq_len)
        condition = f", {kind} {conditioner.length} tok"
        condition_notes["condition drop"] = config.condition.drop
    torch.manual_seed(0)
    # Random init: the step never runs the autoencoder (latents in), it only holds its weights.
    task = SDMTask(
        config,
        AutoencoderKL(ae_config),
        latent_side=side,
        conditions=conditions,
        conditioner=conditioner,
    )
    channels = 2 * ae_config.embed_dim  # mean and log-variance, as `cheff encode` stores them
    moments = torch.randn(batch, channels, side, side, device=device).to(torch.float16)
    params = {"unet": count_parameters(task.unet)}
    if task.text_encoder is not None:
        params["text encoder"] = count_parameters(task.text_encoder)
        frozen = count_parameters(task.text_encoder.transformer.to_logits)
        params["of which to_logits (frozen, unused)"] = frozen
    params["autoencoder (frozen, not run)"] = count_parameters(task.autoencoder)
    return Setup(
        task=task,
        batch={"moments": moments, "key": keys},  # keys: what the condition lookup reads
        step=0,
        train=config.train,
        params=params,
        image_size=size,
        input=f"{size} (z {ae_config.embed_dim}x{side}x{side}{condition})",
        checkpointing=config.train.grad_checkpointing,
        notes={
            "input": f"latent moments {channels}x{side}x{side} float16",
            **condition_notes,
            "ema_decay": config.train.ema_decay,
            "lr": config.train.lr,
        },
        compiled={"unet": task.unet}
        | ({} if task.text_encoder is None else {"text encoder": task.text_encoder}),
    )


def setup_sr(
    preset: str,
    batch: int,
    size: int | None,
    disc: bool,
    checkpointing: bool,
    device: torch.device,
) -> Setup:
    """The SR step from target images (``disc`` does not apply); ``checkpointing`` turns the
    preset's ``train.grad_checkpointing`` on. ``size`` sets the target side, the input side
    keeping the preset's ratio (256 for 1024)."""
    from cheff.train.sr import SRTask

    config = PRESETS[preset].train_sr
    if checkpointing:
        train = dataclasses.replace(config.train, grad_checkpointing=True)
        config = dataclasses.replace(config, train=train)
    if size and size != config.data.image_size:
        low = max(1, config.low_size * size // config.data.image_size)
        try:
            data = dataclasses.replace(config.data, image_size=size)
            config = dataclasses.replace(config, data=data, low_size=low)
        except ValueError as error:
            raise SystemExit(f"sr {preset}: --image-size {size}: {error}") from None
    size, low = config.data.image_size, config.low_size
    torch.manual_seed(0)
    task = SRTask(config)
    images = torch.rand(batch, 1, size, size, device=device) * 2 - 1
    model = config.model
    return Setup(
        task=task,
        batch={"image": images},
        step=0,
        train=config.train,
        params={"sr unet": count_parameters(task.unet)},
        image_size=size,
        input=f"{size} (from {low})",
        checkpointing=config.train.grad_checkpointing,
        notes={
            "input": f"target {size} px, machex.resize to {low} px inside the step",
            "unet": f"dim {model.dim}, mults {model.dim_mults}, "
            f"attention_layers {model.attention_layers}",
            "loss": config.loss,
            "ema_decay": config.train.ema_decay,
            "lr": config.train.lr,
        },
        compiled={"unet": task.unet},
    )


MODELS: dict[str, Callable[..., Setup]] = {"ae": setup_ae, "sdm": setup_sdm, "sr": setup_sr}


# --- measuring ----------------------------------------------------------------------------


def norm_in_compute_dtype(setup: Setup) -> None:
    """``train.norm_in_compute_dtype`` on the step's latent U-Nets (what ``SDMTask`` does
    with the option set): their GroupNorms in the autocast dtype."""
    from cheff.models.unet import UNetModel

    for module in setup.task.modules().values():
        for unet in module.modules():
            if isinstance(unet, UNetModel):
                unet.norm_in_compute_dtype = True
    setup.notes["norm"] = "GroupNorm in the compute dtype"


def placed_trainer(
    setup: Setup,
    device: torch.device,
    *,
    precision: str = "auto",
    channels_last: bool = False,
    cudnn_benchmark: bool = False,
    optimizer_impl: str = "auto",
    optimizer_step: bool = True,
) -> Trainer:
    """The training loop's ``Trainer`` for ``setup``'s task, placed on ``device`` (modules,
    layout, the optimisers' kernels, the EMA) at the step index ``setup.step``: one measured
    step is its ``train_step`` on the one batch. Never compiled here, never written to disk.
    ``optimizer_step`` False: ``--no-optimizer``, the optimisers' ``step`` does nothing, so no
    Adam state is allocated (forward, backward, clipping if the preset clips, EMA)."""
    train = dataclasses.replace(
        setup.train,
        device=str(device),
        precision=precision,
        channels_last=channels_last,
        cudnn_benchmark=cudnn_benchmark,
        optimizer_impl=optimizer_impl,
        compile=False,
    )
    trainer = Trainer(Path("unused"), train, setup.task, _no_batches, max_steps=setup.step + 1)
    trainer.place()
    trainer.step = setup.step
    if not optimizer_step:
        for optimizer in setup.task.optimizers().values():
            optimizer.step = lambda *args, **kwargs: None  # type: ignore[method-assign]
    return trainer


def _no_batches(state: dict | None, device: torch.device) -> Any:
    raise AssertionError("the benchmark steps on its own batch; the trainer never fits")


# The CPU's fused attention is missing from FlopCounterMode's formulas (the CUDA kernels are
# in): the same counts as torch's for those, 2 FLOPs per multiply-add of each matmul.
def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, d_q = query
    s_k, d_v = key[2], value[3]
    return 2 * b * h * s_q * s_k * (d_q + d_v)  # q k^T, then softmax(.) v


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    b, h, s_q, d_q = query
    s_k, d_v = key[2], value[3]
    return 2 * b * h * s_q * s_k * (3 * d_q + 2 * d_v)  # scores again, dS, dV, dQ, dK


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` that also counts the CPU's fused attention (``sdm``'s U-Net)."""
    aten = torch.ops.aten
    mapping = {}
    with contextlib.suppress(AttributeError):  # a torch without the CPU kernel
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            _cpu_attention_backward_flops
        )
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _status_mib(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so that the RSS before the next model is
    built does not still hold the previous model's freed memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _prime(device: torch.device) -> None:
    """One throwaway step of a small network (convolution, attention, Adam) under a FLOP
    counter, so that one-time costs (lazy imports, kernel libraries' set-up) do not land in the
    first row's memory."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 32, 3, padding=1).to(device)
    optimizer = torch.optim.Adam(conv.parameters())
    with FlopCounterMode(display=False):
        x = conv(torch.randn(2, 4, 8, 8, device=device)).flatten(2).unsqueeze(1)
        nn.functional.scaled_dot_product_attention(x, x, x).square().mean().backward()
    optimizer.step()
    del conv, optimizer, x
    gc.collect()


def _steps(args: argparse.Namespace, warmup: int, steps: int) -> tuple[int, int]:
    warmup = warmup if args.warmup is None else args.warmup
    steps = args.steps or steps
    if steps < 1 or warmup < 0:
        raise SystemExit("--steps must be at least 1 and --warmup at least 0")
    return warmup, steps


class _AttentionOps(TorchDispatchMode):
    """Counts the fused attention kernels dispatched (which SDPA backend ran): the aten ops
    whose names contain ``attention``. The math backend decomposes into matmuls and a softmax,
    so a step that ran only it shows none."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.overloadpacket.__name__
        if "attention" in name:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def _sdpa_context(backend: str) -> Callable[[], Any]:
    """A context factory that restricts ``F.scaled_dot_product_attention`` to ``backend``
    (``auto``: torch's own choice, no restriction)."""
    if backend == "auto":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return lambda: sdpa_kernel(kinds[backend])


def backend_settings(device: torch.device) -> dict[str, Any]:
    """The math settings a step runs under: TF32, cuDNN autotuning, the enabled SDPA backends."""
    settings: dict[str, Any] = {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    if device.type == "cuda":
        cuda = torch.backends.cuda
        settings |= {
            "matmul_allow_tf32": cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_version": torch.backends.cudnn.version(),
            "sdp_enabled": {
                "flash": cuda.flash_sdp_enabled(),
                "mem_efficient": cuda.mem_efficient_sdp_enabled(),
                "cudnn": getattr(cuda, "cudnn_sdp_enabled", lambda: None)(),
                "math": cuda.math_sdp_enabled(),
            },
        }
    return settings


def _flops_by_op(counter: FlopCounterMode) -> dict[str, float]:
    """GFLOP per step by aten op over the whole step (the counter's ``Global`` entry)."""
    return _gflop_by_op(counter.get_flop_counts().get("Global", {}))


def _gflop_by_op(counts: dict[Any, float]) -> dict[str, float]:
    return {str(op): round(n / 1e9, 3) for op, n in sorted(counts.items(), key=lambda x: -x[1])}


def _first_rows(batch: dict[str, Any], rows: int) -> dict[str, Any]:
    """The batch cut to its first ``rows`` rows (tensors and lists of keys alike)."""
    return {k: v[:rows] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}


def _flops_from_small_batches(
    setup: Setup, step: Callable[[Setup], None], attention: _AttentionOps
) -> tuple[float, dict[str, float]]:
    """A step's FLOPs at its batch B from eager steps of 1 and 2 rows: every counted
    operator's FLOPs are linear in the batch, so f(B) = f(1) + (f(2) - f(1)) (B - 1)."""
    batch = len(next(v for v in setup.batch.values() if isinstance(v, (torch.Tensor, list))))
    counts = []
    for rows in (1, 2):
        counter = flop_counter()
        with counter, attention if rows == 1 else contextlib.nullcontext():
            step(dataclasses.replace(setup, batch=_first_rows(setup.batch, rows)))
        counts.append(counter.get_flop_counts().get("Global", {}))
    one, two = counts
    by_op = {op: one.get(op, 0) + (two.get(op, 0) - one.get(op, 0)) * (batch - 1)
             for op in one.keys() | two.keys()}  # fmt: skip
    return sum(by_op.values()), _gflop_by_op(by_op)


def measure(
    model: str, preset: str, batch: int, args: argparse.Namespace, device: torch.device
) -> dict:
    warmup, steps = _steps(args, *DEFAULTS[(model, preset, device.type)][1:])
    cuda = device.type == "cuda"
    channels_last = getattr(args, "channels_last", False)
    compile_ = getattr(args, "compile", False)
    sdpa = getattr(args, "sdpa", "auto")
    if compile_:
        import torch._dynamo as dynamo
        import torch._dynamo.utils as dynamo_utils

        warmup = max(warmup, 1)  # the first warm-up step compiles: its time is compile_s
        dynamo.reset()  # a fresh model per row: no recompiles against the last one
        dynamo_utils.counters.clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    else:
        _trim_heap()
    hwm_reset = not cuda and _reset_hwm()
    rss_before = 0.0 if cuda else _status_mib("VmRSS")
    hwm_before = 0.0 if cuda else _status_mib("VmHWM")

    setup = MODELS[model](
        preset, batch, args.image_size, args.disc, args.grad_checkpointing, device
    )
    if getattr(args, "norm_in_compute_dtype", False):
        norm_in_compute_dtype(setup)
    trainer = placed_trainer(
        setup,
        device,
        precision=args.precision,
        channels_last=channels_last,
        cudnn_benchmark=getattr(args, "cudnn_benchmark", False),
        optimizer_impl=getattr(args, "optimizer_impl", "auto"),
        optimizer_step=args.optimizer,
    )
    setup.batch = trainer.to_device(setup.batch)  # NHWC with --channels-last, as the loop does
    bf16 = trainer.precision == "bf16"
    restrict = _sdpa_context(sdpa)

    def step(setup: Setup = setup, trainer: Trainer = trainer) -> None:
        with restrict():
            trainer.train_step([setup.batch])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    counter, attention = flop_counter(), _AttentionOps()
    counted = False
    small_batch_flops = None
    if compile_:
        # FLOPs are counted in eager steps first (FlopCounterMode does not see inside compiled
        # graphs), on 1 and 2 rows of the batch: an eager step of the whole batch may not fit
        # where the compiled one does. Then the modules are compiled and the warm-up compiles.
        small_batch_flops = _flops_from_small_batches(setup, step, attention)
        sync()
        counted = True
        for module in setup.compiled.values():
            compile_in_place(
                module,
                getattr(args, "compile_mode", "default"),
                getattr(args, "compile_channels_last", False),
            )
    warmup_s = []
    for index in range(warmup):  # FLOPs counted in the first warm-up step (untimed anyway)
        count = index == 0 and not counted
        start = time.perf_counter()
        with (
            counter if count else contextlib.nullcontext(),
            attention if count else contextlib.nullcontext(),
        ):
            step()
        sync()
        warmup_s.append(time.perf_counter() - start)
        counted = counted or count
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    steady_s = None
    if cuda:  # as the training loop runs: no host wait between steps, one sync at the end
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        steady_s = (time.perf_counter() - start) / steps
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        memory = {"peak_mib": round(peak, 1), "method": "torch.cuda.max_memory_allocated"}
        memory["reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    else:
        hwm = _status_mib("VmHWM")
        base = rss_before if hwm_reset else hwm_before
        memory = {
            "peak_mib": round(hwm - base, 1),
            "method": "VmHWM growth over VmRSS before building (HWM reset via clear_refs)"
            if hwm_reset
            else "VmHWM growth (no HWM reset: a lower bound after a larger earlier run)",
            "process_peak_rss_mib": round(hwm, 1),
        }
    if not counted:  # no warm-up step to count in: one extra step after the timed ones
        with counter, attention:
            step()
        sync()
    trainer.stop_if_diverged()  # every loss of the row was finite, or the row fails
    try:
        waits = _host_waits(step) if cuda else None
    except Exception as error:  # a diagnostic: the timed figures above must not be lost with it
        waits = [f"check failed: {type(error).__name__}: {error}"]
    profile = None
    if getattr(args, "profile", 0):  # after the timed steps: the profiler never slows a timed one
        folder = getattr(args, "profile_trace", None)
        trace = folder / f"trace_{model}_{preset}_b{batch}.json.gz" if folder else None
        try:
            profile = step_profile.profile_steps(step, sync, args.profile, cuda, trace)
        except Exception as error:  # the timed figures above must not be lost with it
            profile = {"error": f"{type(error).__name__}: {error}"}
            print(f"warning: the profile failed ({profile['error']}); the row keeps its timings")
    flops, flops_by_op = small_batch_flops or (counter.get_total_flops(), _flops_by_op(counter))
    mean = statistics.fmean(times)
    result = {
        **_row(model, preset, batch, device, bf16, args),
        "image_size": setup.image_size,
        "input": setup.input,
        "disc": setup.disc,
        "grad_checkpointing": setup.checkpointing,
        "optimizer_step": args.optimizer,
        "optimizer_impl": _optimizer_kernels(setup.task),
        "step_index": setup.step,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "step_s": [round(t, 5) for t in times],
        "step_s_mean": mean,
        "step_s_min": min(times),
        "images_per_s": batch / mean,
        "memory": memory,
        "params": setup.params,
        "notes": setup.notes,
        "gflop_per_step": flops / 1e9,
        "gflop_per_image": flops / 1e9 / batch,
        "achieved_tflops": flops / mean / 1e12,
        "attention_ops": dict(attention.ops),
        "first_warmup_s": warmup_s[0] if warmup_s else None,
        "warmup_s": [round(t, 4) for t in warmup_s],
        "backends": backend_settings(device),
        "flops_by_op_gflop": flops_by_op,
    }
    if small_batch_flops is not None:
        result["flops_counted"] = "eager steps of 1 and 2 rows, extrapolated to the batch"

    if waits is not None:
        result["host_waits_per_step"] = waits
    if profile is not None:
        result["profile"] = profile
    if compile_:
        # The first warm-up step after compiling: compilation (forward and backward graphs) and
        # one step. An eager FLOP-counting step ran before it (not in warmup_s).
        result["compile_s"] = warmup_s[0]
        result["compiled_modules"] = list(setup.compiled)
        breaks = dynamo_utils.counters.get("graph_break", {})
        result["graph_breaks"] = {str(k): v for k, v in breaks.items()}
    if steady_s is not None:
        result["steady_step_s"] = steady_s
        result["steady_images_per_s"] = batch / steady_s
        result["steady_tflops"] = flops / steady_s / 1e12
    if cuda:
        peak_tflops = args.peak_tflops or next(
            (v for k, v in PEAK_BF16_TFLOPS if k.lower() in result["device"].lower()), None
        )
        result["peak_bf16_tflops"] = peak_tflops
        result["mfu"] = result["achieved_tflops"] / peak_tflops if peak_tflops else None
        if steady_s is not None:
            result["mfu_steady"] = result["steady_tflops"] / peak_tflops if peak_tflops else None
        if not peak_tflops:
            result["mfu_note"] = "unknown GPU: no bf16 peak (pass --peak-tflops)"
    del setup, trainer, step
    return result


def _host_waits(step: Callable[[], None]) -> list[str]:
    """Where one more step makes the host wait for the GPU (torch's CUDA sync debug mode:
    ``.item()``, blocking copies, ...), as ``file:line`` of the Python code that asked; the
    training loop's step should have none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [
        f"{Path(w.filename).name}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message).lower()
    ]


def _optimizer_kernels(task: Task) -> str:
    """Which kernels the optimisers ran: fused, foreach, loop, or torch's default."""
    groups = [g for o in task.optimizers().values() for g in o.param_groups]
    kinds = {
        "fused" if g.get("fused") else {True: "foreach", False: "loop"}.get(g.get("foreach"))
        for g in groups
    }
    return ",".join(sorted(k or "torch default" for k in kinds))


def _row(
    model: str,
    preset: str,
    batch: int,
    device: torch.device,
    bf16: bool,
    args: argparse.Namespace,
) -> dict:
    cuda = device.type == "cuda"
    step = "full" if args.optimizer else "no optimizer step"
    options = {  # the efficiency options, each named in the step column only when given
        "channels-last": getattr(args, "channels_last", False),
        f"compile {getattr(args, 'compile_mode', 'default')}": getattr(args, "compile", False),
        f"sdpa {getattr(args, 'sdpa', 'auto')}": getattr(args, "sdpa", "auto") != "auto",
        "cudnn.benchmark": getattr(args, "cudnn_benchmark", False),
        "compiled channels-last": getattr(args, "compile_channels_last", False),
        "bf16 GroupNorm": getattr(args, "norm_in_compute_dtype", False),
        f"adam {getattr(args, 'optimizer_impl', 'auto')}": (
            getattr(args, "optimizer_impl", "auto") != "auto"
        ),
    }
    inductor = dict(getattr(args, "inductor", None) or [])
    options |= {f"inductor {key}={value!r}": True for key, value in inductor.items()}
    step += "".join(f", {name}" for name, given in options.items() if given)
    return {
        "model": model,
        "preset": preset,
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU: {cpu_model()}",
        "device_type": device.type,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "threads": torch.get_num_threads(),
        "batch_size": batch,
        "step": step + (", grad ckpt" if args.grad_checkpointing else ""),
        "grad_checkpointing_asked": bool(args.grad_checkpointing),
        "channels_last": options["channels-last"],
        "compile": getattr(args, "compile", False),
        "compile_mode": getattr(args, "compile_mode", "default"),
        "sdpa": getattr(args, "sdpa", "auto"),
        "cudnn_benchmark": options["cudnn.benchmark"],
        "compile_channels_last": options["compiled channels-last"],
        "norm_in_compute_dtype": options["bf16 GroupNorm"],
        "optimizer_impl_asked": getattr(args, "optimizer_impl", "auto"),
        "inductor": inductor,
    }


def inductor_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--inductor``: a ``torch._inductor.config`` setting (dotted for a
    sub-config, e.g. ``triton.cudagraphs``) and a Python literal of its default's type."""
    import ast

    from torch._inductor import config

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    settings = config.get_config_copy()
    if key not in settings:
        raise argparse.ArgumentTypeError(f"torch._inductor.config has no setting {key!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{text!r}: VALUE must be a Python literal") from None
    default = settings[key]
    if default is not None and type(value) is not type(default):
        raise argparse.ArgumentTypeError(
            f"{key} takes a {type(default).__name__} (default {default!r}), not {value!r}"
        )
    return key, value


def set_inductor(key: str, value: Any) -> None:
    """Set one ``torch._inductor.config`` value (process-wide, for this benchmark run); the
    config module takes dotted keys of its sub-configs as they are."""
    from torch._inductor import config

    setattr(config, key, value)


def _out_of_memory(error: BaseException) -> bool:
    """A CUDA OOM, or a CPU allocation refused (by the system or an address-space limit)."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)  # also a compiled step's OOM, wrapped by torch.compile
    return "can't allocate memory" in text or "CUDA out of memory" in text


def measure_batches(
    model: str,
    preset: str,
    args: argparse.Namespace,
    device: torch.device,
    results: list[dict] | None = None,
    progress: Callable[[], None] | None = None,
) -> list[dict]:
    """One row per batch size, appended to ``results`` (``progress`` called after each); the
    first out-of-memory (CUDA, or a CPU allocation refused) ends the list with an OOM row."""
    batches = args.batch_sizes or DEFAULTS[(model, preset, device.type)][0]
    results = [] if results is None else results
    for batch in batches:
        try:
            result = measure(model, preset, batch, args, device)
        except (RuntimeError, MemoryError) as error:
            if not _out_of_memory(error):
                raise
            message = next(iter(str(error).splitlines()), type(error).__name__)
            oom = True
        else:
            oom = False
        if oom:  # outside the handler: the traceback (and the model) are released by now
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            else:
                _trim_heap()
            bf16 = device.type == "cuda" if args.precision == "auto" else args.precision == "bf16"
            result = {**_row(model, preset, batch, device, bf16, args), "oom": message}
            where = "CUDA" if device.type == "cuda" else "CPU"
            print(f"{model} {preset} batch {batch}: {where} out of memory", file=sys.stderr)
            results.append(result)
            if progress:
                progress()
            break
        mfu = result.get("mfu")
        print(
            f"measured {model} {preset} batch {batch}: {result['images_per_s']:.2f} images/s"
            + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""),
            file=sys.stderr,
            flush=True,
        )
        results.append(result)
        if progress:
            progress()
    return results


# --- report -------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    package = Path(cheff.__file__).resolve().parent

    def git(*arguments: str) -> str:  # read-only, takes no index lock
        command = ["git", "--no-optional-locks", "-C", str(package), *arguments]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):  # no git (e.g. a copied tree on a GPU host)
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", *sys.argv]),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "code": {
            "cheff": str(package),
            "commit": git("rev-parse", "--short", "HEAD") or None,
            "uncommitted_in_cheff": bool(git("status", "--porcelain", "--", ".")),
        },
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _memory(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def markdown(results: list[dict]) -> str:
    lines = [
        "| model | preset | device | precision | batch | image | disc | step | images/s | step s "
        "mean (min) | peak memory | GFLOP/img | MFU / GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        n = r["threads"]
        threads = "" if r["device_type"] == "cuda" else f" ({n} thread{'s' * (n != 1)})"
        head = (
            f"| {r['model']} | {r['preset']} | {r['device']}{threads} | {r['precision']} | "
            f"{r['batch_size']} |"
        )
        if "oom" in r:
            where = "CUDA" if r["device_type"] == "cuda" else "CPU"
            lines.append(f"{head} - | - | {r['step']} | {where} out of memory | - | - | - | - |")
            continue
        if r["device_type"] == "cuda":
            mfu = r.get("mfu")
            rate = f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a (unknown peak)"
        else:
            rate = f"{1e3 * r['achieved_tflops']:.1f} GFLOP/s"
        kind = "alloc" if r["device_type"] == "cuda" else "RSS growth"
        disc = "-" if r["disc"] is None else ("on" if r["disc"] else "off")
        lines.append(
            f"{head} {r['input']} | {disc} | {r['step']} | {r['images_per_s']:.2f} | "
            f"{r['step_s_mean']:.3f} ({r['step_s_min']:.3f}) | "
            f"{_memory(r['memory']['peak_mib'])} ({kind}) | {r['gflop_per_image']:.1f} | {rate} |"
        )
    return "\n".join(lines)


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give batch sizes as 1,2,4") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be at least 1")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", choices=sorted(MODELS))
    presets = dict.fromkeys(preset for _, preset, _ in DEFAULTS)  # paper, tiny, sdm's others
    parser.add_argument("--preset", choices=[*presets, "both"], default="both")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        metavar="N,N,...",
        help="per device, comma-separated, one row each (default: by model/preset/device)",
    )
    batch.add_argument(
        "--batch-size",
        type=_batch_sizes,
        dest="batch_sizes",
        metavar="N",
        help="one batch size per device",
    )
    parser.add_argument(
        "--image-size", type=int, help="default: the preset's (256, tiny 32; sr 1024, tiny 64)"
    )
    parser.add_argument("--warmup", type=int, help="untimed steps first (default by preset)")
    parser.add_argument("--steps", type=int, help="timed steps (default by preset)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: all CPUs)")
    parser.add_argument(
        "--disc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ae: the step includes the discriminator phase (default: on)",
    )
    parser.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="sdm, sr: the preset's train.grad_checkpointing on (U-Net blocks or levels, "
        "encoder layers)",
    )
    parser.add_argument(
        "--optimizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the step ends with optimizer.step() (default); --no-optimizer leaves it out, so no "
        "Adam state is allocated: forward, backward, EMA only (not a training step)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, TFLOP/s")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="modules (4-d weights) and the input batch in torch.channels_last (NHWC)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="nn.Module.compile() (torch.compile, default mode) on the modules the step calls, "
        "after eager FLOP-counting steps on 1 and 2 rows; the first warm-up step compiles "
        "(its time is compile_s)",
    )
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile's mode with --compile: max-autotune tunes the convolution and "
        "matrix kernels (long compiles), reduce-overhead adds CUDA graphs",
    )
    parser.add_argument(
        "--compile-channels-last",
        action="store_true",
        help="with --compile: train.compile_channels_last (Inductor lays the convolutions and "
        "the kernels around them out channels-last; no NCHW <-> NHWC transposes in cuDNN)",
    )
    parser.add_argument(
        "--sdpa",
        choices=SDPA_BACKENDS,
        default="auto",
        help="restrict F.scaled_dot_product_attention to one backend (torch.nn.attention."
        "sdpa_kernel); auto: torch's choice. The fused kernels that ran are recorded either way",
    )
    parser.add_argument(
        "--norm-in-compute-dtype",
        action="store_true",
        help="sdm: train.norm_in_compute_dtype, the U-Net's GroupNorms in bf16 under autocast "
        "(fp32 statistics) instead of the official fp32 round trip",
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="torch.backends.cudnn.benchmark = True (cuDNN autotunes each convolution shape)",
    )
    parser.add_argument(
        "--optimizer-impl",
        choices=OPTIMIZER_IMPLS,
        default="auto",
        help="train.optimizer_impl: Adam's kernels (auto, as cheff train: fused on CUDA, "
        "torch's default on the CPU)",
    )
    parser.add_argument(
        "--inductor",
        type=inductor_setting,
        action="append",
        metavar="KEY=VALUE",
        help="with --compile: set torch._inductor.config.KEY (repeatable), e.g. "
        "coordinate_descent_tuning=True or conv_1x1_as_mm=True; VALUE is a Python literal",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the timed steps, N more under torch.profiler: where the step's time goes "
        "(GPU: kernel time by kind and the GPU's busy share; CPU: operators' self time), kept "
        "in the row's 'profile' and printed (benchmarks/step_profile.py)",
    )
    parser.add_argument(
        "--profile-trace",
        type=Path,
        metavar="DIR",
        help="with --profile: also write each row's trace to DIR/trace_MODEL_PRESET_bBATCH."
        "json.gz (Chrome/Perfetto format)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="write every figure to this JSON file (rewritten after each row: a killed run "
        "keeps the rows measured so far, with complete false)",
    )
    args = parser.parse_args()

    device = select_device(args.device)
    if device.type not in ("cpu", "cuda"):
        device = torch.device("cpu")  # MPS: no peak-memory or FLOP reference here
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    presets = ["tiny", "paper"] if args.preset == "both" else [args.preset]
    for preset in presets:
        if (args.model, preset, device.type) not in DEFAULTS:
            parser.error(f"{args.model} has no preset {preset} (conditioned presets are sdm's)")
    if args.grad_checkpointing and args.model not in ("sdm", "sr"):
        parser.error("--grad-checkpointing is an sdm and sr setting")
    if args.norm_in_compute_dtype and args.model != "sdm":
        parser.error("--norm-in-compute-dtype is an sdm setting")
    fp32 = args.precision == "fp32" or (args.precision == "auto" and device.type != "cuda")
    if args.norm_in_compute_dtype and fp32:
        parser.error("--norm-in-compute-dtype changes nothing in fp32: add --precision bf16")
    if args.inductor and not args.compile:
        parser.error("--inductor sets torch.compile's Inductor: add --compile")
    if args.compile_channels_last and not args.compile:
        parser.error("--compile-channels-last sets torch.compile's Inductor: add --compile")
    for key, value in args.inductor or []:
        set_inductor(key, value)
    if args.profile < 0 or (args.profile_trace and not args.profile):
        parser.error("--profile takes a number of steps >= 1; --profile-trace needs --profile")
    info = machine(device)
    _prime(device)
    results: list[dict] = []

    def save(complete: bool) -> None:
        if args.json:
            document = {"machine": info, "results": results, "complete": complete}
            partial = args.json.with_name(args.json.name + ".part")
            partial.write_text(json.dumps(document, indent=2, default=str) + "\n")
            partial.replace(args.json)

    for preset in presets:
        measure_batches(args.model, preset, args, device, results, lambda: save(False))

    print(markdown(results))
    print()
    described = set()
    for r in results:
        if "oom" in r or r["preset"] in described:
            continue
        described.add(r["preset"])
        params = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in r["params"].items())
        notes = ", ".join(f"{k} {v}" for k, v in r["notes"].items())
        print(
            f"- {r['preset']}: parameters {params}; step index {r['step_index']} "
            f"({notes}); {r['warmup_steps']} warm-up + {r['timed_steps']} timed steps; "
            f"memory: {r['memory']['method']}"
        )
    if not args.optimizer:
        print("- No optimizer.step() (--no-optimizer): no Adam state; not a training step.")
    for r in results:
        if "oom" in r:
            print(f"- {r['preset']} batch {r['batch_size']}: {r['oom']}")
    for r in results:
        if "profile" in r and "error" not in r["profile"]:
            print(f"\n{r['model']} {r['preset']} batch {r['batch_size']}, {r['step']}:\n")
            print(step_profile.markdown(r["profile"]))
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    code = info["code"]
    print(
        f"\nMachine: {info['cpu']}, {info['cpus']} CPUs, {info['threads']} torch threads"
        f"{', GPU ' + info['gpu'] if 'gpu' in info else ''}; {info['platform']}; Python "
        f"{info['python']}, torch {info['torch']}. Date: {info['date']}. Command: "
        f"`{info['command']}`. Code: commit `{code['commit']}`"
        f"{', uncommitted changes under cheff/' if code['uncommitted_in_cheff'] else ''}."
        f" Load average (1, 5, 15 min) {info['load_average_start']} at the start, "
        f"{info['load_average_end']} at the end. Synthetic input batch on the device (no data "
        "pipeline)."
    )
    save(True)


if __name__ == "__main__":
    main()
