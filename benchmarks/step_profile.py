"""Where a training step's time goes: ``torch.profiler`` over a few steps, summarised.

FLOP counts say what a step must compute, step times what it costs; the gap between them (the
SDM's MFU, issue 14) is spent somewhere the FLOP counter does not look: normalisation, layout
changes, copies, launch gaps. On a GPU this profiles the device's own kernels and memory
copies: each one's time, grouped by what it does (:func:`category`, from the kernel's name),
and the share of the step's wall time in which the GPU ran anything at all (the union of the
kernel intervals): what is left is idle time, the CPU or a synchronisation holding the GPU
up. On a CPU (tests, smoke runs) it records the operators' self time instead.

The profiled steps run after the timed ones, so profiling never slows a step that is timed;
the profiler's own cost (a few microseconds per launch) makes ``device_busy_share`` a lower
bound. ``summarize_device_events`` is a pure function of the events, so its arithmetic is
tested without a GPU.
"""

from __future__ import annotations

import gzip
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: How many kernel (or CPU operator) names the summary lists, those with the most time first.
TOP = 25
#: Kernel names are cut to this many characters (template arguments run to thousands).
NAME_CHARS = 160

#: (category, pattern) in the order they are tried on a kernel or operator name; the first
#: match wins, so the specific names come first: Triton kernels are whatever compile fused;
#: cuDNN's attention kernels also say "fprop", convolution kernels also say "gemm".
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        ("compiled (Triton)", r"^triton_"),
        ("attention", r"flash|fmha|sdpa|attention|attn"),
        ("layout transform", r"nchwToNhwc|nhwcToNchw|transpose|permute"),
        ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|cudnn"),
        ("matmul", r"gemm|nvjet|cutlass|cublas|s16816|xmma|aten::(add|b)?mm\b|aten::matmul"),
        ("optimizer / EMA", r"multi_tensor_apply|adam|foreach|lerp"),
        (
            "normalization",
            r"group_?norm|layer_?norm|batch_?norm|RowwiseMoments|FusedParams|"
            r"GammaBeta|ComputeInternalGradients",
        ),  # not "norm": normal_kernel draws noise
        ("copy / fill", r"memcpy|memset|copy|fill|CatArrayBatchedCopy|aten::cat\b"),
        ("other elementwise / reduction", r"elementwise|reduce|vectorized|unrolled|aten::"),
    )
)
OTHER = "other"
#: Kineto activity types that are work on the device (not CPU ops or annotations).
DEVICE_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")


def category(name: str) -> str:
    """The kind of work a kernel or operator does, read from its name (:data:`CATEGORIES`)."""
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return OTHER


@dataclass(frozen=True)
class DeviceEvent:
    """One kernel, copy or fill that ran on the device."""

    name: str
    start_ns: int
    duration_ns: int


def busy_ns(events: Iterable[DeviceEvent]) -> int:
    """Nanoseconds in which at least one event ran (overlapping events counted once)."""
    total, end = 0, None
    for event in sorted(events, key=lambda e: e.start_ns):
        start, stop = event.start_ns, event.start_ns + event.duration_ns
        if end is None or start >= end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def summarize_device_events(events: list[DeviceEvent], steps: int, wall_s: float) -> dict[str, Any]:
    """Per-step milliseconds by category and for the :data:`TOP` kernels, and the busy share.

    ``wall_s`` is the wall time of the ``steps`` profiled steps (synchronised at both ends).
    Shares of kernel time add up to 1 over the categories; ``device_busy_share`` is the union
    of the kernel intervals over the wall time.
    """
    totals: dict[str, tuple[float, int]] = {}
    for event in events:
        ns, calls = totals.get(event.name, (0.0, 0))
        totals[event.name] = (ns + event.duration_ns, calls + 1)
    kernel_ns = sum(e.duration_ns for e in events)
    busy = busy_ns(events)
    wall_ns = wall_s * 1e9
    return {
        "kind": "device kernels",
        "steps": steps,
        "wall_ms_per_step": wall_ns / 1e6 / steps,
        "device_busy_ms_per_step": busy / 1e6 / steps,
        "device_busy_share": busy / wall_ns if wall_ns else None,
        "kernel_ms_per_step": kernel_ns / 1e6 / steps,
        "device_ops_per_step": len(events) / steps,  # kernels, copies, fills
        **_breakdown(totals, kernel_ns, steps),
    }


def _breakdown(
    totals: dict[str, tuple[float, int]], all_ns: float, steps: int
) -> dict[str, list[dict[str, Any]]]:
    """From name -> (nanoseconds, calls): the categories and the :data:`TOP` names, per step,
    most time first."""
    by_category: dict[str, float] = {}
    for name, (ns, _) in totals.items():
        by_category[category(name)] = by_category.get(category(name), 0.0) + ns
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:TOP]
    return {
        "categories": [
            {"category": label, "ms_per_step": ns / 1e6 / steps, "share": ns / all_ns}
            for label, ns in sorted(by_category.items(), key=lambda item: -item[1])
        ],
        "top": [
            {
                "name": name[:NAME_CHARS],
                "category": category(name),
                "calls_per_step": calls / steps,
                "ms_per_step": ns / 1e6 / steps,
                "share": ns / all_ns,
            }
            for name, (ns, calls) in ranked
        ],
    }


def _cpu_summary(prof: Any, steps: int, wall_s: float) -> dict[str, Any]:
    """Operators' self CPU time (exclusive, so nested operators are not counted twice)."""
    totals = {
        row.key: (row.self_cpu_time_total * 1e3, row.count)  # microseconds -> ns
        for row in prof.key_averages()
        if row.self_cpu_time_total > 0
    }
    all_ns = sum(ns for ns, _ in totals.values()) or 1.0
    return {
        "kind": "CPU operators (self time)",
        "steps": steps,
        "wall_ms_per_step": wall_s * 1e3 / steps,
        "operator_ms_per_step": all_ns / 1e6 / steps,
        **_breakdown(totals, all_ns, steps),
    }


def on_device(event: Any) -> bool:
    """Whether a Kineto event is work on the device: a kernel, copy or fill, not a CPU op or an
    annotation. ``activity_type`` is read where the event has it (torch 2.13); torch 2.11's
    events lack it (the H100 run of 2026-11-27 failed there), so the device type decides, and
    the events that say they are user annotations are left out."""
    if event.device_type().name == "CPU":
        return False
    if hasattr(event, "activity_type"):
        return event.activity_type() in DEVICE_ACTIVITIES
    annotation = getattr(event, "is_user_annotation", None)
    return not (annotation is not None and annotation())


def device_events(prof: Any) -> list[DeviceEvent]:
    """The kernels, copies and fills the profiler saw on a GPU."""
    return [
        DeviceEvent(event.name(), event.start_ns(), event.duration_ns())
        for event in prof.profiler.kineto_results.events()
        if on_device(event)
    ]


def profile_steps(
    step: Callable[[], None],
    sync: Callable[[], None],
    steps: int,
    cuda: bool,
    trace: Path | None = None,
) -> dict[str, Any]:
    """Run ``step`` ``steps`` times under ``torch.profiler`` and summarise where time went.

    ``trace``: also write the Chrome/Perfetto trace there (gzip-compressed when the name ends
    in ``.gz``; a compiled paper step is tens of MB of JSON before compression).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall_s = time.perf_counter() - start
    written = None if trace is None else str(_export(prof, trace))  # first: kept if the rest fails
    if cuda:
        summary = summarize_device_events(device_events(prof), steps, wall_s)
    else:
        summary = _cpu_summary(prof, steps, wall_s)
    if written is not None:
        summary["trace"] = written
    return summary


def _export(prof: Any, trace: Path) -> Path:
    trace.parent.mkdir(parents=True, exist_ok=True)
    if trace.suffix != ".gz":
        prof.export_chrome_trace(str(trace))
        return trace
    with tempfile.TemporaryDirectory() as folder:
        plain = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(plain))
        with plain.open("rb") as source, gzip.open(trace, "wb", compresslevel=6) as target:
            shutil.copyfileobj(source, target)
    return trace


def markdown(summary: dict[str, Any]) -> str:
    """The categories and the top kernels as two small tables."""
    unit = "kernel" if summary["kind"] == "device kernels" else "operator"
    head = f"Profile over {summary['steps']} step(s): {summary['wall_ms_per_step']:.1f} ms wall"
    if "device_busy_share" in summary:
        head += (
            f", GPU busy {summary['device_busy_ms_per_step']:.1f} ms "
            f"({100 * summary['device_busy_share']:.1f} %), "
            f"{summary['device_ops_per_step']:.0f} kernels, copies and fills per step"
        )
    lines = [head + ".", "", f"| what | ms per step | share of {unit} time |", "|---|---|---|"]
    lines += [
        f"| {c['category']} | {c['ms_per_step']:.2f} | {100 * c['share']:.1f} % |"
        for c in summary["categories"]
    ]
    lines += [
        "",
        f"| {unit} | category | calls per step | ms per step | share |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| `{t['name'][:90]}` | {t['category']} | {t['calls_per_step']:g} | "
        f"{t['ms_per_step']:.2f} | {100 * t['share']:.1f} % |"
        for t in summary["top"]
    ]
    return "\n".join(lines)
