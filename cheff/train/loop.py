"""The training loop every Cheff model shares. It knows nothing of autoencoders or diffusion.

A :class:`Task` owns the modules, their optimisers and the losses; the loop owns everything
that must be right once for all of them: devices and precision, gradient accumulation and
clipping, EMA, atomic checkpoints with exact resume, logging, sample grids, and what to do when
a loss goes non-finite or a sample cannot be read.

Several processes (``torchrun``): each rank computes the task's loss behind
``DistributedDataParallel`` and rank 0 alone logs and writes (``cheff.train.distributed``).

No host synchronisation in a step: a step reads no value back from the device, so on a GPU
the host queues the next step while the device runs this one. Logged values stay on the device
until a log step, and a non-finite loss is noted there (:class:`FiniteWatch`) and acted on at
the next log, grid or checkpoint step, always before anything of the diverged weights is
written.

Exact resume: the global, numpy and Python RNGs, the task's own generator, the optimisers, the
EMA and the data position (``MaCheXStream.state_dict``) are saved with every checkpoint; the
``DataLoader`` gets a generator of its own so creating an iterator never draws from the global
RNG. On a CPU a resumed run reproduces the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shlex
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from cheff.config import TrainConfig
from cheff.train import distributed
from cheff.train.stopping import StopNotice, TrainingStopped
from machex.folders import write_atomic

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
WEIGHTS_SUFFIX = ".safetensors"
STEP_DIGITS = 8


#: Written into the run folder when a stop signal stopped it (cheff.train.stopping); removed
#: when the run goes on.
STOPPED_FILE = "stopped.json"


class TrainingError(RuntimeError):
    """The run stopped; the message says why and which checkpoint is the last good one."""


class Task(Protocol):
    """What the loop trains. ``losses`` run in order, each with its own optimiser; a loss is
    recomputed from the batch for each (as Lightning does with several optimisers)."""

    losses: tuple[str, ...]  # optimiser names, in the order they step

    def modules(self) -> dict[str, nn.Module]: ...  # saved as weights, moved to the device

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    # The loss and the values to log, as detached 0-d tensors (read only at log steps).
    def loss(
        self, name: str, batch: dict[str, Any], step: int, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]: ...

    def active(self, name: str, step: int) -> bool: ...  # e.g. the discriminator from a step on

    def images(self, batch: dict[str, Any]) -> Tensor: ...  # a grid source: (N, C, H, W) [-1, 1]

    def save_weights(self, folder: Path, step: int) -> None: ...

    def load_weights(self, folder: Path) -> None: ...


@dataclass(frozen=True)
class RunInfo:
    """What the loop decided, printed at the start and written to ``run.json``."""

    device: str
    precision: str
    batch_size: int
    grad_accum: int
    world_size: int
    effective_batch: int
    lr: float
    max_steps: int
    start_step: int


def select_device(name: str) -> torch.device:
    """``auto``: CUDA, then Apple's MPS, then the CPU; a named device must exist."""
    from cheff.devices import DeviceError, resolve_device

    try:
        return resolve_device(name)
    except DeviceError as error:
        raise TrainingError(str(error)) from None


class EMA:
    """An exponential moving average of a module's floating-point parameters and buffers."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {
            k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One multi-tensor kernel per dtype and device, instead of one per tensor."""
        state = module.state_dict()
        averages = list(self.shadow.values())
        torch._foreach_lerp_(averages, [state[k] for k in self.shadow], 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The averages only: the decay stays the one this run was given (a resumed run may
        change it; the stored one is kept in the state for the record)."""
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)


class FiniteWatch:
    """The first non-finite value among a run's losses (and gradient norms), noted on their
    device.

    Asking each step whether its loss is finite makes the host wait for the device; instead each
    value updates a record on the device, and the loop reads it (:meth:`first`) at its log, grid
    and checkpoint steps, before it writes anything. The diverged steps in between only cost
    time: their weights are never saved. ``labels``: what may be observed, e.g. ``"ae loss"``
    (the same on every rank, in the same order)."""

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self._record: tuple[Tensor, Tensor, Tensor] | None = None  # step (-1: all finite),
        # label index, value; int64 and float32, which every device has (MPS has no float64)

    def observe(self, label: str, value: Tensor, step: int) -> None:
        value = value.detach().reshape(()).float()
        if self._record is None or self._record[2].device != value.device:
            minus_one = torch.full((), -1, dtype=torch.int64, device=value.device)
            self._record = (minus_one, minus_one, torch.zeros((), device=value.device))
        first_step, index, first_value = self._record
        new = (first_step < 0) & ~torch.isfinite(value)
        # Python numbers go to the kernel as arguments: no copy to the device, no wait.
        self._record = (
            torch.where(new, step, first_step),
            torch.where(new, self.labels.index(label), index),
            torch.where(new, value, first_value),
        )

    def first(self) -> tuple[int, str, float] | None:
        """This rank's first non-finite value: (step, label, value), or None (a read)."""
        if self._record is None:
            return None
        step, index, value = (t.item() for t in self._record)
        return None if step < 0 else (int(step), self.labels[int(index)], float(value))


class MetricsLog:
    """``metrics.csv`` (always) and TensorBoard (when the package is installed)."""

    def __init__(self, run: Path, start_step: int = 0) -> None:
        self.path = run / "metrics.csv"
        self._fields: list[str] | None = None
        if self.path.is_file():  # a resumed run: drop rows logged after its checkpoint
            with open(self.path, newline="") as handle:
                rows = list(csv.reader(handle))
            if rows:
                self._fields = rows[0]
                kept = [r for r in rows[1:] if r and int(r[0]) <= start_step]
                with open(self.path, "w", newline="") as handle:
                    csv.writer(handle).writerows([self._fields, *kept])
        try:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run: events past its checkpoint's step are purged, as the CSV's rows.
            purge = start_step + 1 if start_step > 0 else None
            self._tensorboard = SummaryWriter(str(run / "tensorboard"), purge_step=purge)
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            self._tensorboard = None

    def write(self, step: int, values: Mapping[str, float]) -> None:
        row = {"step": step, **values}
        new = [key for key in row if key not in (self._fields or [])]
        if new:  # a value that starts later (the discriminator's): widen the header
            self._fields = [*(self._fields or []), *new]
            self._rewrite()
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self._fields).writerow(row)
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)

    def _rewrite(self) -> None:
        old = []
        if self.path.is_file():
            with open(self.path, newline="") as handle:
                old = list(csv.DictReader(handle))
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self._fields)
            writer.writeheader()
            writer.writerows(old)
        tmp.replace(self.path)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(run: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (a ``.tmp`` folder is never finished)."""
    folder = run / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG, as tensors and plain values only (the file loads weights-only)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": random.getstate(),
        "task": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["task"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU the writing process saw; a run resumed on fewer GPUs (or ranks
        # that each see one) restores those it has.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _hyper_parameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """An optimiser group's settings that a run's config sets (not its parameters)."""
    return {k: group[k] for k in ("lr", "betas", "weight_decay", "eps") if k in group}


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _warn_changed_settings(stored: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """A resumed run may change settings (a lower lr, more steps); say which, so that a
    changed model or data setting is never a surprise."""
    before, after = _flatten(stored), _flatten(current)
    changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()}
    changed = {k: pair for k, pair in changed.items() if pair[0] != pair[1]}
    for key in sorted(changed):
        if key not in before:  # a setting added to cheff since that run was started
            log.warning(
                "resumed with %s = %r (a setting the checkpoint's run did not record: it "
                "predates it)",
                key,
                after[key],
            )
            continue
        log.warning("resumed with %s = %r (the checkpoint's run had %r)", key, *changed[key][::-1])


#: The settings that choose a run's images: the saved stream position counts images of that
#: selection, so a resume may not change them (``data.data`` may move).
SELECTION = ("data.sources", "data.where", "data.composition", "data.holdout")


def _selection_change(stored_file: Path, current: Mapping[str, Any]) -> str | None:
    """Why a resume is refused, or None: its image selection differs from the run's
    (``config.json``), so the stream would go on at the saved position of another order over
    other images, and the epoch count would change, without an error. Sources are compared
    as a set of names (order and aliases do not change the images)."""
    try:
        before = _flatten(json.loads(stored_file.read_text()))
    except (OSError, ValueError) as error:  # absent, or cut short by a crash: cannot tell
        log.warning("%s unreadable (%s): the image selection is not checked", stored_file, error)
        return None
    after = _flatten(current)

    def same(key: str) -> bool:
        old, new = before[key], after.get(key)
        if key == "data.sources":
            from machex.manifests import source_names

            return sorted(source_names(old or [])) == sorted(source_names(new or []))
        return old == new

    changed = [k for k in SELECTION if k in before and not same(k)]
    if not changed:
        return None
    what = ", ".join(f"{k}: {before[k]!r} -> {after.get(k)!r}" for k in changed)
    keep = " ".join(f"--set {shlex.quote(f'{k}={_as_setting(before[k])}')}" for k in changed)
    return (
        f"{stored_file.parent} was trained on another selection of images ({what}); resume "
        f"with the run's own ({keep}), or start a new --run"
    )


def _as_setting(value: Any) -> str:
    """A config value as ``--set KEY=VALUE`` writes it."""
    if value is None:
        return "none"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# --------------------------------------------------------------------------- the loop


class Trainer:
    """Runs ``task`` for ``config.max_steps`` optimiser steps over ``batches``.

    ``make_batches(data_state, device) -> (iterator, state_fn)``: a fresh batch iterator
    positioned at ``data_state`` (``None``: the start) for the run's device (a CUDA run's
    batches come in pinned memory), and a function giving the position after the batches
    taken so far (saved with each checkpoint).
    """

    def __init__(
        self,
        run: Path,
        config: TrainConfig,
        task: Task,
        make_batches: Callable[
            [dict | None, torch.device], tuple[Iterator[dict], Callable[[], dict]]
        ],
        *,
        max_steps: int,
        run_config: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        self.run = Path(run)
        self.config = config
        self.task = task
        self.make_batches = make_batches
        self.max_steps = max_steps
        self.run_config = dict(run_config or {})
        self.progress = progress
        self.device = distributed.local_device(select_device(config.device))
        bf16 = config.precision == "bf16" or (
            config.precision == "auto" and self.device.type == "cuda"
        )
        self.precision = "bf16" if bf16 else "fp32"
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.step = 0
        self.ema: EMA | None = None
        self.watch = FiniteWatch(
            tuple(f"{name} loss" for name in task.losses)
            + tuple(f"{name} gradient norm" for name in task.losses)
        )
        self._loss_fn: Any = None  # the task's loss, behind DDP on several ranks (made once)

    # -- set-up ------------------------------------------------------------------------------

    def _prepare(self, resume: bool) -> dict | None:
        from machex.folders import FolderError, make_folder

        try:
            make_folder(self.run, "--run")
        except FolderError as error:
            raise TrainingError(str(error)) from None
        torch.manual_seed(self.config.seed)
        np.random.seed(self.config.seed % 2**32)
        random.seed(self.config.seed)
        self.place()
        if self.config.compile:
            for module in _compile_targets(self.task):
                compile_in_place(
                    module, self.config.compile_mode, self.config.compile_channels_last
                )
        existing = self._checkpoints_seen_by_all()
        if existing and not resume:
            raise TrainingError(
                f"{self.run} already holds checkpoints (last: {existing[-1].name}); pass "
                "--resume to continue that run, or choose another --run folder"
            )
        if resume and existing:
            # Rank 0 checks (the others would read the file while it rewrites it) and tells all.
            refused = None
            if distributed.is_main():
                refused = _selection_change(self.run / "config.json", self.run_config)
            refused = distributed.from_main(refused)
            if refused:
                raise TrainingError(refused)
        data_state = self._load(existing[-1]) if resume and existing else None
        if resume and not existing:
            log.warning("%s has no checkpoint yet: starting from step 0", self.run)
        if distributed.is_main():  # after the load: a refused resume leaves the run's as it was
            write_atomic(self.run / "config.json", json.dumps(self.run_config, indent=2) + "\n")
        return data_state

    def place(self) -> None:
        """The task's modules on the device (and layout), the optimisers' kernels chosen for
        it, the EMA started: all a step needs but compilation (``benchmarks/bench_train.py``
        steps a placed trainer, compiling where it chooses)."""
        from cheff.train.optimizers import use_kernels

        if self.device.type == "cuda":  # process-wide, as cuDNN's setting is
            torch.backends.cudnn.benchmark = self.config.cudnn_benchmark
        for module in self.task.modules().values():
            module.to(self.device)
            if self.config.channels_last:
                module.to(memory_format=torch.channels_last)
        for optimizer in self.task.optimizers().values():
            use_kernels(optimizer, self.config.optimizer_impl, self.device)
        if self.config.ema_decay is not None:
            self.ema = self._fresh_ema()

    def _fresh_ema(self) -> EMA:
        """An EMA of the task's first module (the one trained), from its weights now."""
        assert self.config.ema_decay is not None
        return EMA(next(iter(self.task.modules().values())), self.config.ema_decay)

    def _checkpoint_folder(self) -> Path:
        """Where the checkpoint of the current step goes."""
        return self.run / CHECKPOINTS / f"step-{self.step:0{STEP_DIGITS}d}"

    def _checkpoints_seen_by_all(self) -> list[Path]:
        """The run's checkpoints as rank 0 sees them; every rank must see the last one (a run
        folder on node-local disk would start the other nodes from scratch)."""
        existing = checkpoint_dirs(self.run)
        if distributed.rank_and_world()[1] == 1:
            return existing
        names = distributed.from_main([p.name for p in existing])
        existing = [self.run / CHECKPOINTS / name for name in names]
        if not distributed.all_ranks(not existing or existing[-1].is_dir()):
            raise TrainingError(
                f"not every rank sees {existing[-1]}: --run-dir must be on a filesystem "
                "that all nodes share"
            )
        return existing

    def _load(self, folder: Path) -> dict:
        from cheff.checkpoints import CheckpointError, safe_torch_load
        from cheff.train.optimizers import use_kernels

        try:
            self.task.load_weights(folder)
        except CheckpointError as error:  # e.g. `train ae --resume` on an SDM run
            held = sorted(path.name for path in folder.iterdir())
            raise TrainingError(
                f"cannot resume from {folder}: {error}; it holds {held}: the checkpoint of "
                "another kind of run? Resume a run with the command that started it"
            ) from None

        state = safe_torch_load(folder / STATE_FILE)
        for name, optimizer in self.task.optimizers().items():
            # The moments come from the checkpoint; the hyper-parameters from this run's
            # settings (load_state_dict would silently bring back the stored lr and betas).
            asked = [_hyper_parameters(group) for group in optimizer.param_groups]
            optimizer.load_state_dict(state["optimizers"][name])
            for group, settings in zip(optimizer.param_groups, asked):
                group.update(settings)
            use_kernels(optimizer, self.config.optimizer_impl, self.device)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        elif self.ema is not None:  # switched on at this resume: average from the loaded weights
            log.warning("%s holds no EMA: the EMA starts from its weights", folder)
            self.ema = self._fresh_ema()
        _warn_changed_settings(state.get("config") or {}, self.run_config)  # lr, decay, ...
        _set_rng_state(state["rng"], self.generator)
        self.step = int(state["step"])
        log.info("resumed %s at step %d", folder, self.step)
        return state["data"]

    def info(self) -> RunInfo:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return RunInfo(
            device=str(self.device),
            precision=self.precision,
            batch_size=self.config.batch_size,
            grad_accum=self.config.grad_accum,
            world_size=world,
            effective_batch=self.config.batch_size * self.config.grad_accum * world,
            lr=self.config.lr,
            max_steps=self.max_steps,
            start_step=self.step,
        )

    # -- saving ------------------------------------------------------------------------------

    def save(self, data_state: dict) -> Path:
        """Write ``step-N/`` atomically (a ``.tmp`` folder renamed), then keep the last K."""
        folder = self._checkpoint_folder()
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            self.task.save_weights(tmp, self.step)
            state = {
                "step": self.step,
                "optimizers": {k: o.state_dict() for k, o in self.task.optimizers().items()},
                "ema": None if self.ema is None else self.ema.state_dict(),
                "rng": _rng_state(self.generator),
                "data": data_state,
                "config": self.run_config,
            }
            torch.save(state, tmp / STATE_FILE)
            _sync_files(tmp)  # on disk before the name says the checkpoint is complete
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
            _sync_files(folder.parent, folders_only=True)  # the rename itself
        except (OSError, RuntimeError, SafetensorError) as error:
            # A full disk: an OSError from Python, a RuntimeError from torch.save's writer, a
            # SafetensorError from safetensors.
            shutil.rmtree(tmp, ignore_errors=True)
            last = checkpoint_dirs(self.run)
            raise TrainingError(
                f"could not write the checkpoint of step {self.step} ({error}); the last good "
                f"one is {last[-1] if last else 'none'}; free space and run again with --resume"
            ) from None
        for old in checkpoint_dirs(self.run)[: -self.config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def _save_grid(self, batch: dict) -> None:
        from PIL import Image

        with torch.no_grad(), self._autocast():
            images = self.task.images(batch).float().clamp(-1, 1).cpu()
        images = ((images.mean(dim=1) + 1) * 127.5).round().to(torch.uint8)  # grey (N, H, W)
        rows = [torch.cat(list(images[i : i + 8]), dim=1) for i in range(0, len(images), 8)]
        width = max(r.shape[1] for r in rows)
        rows = [torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows]
        folder = self.run / "images"
        folder.mkdir(exist_ok=True)
        Image.fromarray(torch.cat(rows, dim=0).numpy()).save(folder / f"step-{self.step:08d}.png")

    # -- training ----------------------------------------------------------------------------

    def _autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def to_device(self, batch: dict) -> dict:
        def move(value: Any) -> Any:
            if not isinstance(value, Tensor):
                return value
            value = value.to(self.device, non_blocking=True)
            if self.config.channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
            return value

        return {k: move(v) for k, v in batch.items()}

    def _loss_function(self) -> Any:
        """The task's loss: itself on one process, behind DDP on several (wrapped once)."""
        if self._loss_fn is None:
            several = distributed.rank_and_world()[1] > 1
            self._loss_fn = distributed.wrap(self.task, self.device) if several else self.task.loss
        return self._loss_fn

    def fit(self, *, resume: bool = False) -> RunInfo:
        data_state = self._prepare(resume)
        if self.step > self.max_steps:
            raise TrainingError(
                f"{self.run} is at step {self.step}, past --max-steps {self.max_steps}: give "
                "a larger --max-steps to train further"
            )
        info = self.info()
        if resume and self.step == self.max_steps:
            log.warning("%s already reached step %d: nothing to train", self.run, self.step)
            return info
        main = distributed.is_main()
        log.info(
            "training on %s (%s): effective batch %d (%d per device x %d accumulated x %d "
            "devices), learning rate %g (never rescaled), steps %d to %d",
            info.device,
            info.precision,
            info.effective_batch,
            info.batch_size,
            info.grad_accum,
            info.world_size,
            info.lr,
            info.start_step,
            info.max_steps,
        )
        if main:
            (self.run / "run.json").write_text(json.dumps(asdict(info), indent=2) + "\n")
            (self.run / STOPPED_FILE).unlink(missing_ok=True)  # going on
        batches, position = self.make_batches(data_state, self.device)
        metrics = MetricsLog(self.run, self.step) if main else None
        self._loss_function()  # DDP wraps the task now, before the first batch is drawn
        last_batch: dict | None = None
        bar = _Progress(self.progress and main, self.max_steps, self.step)
        started, steps_timed = time.perf_counter(), 0
        shown: dict[str, float] = {}  # the last logged values, for the progress bar
        notice, saved_at, stopped = StopNotice(), -1, False
        with notice.listening():
            try:
                while self.step < self.max_steps:
                    finished = position()  # the data of every finished step, for a stop
                    try:
                        group = [
                            self.to_device(next(batches)) for _ in range(self.config.grad_accum)
                        ]
                    except Exception:
                        # A SIGTERM sent to the whole job killed the DataLoader workers as well:
                        # one rank can still checkpoint the steps it finished; several could not
                        # agree on it (the others may be in a collective of the next step).
                        if notice.received is None or distributed.rank_and_world()[1] > 1:
                            raise
                        stopped = True
                        break
                    last_batch = group[-1]
                    logs = self.train_step(group)
                    self.step += 1
                    steps_timed += 1
                    log_now = self.step % self.config.log_every == 0 or self.step == self.max_steps
                    grid_now = self.step % self.config.image_every == 0
                    save_now = self.step % self.config.checkpoint_every == 0
                    save_now = save_now or self.step == self.max_steps
                    if log_now or grid_now or save_now:
                        self.stop_if_diverged()  # reads the device: only at these steps
                    if save_now:
                        self._stop_if_weights_diverged()
                    if log_now:
                        shown = distributed.mean_over_ranks(logs)
                        elapsed = time.perf_counter() - started
                        shown["it_per_s"] = steps_timed / elapsed if elapsed > 0 else math.nan
                        shown["lr"] = self.config.lr
                        if metrics is not None:
                            metrics.write(self.step, shown)
                        started, steps_timed = time.perf_counter(), 0
                    bar.advance(self.step, shown)
                    if grid_now and main:
                        self._save_grid(last_batch)
                    if save_now:
                        if main:
                            self.save(position())
                        distributed.barrier()  # no rank runs ahead of a checkpoint being written
                        saved_at = self.step
                    if self.step < self.max_steps and self._stop_requested(notice, save_now):
                        stopped, finished = True, position()  # this step's data is trained on
                        break
                if stopped:  # mid-group, the micro-batches read for the step are not counted
                    self._stop_on(notice.received, finished, saved_at)
            finally:
                bar.close()
                if metrics is not None:
                    metrics.close()
                # The DDP wrapper holds the process group's pending work: let it go before the
                # group is destroyed (a gloo rank kept it to interpreter exit once and aborted).
                self._loss_fn = None
        if main and last_batch is not None and self.step % self.config.image_every:
            self._save_grid(last_batch)
        return info

    def _stop_requested(self, notice: StopNotice, save_step: bool) -> bool:
        """Whether a stop signal came (to any rank): one rank looks every step; several agree
        every ``stop_check_every`` steps and at checkpoints, all at the same step."""
        if distributed.rank_and_world()[1] == 1:
            return notice.received is not None
        if not save_step and self.step % self.config.stop_check_every:
            return False
        return not distributed.all_ranks(notice.received is None)

    def _stop_on(self, signal_name: str | None, data_state: dict, saved_at: int) -> None:
        """Checkpoint the finished steps (unless this step's is written) with ``data_state``,
        where their data ends, and stop; every rank calls it (``signal_name`` None on a rank
        that was not signalled itself)."""
        if saved_at != self.step:
            self.stop_if_diverged()
            self._stop_if_weights_diverged()
            if distributed.is_main():
                self.save(data_state)
            distributed.barrier()
        folder = self._checkpoint_folder()
        by = signal_name or "a stop signal to another rank"
        if distributed.is_main():  # what a job script tests to requeue (torchrun exits 1)
            record = {"signal": signal_name, "step": self.step, "checkpoint": str(folder)}
            write_atomic(self.run / STOPPED_FILE, json.dumps(record, indent=2) + "\n")
        raise TrainingStopped(
            f"stopped by {by} at step {self.step} of {self.max_steps}; the checkpoint "
            f"{folder} is written: run the same command with --resume to go on",
            signal_name or "SIGTERM",
        )

    def train_step(self, group: list[dict]) -> dict[str, Tensor]:
        """One optimiser step over ``group``, micro-batches already on the device (gradient
        accumulation over them), without waiting for the device: the values to log come back
        as device tensors, and each loss goes to :attr:`watch`. The step index stays
        ``self.step``. The loss is the task's, behind DDP on several ranks."""
        loss_function = self._loss_function()
        modules, optimizers = self.task.modules(), self.task.optimizers()
        logs: dict[str, Tensor] = {}
        for name in self.task.losses:
            if not self.task.active(name, self.step):
                continue
            for module in modules.values():
                module.zero_grad(set_to_none=True)
            for index, batch in enumerate(group):
                # DDP reduces the gradients once, in the group's last backward.
                with self._no_sync(loss_function, index == len(group) - 1):
                    with self._autocast():
                        loss, values = loss_function(name, batch, self.step, self.generator)
                    # Named by the step's number (1-based), as metrics.csv and checkpoints are.
                    self.watch.observe(f"{name} loss", loss, self.step + 1)
                    (loss / len(group)).backward()
                for key, value in values.items():
                    share = value.float() / len(group)  # float32: MPS has no float64
                    logs[key] = logs[key] + share if key in logs else share
            if self.config.grad_clip is not None:
                params = [p for g in optimizers[name].param_groups for p in g["params"]]
                norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
                self.watch.observe(f"{name} gradient norm", norm, self.step + 1)
                logs[f"{name}/grad_norm"] = norm.detach()
            optimizers[name].step()
        if self.ema is not None:
            self.ema.update(next(iter(modules.values())))
        return logs

    def stop_if_diverged(self) -> None:
        """Raise :class:`TrainingError` (on every rank together) if a loss or a watched
        gradient norm was not finite since the start, naming its step and the last good
        checkpoint."""
        mine, labels = self.watch.first(), self.watch.labels
        # Ranks agree on the earliest (step, label) with one reduction of step x labels + index.
        key = math.inf if mine is None else mine[0] * len(labels) + labels.index(mine[1])
        key = distributed.smallest_over_ranks(key)
        if key == math.inf:
            return
        step, index = divmod(int(key), len(labels))
        label = labels[index]
        rank, world = distributed.rank_and_world()
        if world == 1:
            assert mine is not None
            what = f"is {mine[2]}"
        elif mine is not None and mine[:2] == (step, label):
            what = f"is not finite (rank {rank} has {mine[2]})"
        else:
            what = f"is not finite on another rank (rank {rank}'s was finite)"
        raise TrainingError(f"the {label} {what} at step {step}; {self._stopped()}")

    def _stop_if_weights_diverged(self) -> None:
        """Raise before a checkpoint of weights that are not finite. Finite losses can still
        come with non-finite gradients (an overflow in the backward pass) when nothing clips
        them; all ranks hold the same weights, so all decide alike. One read per checkpoint."""
        params = [
            p
            for module in self.task.modules().values()
            for p in module.parameters()
            if p.requires_grad
        ]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise TrainingError(
                f"the weights of the checkpoint of step {self.step} are not finite (the losses "
                f"were: a gradient was not, e.g. an overflow); {self._stopped()}"
            )

    def _stopped(self) -> str:
        last = checkpoint_dirs(self.run)
        return f"stopped without saving. Last good checkpoint: {last[-1] if last else 'none'}"

    @staticmethod
    def _no_sync(loss_function: Any, last_in_group: bool) -> Any:
        """DDP's ``no_sync`` for every micro-batch of an accumulation group but the last."""
        if last_in_group or not hasattr(loss_function, "no_sync"):
            return nullcontext()
        return loss_function.no_sync()


def _sync_files(folder: Path, *, folders_only: bool = False) -> None:
    """fsync the files in ``folder`` (unless ``folders_only``) and the folder itself: after a
    crash or power loss, a checkpoint folder renamed to its final name then holds whole files
    (a rename can reach the disk before the data it names). Where a folder cannot be opened
    for syncing (Windows), its files still are."""
    if not folders_only:
        for path in folder.iterdir():
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some filesystems refuse to sync a folder
        pass
    finally:
        os.close(descriptor)


def compile_in_place(module: nn.Module, mode: str, channels_last: bool = False) -> None:
    """``torch.compile`` ``module`` in place (its state dict keeps its keys), in ``mode``;
    ``channels_last`` forces Inductor's channels-last layout (``train.compile_channels_last``).
    torch.compile takes a mode or Inductor options, never both, so with the layout option the
    mode is passed as its options."""
    if not channels_last:
        module.compile(mode=mode)
        return
    from torch._inductor import list_mode_options

    module.compile(options={**list_mode_options(mode), "force_layout_optimization": True})


def _compile_targets(task: Task) -> list[nn.Module]:
    """What ``train.compile`` compiles: the task's ``compile_targets()`` if it names them (the
    autoencoder's encoder and decoder, whose methods are not ``forward``), else every module
    with trained parameters."""
    named = getattr(task, "compile_targets", None)
    if named is not None:
        return list(named())
    return [m for m in task.modules().values() if any(p.requires_grad for p in m.parameters())]


class _Progress:
    """A rich progress bar with the loss and it/s (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self._bar = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            transient=False,
        )
        self._task = self._bar.add_task("train", total=total, completed=start, status="")
        self._bar.start()

    def advance(self, step: int, logs: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        loss = next((v for k, v in logs.items() if k.endswith("/total")), None)
        status = "" if loss is None else f"loss {loss:.4f}"
        if "it_per_s" in logs:
            status += f"  {logs['it_per_s']:.2f} it/s"
        self._bar.update(self._task, completed=step, status=status)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
