"""Stopping a run cleanly on a scheduler's notice, with a checkpoint of where it got to.

A cluster job is told before it is killed or preempted: SLURM sends ``SIGUSR1`` with
``#SBATCH --signal=USR1@120`` (two minutes ahead) and ``SIGTERM`` at the end of its time;
``kill PID`` and torchrun pass on ``SIGTERM``. :class:`StopNotice` records such a signal
instead of dying; the training loop then writes a checkpoint at the end of the step it is in
and stops with :class:`TrainingStopped`, so that ``--resume`` loses no step.

DataLoader workers ignore ``SIGUSR1`` (:func:`ignore_notice_in_worker`): its default action
would kill them and the next batch would fail before the checkpoint. ``SIGTERM`` keeps
PyTorch's own handler there (the loader stops its workers with it).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: The signals that ask a run to stop (those a platform lacks are skipped).
STOP_SIGNALS = ("SIGUSR1", "SIGTERM")


class TrainingStopped(Exception):
    """The run stopped on a signal, after writing its checkpoint; ``exit_code`` is the
    shell's for that signal (128 + its number), which a job script can test to requeue."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = 128 + int(getattr(signal, signal_name))


class StopNotice:
    """The first stop signal received while :meth:`listening` (None: none yet)."""

    def __init__(self) -> None:
        self.received: str | None = None

    @contextmanager
    def listening(self) -> Iterator[StopNotice]:
        """Record the stop signals instead of dying on them, and restore the previous handlers
        afterwards. Only the main thread may set handlers; elsewhere nothing is listened to."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous: dict[int, Any] = {}
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                previous[number] = signal.signal(number, self._record)
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _record(self, number: int, frame: object) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name


def ignore_notice_in_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker outlives ``SIGUSR1`` and ``SIGTERM`` (the
    main process records them and checkpoints; the worker is stopped with the loader, and
    exits by itself if its parent dies). torchrun and SLURM signal the whole process group:
    a worker killed by the SIGTERM made the DataLoader raise in the middle of a step, and no
    checkpoint was written."""
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_IGN)
