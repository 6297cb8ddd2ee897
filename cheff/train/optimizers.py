"""Which kernels the optimisers run (``train.optimizer_impl``), set after the modules are placed.

The tasks build their optimisers before the loop knows the device, so the loop chooses the
implementation afterwards, in each parameter group (``fused`` / ``foreach``, read by
``torch.optim.Adam.step``):

- ``fused``: one kernel pass over weights, gradients and both moments per step (torch's
  ``_fused_adam_``). An optimiser step is memory-bound on a GPU, and this one moves 32 bytes
  a parameter against ``foreach``'s 76 (``benchmarks/roofline.py`` on the paper SDM's 330 M
  parameters: 10.5 against 25.0 GB). ``auto`` chooses it on CUDA.
- ``foreach``: one kernel per operation over all tensors (torch's default on CUDA before);
- ``loop``: one tensor at a time (torch's default on the CPU, and ``auto``'s there, so that CPU
  runs stay bit for bit what they were).

All compute the same update up to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kernel_choice(impl: str, device: torch.device) -> tuple[bool | None, bool | None]:
    """``(fused, foreach)`` for a parameter group; None leaves torch's default."""
    if impl == "auto":
        return (True, None) if device.type == "cuda" else (None, None)
    return {"fused": (True, None), "foreach": (None, True), "loop": (None, False)}[impl]


def use_kernels(optimizer: torch.optim.Optimizer, impl: str, device: torch.device) -> None:
    """Set ``impl``'s kernels in every group of ``optimizer`` (call again after
    ``load_state_dict``, which brings back the stored run's choice), and move each parameter's
    ``step`` count where those kernels read it: float32 on the parameter's device for fused
    kernels (which read it as a raw float), on the CPU in its own dtype otherwise (torch's
    placement for each)."""
    fused, foreach = kernel_choice(impl, device)
    for group in optimizer.param_groups:
        if "fused" not in group:
            if impl == "auto":
                continue  # an optimiser without fused kernels keeps its own
            raise ValueError(
                f"optimizer_impl {impl!r}: {type(optimizer).__name__} has no choice of kernels"
            )
        group["fused"], group["foreach"] = fused, foreach
        on_device = bool(fused or group.get("capturable"))
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            step = state.get("step")
            if isinstance(step, Tensor):
                if on_device:
                    state["step"] = step.to(parameter.device, torch.float32)
                else:
                    state["step"] = step.to("cpu")
