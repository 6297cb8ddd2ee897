"""Which torch device a user's ``--device`` names: one rule for training, sampling and
evaluation, and an error that says what is wrong instead of torch's traceback or a silent
fallback to the CPU."""

from __future__ import annotations

import torch

NAMES = "cpu, cuda, cuda:N, mps or auto"


class DeviceError(ValueError):
    """A device that does not parse, or that this machine does not have."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``None``: CUDA when present, else the CPU. ``"auto"``: CUDA, then Apple's MPS, then the
    CPU. Anything else must parse and exist here."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {name!r}: not a device name ({NAMES})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise DeviceError(f"device {name!r}: torch sees {count} CUDA device(s), 0-{count - 1}")
    elif device.type == "mps" and not _mps_available():
        raise DeviceError(f"device {name!r} asked for, but torch sees no Apple MPS device")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {name!r}: cheff runs on {NAMES}")
    return device
