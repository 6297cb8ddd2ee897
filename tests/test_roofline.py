"""benchmarks/roofline.py: a training step's least time per kind of operator, from the FLOPs
and bytes of its calls on the CPU (issue 14's "two numbers first")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from roofline import Call, extrapolate, roofline  # noqa: E402


def test_each_call_is_extrapolated_linearly_in_the_batch() -> None:
    one = [Call("aten::convolution", 10.0, 100.0), Call("aten::lerp_", 0.0, 50.0)]
    two = [Call("aten::convolution", 20.0, 180.0), Call("aten::lerp_", 0.0, 50.0)]
    at_256 = extrapolate(one, two, 256)
    assert at_256[0] == Call("aten::convolution", 2560.0, 100.0 + 80.0 * 255)
    assert at_256[1] == Call("aten::lerp_", 0.0, 50.0)  # weights only: the same at any batch


def test_steps_that_dispatch_different_calls_are_refused() -> None:
    with pytest.raises(RuntimeError, match="different calls"):
        extrapolate([Call("aten::mm", 1, 1)], [Call("aten::add", 1, 1)], 8)


def test_a_call_costs_the_larger_of_its_compute_and_memory_time() -> None:
    calls = [
        Call("aten::convolution", 2e12, 1e9),  # 2 ms of compute at 1000 TFLOP/s, 1 ms of bytes
        Call("aten::silu", 0.0, 3e9),  # 3 ms of bytes at 1 TB/s
        Call("aten::native_group_norm", 1e9, 1e9),  # memory-bound: 1 ms
    ]
    result = roofline(calls, tflops=1000.0, tbps=1.0)
    rows = result["categories"]
    assert rows["convolution"]["ms"] == pytest.approx(2.0)
    assert rows["convolution"]["memory_ms"] == 0.0
    assert rows["other elementwise / reduction"]["ms"] == pytest.approx(3.0)
    assert rows["normalization"]["memory_ms"] == pytest.approx(1.0)
    assert list(rows)[0] == "other elementwise / reduction"  # the most time first
    assert result["eager_roofline_ms"] == pytest.approx(6.0)
    assert result["memory_bound_ms"] == pytest.approx(4.0)
    assert result["flop_floor_ms"] == pytest.approx(2.001)


def test_the_script_records_a_tiny_sdm_step(tmp_path: Path) -> None:
    out = tmp_path / "roofline.json"
    command = [sys.executable, str(BENCHMARKS / "roofline.py"), "sdm", "--preset", "tiny"]
    command += ["--batch-size", "64", "--threads", "1", "--precision", "fp32", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["categories"]
    # The U-Net's convolutions carry almost all FLOPs; Adam's foreach update and the EMA move
    # bytes but no counted FLOPs.
    assert rows["convolution"]["gflop"] > 0.9 * result["gflop"]
    assert rows["optimizer / EMA"]["gb"] > 0 and rows["optimizer / EMA"]["gflop"] == 0
    assert result["eager_roofline_ms"] >= result["flop_floor_ms"] > 0
    assert "FLOP floor" in done.stdout and result["saved_for_backward_gib"] > 0


def test_shapes_only_records_what_executing_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """The meta-device shortcut sees the same calls, FLOPs and bytes as running the step."""
    import roofline

    monkeypatch.setattr(roofline, "SMALL", 1000)  # the tiny model's activations go to meta
    executed = roofline.record_step("sdm", "tiny", 2, "bf16", execute=True)
    shapes_only = roofline.record_step("sdm", "tiny", 2, "bf16", execute=False)
    assert len(executed.calls) > 500 and executed.saved_bytes > 0
    assert shapes_only == executed


def test_group_norm_in_compute_dtype_moves_fewer_bytes() -> None:
    """train.norm_in_compute_dtype drops the GroupNorms' fp32 round trips (forward and
    backward casts of every normalised activation) from a bf16 step, and keeps their inputs
    for the backward pass in bf16, not fp32."""
    import roofline

    def casts(calls: list[Call]) -> float:
        return sum(c.nbytes for c in calls if c.name == "aten::_to_copy")

    def step_at_64(fast: bool) -> tuple[list[Call], float]:  # activations outweigh weights
        one, two = (roofline.record_step("sdm", "tiny", b, "bf16", False, fast) for b in (1, 2))
        kept = one.saved_bytes + (two.saved_bytes - one.saved_bytes) * 63
        return extrapolate(one.calls, two.calls, 64), kept

    (official, official_kept), (fast, fast_kept) = step_at_64(False), step_at_64(True)
    assert casts(fast) < 0.5 * casts(official)
    assert sum(c.nbytes for c in fast) < 0.85 * sum(c.nbytes for c in official)
    assert sum(c.flops for c in fast) == sum(c.flops for c in official)
    assert fast_kept < 0.85 * official_kept
