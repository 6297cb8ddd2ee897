"""A training step's roofline: the least time each kind of operator needs on a GPU, from the
FLOPs and bytes of the step as the CPU runs it.

    python benchmarks/roofline.py sdm --preset paper [--batch-size 256] [--tflops 705]
        [--tbps 3.0] [--precision bf16|fp32] [--json FILE]

"Two numbers first" (docs/benchmarks.md, issue 14's MFU): the step of ``bench_train.py``
(forward, backward, optimiser, EMA) runs once at batch 1 and once at batch 2 on the CPU under
a dispatch mode that records every aten operator call: its FLOPs (torch's formulas, counted as
``bench_train.flop_counter`` counts them) and the bytes of its tensor inputs and outputs (views
move none; an in-place operator reads and writes its tensor). The two runs dispatch the same
calls in the same order; each call's FLOPs and bytes are linear in the batch (activations)
plus a constant (weights, optimiser state), so the two give both, and every call is
extrapolated to ``--batch-size``. A call's roofline time is max(FLOPs / the matrix rate, bytes
/ the memory bandwidth). The defaults are what an H100 of this workplace measured on
2026-11-27: 705 TFLOP/s for an 8192^3 bf16 matmul (gpu_suite's probe), about 3.0 TB/s for a
device-to-device copy (``/work/.library`` machine notes), so they are achievable rates, not
datasheet peaks.

How to read it: eager PyTorch moves every operator's inputs and outputs through device memory,
so the sum over the calls is about the least an eager step can take (kernel launch gaps and
kernels below those rates come on top). ``torch.compile`` fuses the pointwise and
normalisation operators, so for a compiled step their bytes are an upper bound. The FLOP floor
(all FLOPs at the matrix rate) is what no version of the step beats. The bytes are those of
the CPU run's dtypes: under bf16 autocast (``--precision bf16``, the default) they are the
GPU's. Also reported: the bytes autograd keeps for the backward pass (each storage once,
through ``saved_tensors_hooks``), the activation memory of an eager step at the batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_train
import torch
from step_profile import TOP, category
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

#: An H100 of this workplace, 2026-11-27: bf16 8192^3 matmul, and a device-to-device copy.
H100_MATMUL_TFLOPS = 705.0
H100_COPY_TBPS = 3.0
#: Operators whose inputs hold at most this many elements always run for real (cheap; their
#: values may steer the step, e.g. the loss's finiteness check).
SMALL = 65536


#: Not views by their schema, but they move no bytes (a reshape of a contiguous tensor).
FREE = frozenset({"aten::_unsafe_view"})
#: In-place operators that write their first argument without reading it.
OVERWRITES = frozenset({"aten::copy_", "aten::fill_", "aten::zero_"})


@dataclass(frozen=True)
class Call:
    """One aten operator call: its name, FLOPs and bytes read plus written."""

    name: str
    flops: float
    nbytes: float


@dataclass(frozen=True)
class StepRecord:
    """One recorded step: its operator calls, and the bytes autograd kept for the backward
    pass (each storage once: activations, and the bf16 copies of weights that autocast made)."""

    calls: list[Call]
    saved_bytes: int


class OperatorCosts(TorchDispatchMode):
    """Records every non-view aten call's FLOPs and bytes, in dispatch order.

    With ``execute=False`` an operator that makes new tensors (no view, nothing in place) from
    large inputs runs on the meta device and hands back zeros of the result's size and
    strides: shapes and dtypes, hence FLOPs and bytes, are those of the real run (the test
    compares the two), and the CPU need not emulate bf16 convolutions for an hour. Views,
    in-place updates (Adam, the EMA: cheap), operators on small inputs (the loss and its
    finiteness check, which the step reads) and anything the meta device cannot run execute
    for real.
    """

    def __init__(self, execute: bool = True) -> None:
        super().__init__()
        self.registry = bench_train.flop_counter().flop_registry
        self.execute = execute
        self.calls: list[Call] = []
        self.saved: dict[int, int] = {}  # storage address -> bytes, of what autograd saved

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        """A ``saved_tensors_hooks`` pack hook: notes the tensor's storage, keeps the tensor."""
        storage = tensor.untyped_storage()
        self.saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = self._run(func, args, kwargs)
        if func.is_view or func._schema.name in FREE:
            return out
        formula = self.registry.get(func.overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula else 0
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if not func._schema.returns:  # _foreach_*_: the tensors it writes are returned by none
            tensors += _written_arguments(func, args, kwargs)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if func._schema.name in OVERWRITES:  # its destination: once written, not also read
            nbytes -= args[0].numel() * args[0].element_size()
        self.calls.append(Call(func._schema.name, float(flops), float(nbytes)))
        return out

    def _run(self, func, args, kwargs):  # noqa: ANN001, ANN202
        schema = func._schema
        aliases = any(r.alias_info is not None for r in schema.returns)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        small = sum(t.numel() for t in tensors) <= SMALL
        if self.execute or small or func.is_view or aliases or schema.is_mutable:
            return func(*args, **kwargs)
        meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        try:
            meta = func(*meta_args, **meta_kwargs)
        except (NotImplementedError, RuntimeError, TypeError):
            return func(*args, **kwargs)
        if not all(isinstance(t, torch.Tensor) or t is None for t in tree_leaves(meta)):
            return func(*args, **kwargs)  # a Python number: it depends on the values
        return tree_map_only(torch.Tensor, _zeros_like_meta, meta)


def _written_arguments(func, args, kwargs) -> list[torch.Tensor]:  # noqa: ANN001
    """The tensors an operator writes in place, read off its schema."""
    written = []
    for index, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        written += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
    return written


def _zeros_like_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).zero_()


def record_step(
    model: str,
    preset: str,
    batch: int,
    precision: str,
    execute: bool = False,
    norm_in_compute_dtype: bool = False,
    optimizer_impl: str = "fused",
) -> StepRecord:
    """One step of ``bench_train``'s (the loop's ``Trainer.train_step``) at ``batch`` on the
    CPU (after one unrecorded step, so the optimiser's state exists as in training), every
    operator call recorded. ``optimizer_impl``: Adam's kernels, by default those a CUDA run
    uses (``train.optimizer_impl`` auto)."""
    setup = bench_train.MODELS[model](preset, batch, None, True, False, torch.device("cpu"))
    if norm_in_compute_dtype:
        bench_train.norm_in_compute_dtype(setup)
    trainer = bench_train.placed_trainer(
        setup, torch.device("cpu"), precision=precision, optimizer_impl=optimizer_impl
    )
    with OperatorCosts(execute):  # unrecorded: the optimiser's state comes into being
        trainer.train_step([setup.batch])
    costs = OperatorCosts(execute)
    with costs, torch.autograd.graph.saved_tensors_hooks(costs.pack, lambda tensor: tensor):
        trainer.train_step([setup.batch])
    return StepRecord(costs.calls, sum(costs.saved.values()))


def extrapolate(one: list[Call], two: list[Call], batch: int) -> list[Call]:
    """Each call at ``batch`` from the same call at batch 1 and 2 (cost = a + b * batch)."""
    if [c.name for c in one] != [c.name for c in two]:
        raise RuntimeError(
            f"the steps at batch 1 and 2 dispatched different calls ({len(one)} and {len(two)}); "
            "the step must run the same operators whatever the batch"
        )
    return [
        Call(
            a.name,
            max(0.0, a.flops + (b.flops - a.flops) * (batch - 1)),
            max(0.0, a.nbytes + (b.nbytes - a.nbytes) * (batch - 1)),
        )  # fmt: skip
        for a, b in zip(one, two)
    ]


ROW_FIELDS = ("calls", "gflop", "gb", "ms", "memory_ms")


def roofline(calls: list[Call], tflops: float, tbps: float) -> dict[str, Any]:
    """Per category and per operator: calls, GFLOP, GB, least milliseconds, and the part of
    them bound by memory."""
    categories: dict[str, dict[str, float]] = {}
    operators: dict[str, dict[str, float]] = {}
    for call in calls:
        compute_ms, memory_ms = call.flops / tflops / 1e9, call.nbytes / tbps / 1e9
        for rows, key in ((categories, category(call.name)), (operators, call.name)):
            row = rows.setdefault(key, dict.fromkeys(ROW_FIELDS, 0.0))
            row["calls"] += 1
            row["gflop"] += call.flops / 1e9
            row["gb"] += call.nbytes / 1e9
            row["ms"] += max(compute_ms, memory_ms)
            row["memory_ms"] += memory_ms if memory_ms > compute_ms else 0.0
    total_flops = sum(c.flops for c in calls)

    def most_time(rows: dict[str, dict[str, float]]) -> list[tuple[str, dict[str, float]]]:
        return sorted(rows.items(), key=lambda item: -item[1]["ms"])

    return {
        "categories": dict(most_time(categories)),
        "operators": dict(most_time(operators)[:TOP]),
        "flop_floor_ms": total_flops / tflops / 1e9,
        "eager_roofline_ms": sum(r["ms"] for r in categories.values()),
        "memory_bound_ms": sum(r["memory_ms"] for r in categories.values()),
        "gflop": total_flops / 1e9,
        "gb": sum(c.nbytes for c in calls) / 1e9,
    }


def markdown(result: dict[str, Any], tflops: float, tbps: float, batch: int) -> str:
    lines = [
        "| operators | calls | GFLOP | GB moved | least ms | of it memory-bound ms | share |",
        "|---|---|---|---|---|---|---|",
    ]
    total = result["eager_roofline_ms"]
    for label, row in result["categories"].items():
        lines.append(
            f"| {label} | {row['calls']:.0f} | {row['gflop']:,.0f} | {row['gb']:,.1f} | "
            f"{row['ms']:.1f} | {row['memory_ms']:.1f} | {100 * row['ms'] / total:.1f} % |"
        )
    lines += [
        "",
        "| operator | category | calls | GFLOP | GB moved | least ms |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| `{name}` | {category(name)} | {row['calls']:.0f} | {row['gflop']:,.0f} | "
        f"{row['gb']:,.1f} | {row['ms']:.1f} |"
        for name, row in result["operators"].items()
    ]
    lines += [
        "",
        f"Batch {batch} at {tflops:g} TFLOP/s and {tbps:g} TB/s: FLOP floor "
        f"{result['flop_floor_ms']:.0f} ms ({result['gflop'] / 1e3:,.1f} TFLOP), eager roofline "
        f"{total:.0f} ms (of which {result['memory_bound_ms']:.0f} ms memory-bound, "
        f"{result['gb']:,.0f} GB moved). Kept for the backward pass: "
        f"{result['saved_for_backward_gib']:.1f} GiB.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", choices=sorted(bench_train.MODELS))
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--batch-size", type=int, default=256, help="extrapolate to this batch")
    parser.add_argument("--tflops", type=float, default=H100_MATMUL_TFLOPS)
    parser.add_argument("--tbps", type=float, default=H100_COPY_TBPS)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument(
        "--norm-in-compute-dtype",
        action="store_true",
        help="sdm: the U-Net's GroupNorms in bf16 (train.norm_in_compute_dtype)",
    )
    parser.add_argument(
        "--optimizer-impl",
        choices=["fused", "foreach"],
        default="fused",
        help="Adam's kernels: fused (a CUDA run's default, train.optimizer_impl auto) or "
        "foreach (one kernel per operation, the default before)",
    )
    parser.add_argument(
        "--execute",
        action="store_true",
        help="compute every operator for real (slow: a paper step in bf16 takes the CPU most of "
        "an hour); default: shapes only, on the meta device",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if (args.model, args.preset, "cpu") not in bench_train.DEFAULTS:
        parser.error(f"{args.model} has no preset {args.preset}")
    if args.norm_in_compute_dtype and args.model != "sdm":
        parser.error("--norm-in-compute-dtype is an sdm setting")
    if args.batch_size < 1 or args.tflops <= 0 or args.tbps <= 0:
        parser.error("--batch-size, --tflops and --tbps must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    options = (args.precision, args.execute, args.norm_in_compute_dtype, args.optimizer_impl)
    one = record_step(args.model, args.preset, 1, *options)
    two = record_step(args.model, args.preset, 2, *options)
    calls = extrapolate(one.calls, two.calls, args.batch_size)
    result = roofline(calls, args.tflops, args.tbps)
    saved = one.saved_bytes + (two.saved_bytes - one.saved_bytes) * (args.batch_size - 1)
    result["saved_for_backward_gib"] = saved / 2**30
    print(markdown(result, args.tflops, args.tbps, args.batch_size))
    info = bench_train.machine(torch.device("cpu"))
    print(
        f"\nRecorded on {info['cpu']}, torch {info['torch']}, {info['date']}, commit "
        f"`{info['code']['commit']}`, in {time.perf_counter() - started:.0f} s: "
        f"`{info['command']}`",
        file=sys.stderr,
    )
    if args.json:
        document = {"machine": info, "args": vars(args) | {"json": str(args.json)}, **result}
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
