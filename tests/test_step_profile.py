"""benchmarks/step_profile.py: where a training step's time goes (issue 14's MFU gap).

The GPU summary is a pure function of the kernel events, so its arithmetic (overlaps, shares,
the kernel-name categories, on names as an H100 run reports them) is checked here without a
GPU; the profiler glue runs for real on the CPU through ``bench_train.py --profile``.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from step_profile import (  # noqa: E402
    OTHER,
    TOP,
    DeviceEvent,
    busy_ns,
    category,
    markdown,
    on_device,
    summarize_device_events,
)


def test_busy_time_counts_overlapping_kernels_once() -> None:
    events = [
        DeviceEvent("a", 0, 10),
        DeviceEvent("b", 5, 10),  # overlaps a: 0..15
        DeviceEvent("c", 12, 2),  # inside b
        DeviceEvent("d", 20, 5),  # a gap of 5 before it
    ]
    assert busy_ns(events) == 20
    assert busy_ns(list(reversed(events))) == 20  # order does not matter
    assert busy_ns([]) == 0


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("triton_red_fused_native_group_norm_silu_12", "compiled (Triton)"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd", "attention"),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw", "convolution"),
        ("sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
        ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16", "layout transform"),
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTN", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<Adam",
            "optimizer / EMA",
        ),
        (
            "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>",
            "normalization",
        ),
        ("void at::native::vectorized_layer_norm_kernel<c10::BFloat16, float>", "normalization"),
        ("void at::native::(anonymous namespace)::normal_and_transform<float, float>", OTHER),
        ("Memcpy HtoD (Pageable -> Device)", "copy / fill"),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<", "copy / fill"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::silu",
            "other elementwise / reduction",
        ),
        ("aten::mkldnn_convolution", "convolution"),
        ("aten::mm", "matmul"),
        ("something unheard of", OTHER),
    ],
)
def test_kernel_names_fall_into_their_category(name: str, expected: str) -> None:
    assert category(name) == expected


def test_summary_shares_and_per_step_figures() -> None:
    conv = "sm90_xmma_fprop_implicit_gemm_bf16"
    fused = "triton_poi_fused_add_silu_3"
    events = []
    for step in range(2):  # two steps of 100 ms wall each: 60 ms conv, 20 ms fused, 20 idle
        base = step * 100_000_000
        events.append(DeviceEvent(conv, base, 30_000_000))
        events.append(DeviceEvent(conv, base + 30_000_000, 30_000_000))
        events.append(DeviceEvent(fused, base + 70_000_000, 20_000_000))
    summary = summarize_device_events(events, steps=2, wall_s=0.2)
    assert summary["wall_ms_per_step"] == pytest.approx(100)
    assert summary["kernel_ms_per_step"] == pytest.approx(80)
    assert summary["device_busy_ms_per_step"] == pytest.approx(80)
    assert summary["device_busy_share"] == pytest.approx(0.8)
    assert summary["device_ops_per_step"] == 3
    shares = {c["category"]: c["share"] for c in summary["categories"]}
    assert shares == pytest.approx({"convolution": 0.75, "compiled (Triton)": 0.25})
    assert [c["category"] for c in summary["categories"]][0] == "convolution"  # largest first
    top = summary["top"]
    assert top[0]["name"] == conv and top[0]["calls_per_step"] == 2
    assert top[0]["ms_per_step"] == pytest.approx(60)
    assert "GPU busy 80.0 ms (80.0 %)" in markdown(summary)


class _Type:
    def __init__(self, name: str) -> None:
        self.name = name


class _Event213:
    """The part of torch 2.13's ``_KinetoEvent`` that ``on_device`` reads."""

    def __init__(self, device: str, activity: str) -> None:
        self._device, self._activity = device, activity

    def device_type(self) -> _Type:
        return _Type(self._device)

    def activity_type(self) -> str:
        return self._activity


class _Event211:
    """torch 2.11's ``_KinetoEvent``: no ``activity_type`` (the H100 run of 2026-11-27)."""

    def __init__(self, device: str, annotation: bool = False) -> None:
        self._device, self._annotation = device, annotation

    def device_type(self) -> _Type:
        return _Type(self._device)

    def is_user_annotation(self) -> bool:
        return self._annotation


def test_device_events_are_told_apart_with_and_without_activity_type() -> None:
    assert on_device(_Event213("CUDA", "kernel")) and on_device(_Event213("CUDA", "gpu_memcpy"))
    assert not on_device(_Event213("CUDA", "gpu_user_annotation"))
    assert not on_device(_Event213("CPU", "cpu_op"))
    assert on_device(_Event211("CUDA"))
    assert not on_device(_Event211("CUDA", annotation=True))
    assert not on_device(_Event211("CPU"))


def test_a_failed_profile_keeps_the_rows_timings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench_train
    import step_profile

    def broken(*args: object, **kwargs: object) -> None:
        raise AttributeError("'_KinetoEvent' object has no attribute 'activity_type'")

    monkeypatch.setattr(step_profile, "profile_steps", broken)
    monkeypatch.setattr(bench_train.torch, "set_num_threads", lambda n: None)  # keep the worker's
    out = tmp_path / "bench.json"
    argv = ["bench_train.py", "sdm", "--preset", "tiny", "--batch-size", "2", "--warmup", "1"]
    argv += ["--steps", "1", "--device", "cpu", "--threads", "1", "--profile", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out)])
    bench_train.main()
    row = json.loads(out.read_text())["results"][0]
    assert row["images_per_s"] > 0 and len(row["step_s"]) == 1
    assert row["profile"] == {
        "error": "AttributeError: '_KinetoEvent' object has no attribute 'activity_type'"
    }


def test_summary_lists_the_top_kernels_only() -> None:
    events = [DeviceEvent(f"kernel_{i}", 10 * i, i + 1) for i in range(TOP + 10)]
    summary = summarize_device_events(events, steps=1, wall_s=1.0)
    assert len(summary["top"]) == TOP
    assert summary["top"][0]["name"] == f"kernel_{TOP + 9}"  # the longest first
    assert sum(c["share"] for c in summary["categories"]) == pytest.approx(1.0)


def test_bench_train_profiles_a_cpu_step(tmp_path: Path) -> None:
    """The profiler glue for real: a tiny SDM step on the CPU, its summary and its trace."""
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(BENCHMARKS / "bench_train.py"),
        "sdm",
        "--preset",
        "tiny",
        "--batch-size",
        "4",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--profile",
        "2",
        "--profile-trace",
        str(tmp_path),
        "--json",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(out.read_text())["results"][0]
    profile = row["profile"]
    assert profile["steps"] == 2 and profile["kind"].startswith("CPU operators")
    categories = {c["category"]: c["ms_per_step"] for c in profile["categories"]}
    assert categories["convolution"] > 0 and categories["optimizer / EMA"] > 0
    assert sum(c["share"] for c in profile["categories"]) == pytest.approx(1.0)
    names = [t["name"] for t in profile["top"]]
    assert any("convolution" in name for name in names)
    trace = Path(profile["trace"])
    assert trace.parent == tmp_path and trace.name == "trace_sdm_tiny_b4.json.gz"
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert any(e.get("name") == "aten::convolution_backward" for e in events)
    assert "| what | ms per step | share of operator time |" in done.stdout


def test_bench_train_refuses_a_trace_without_profile(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCHMARKS / "bench_train.py"), "sdm", "--preset", "tiny"]
    command += ["--profile-trace", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=BENCHMARKS)
    assert done.returncode == 2 and "--profile-trace needs --profile" in done.stderr


def _gpu_row(options: str, batch: int, mfu: float, steady_mfu: float, **extra: object) -> dict:
    peak = 989.0
    return {
        "model": "sdm",
        "preset": "paper",
        "precision": "bf16 autocast",
        "step": "full" + (f", {options}" if options else ""),
        "batch_size": batch,
        "device_type": "cuda",
        "images_per_s": 300.0,
        "step_s_mean": batch / 300.0,
        "memory": {"peak_mib": 40_000.0},
        "achieved_tflops": mfu * peak,
        "steady_images_per_s": 320.0,
        "steady_tflops": steady_mfu * peak,
        "peak_bf16_tflops": peak,
        "mfu": mfu,
        "mfu_steady": steady_mfu,
        "gflop_per_image": 709.0,
        "image_size": 256,
        "attention_ops": {"_scaled_dot_product_cudnn_attention": 7},
        **extra,
    }


def test_gpu_suite_summary_judges_both_timings_and_shows_the_profile() -> None:
    """The suite's report: the 35 % verdict for per-step and steady timing, and the profile."""
    import gpu_suite

    events = [DeviceEvent("sm90_xmma_fprop_implicit_gemm_bf16", 0, 500_000_000)]
    profile = summarize_device_events(events, steps=1, wall_s=0.6)
    rows = [
        _gpu_row("", 256, 0.22, 0.23, host_waits_per_step=["unet.py:183", "sdm.py:165"]),
        _gpu_row("compile default", 256, 0.30, 0.36, compile_s=100.0, profile=profile),
    ]
    document = {
        "mode": "gpu",
        "commands": [
            {"name": "sdm_paper_bf16", "status": "ok", "rc": 0, "json": {"results": rows}}
        ],
    }
    text = gpu_suite.summarize(document)
    assert "FAIL  SDM paper bf16 MFU, eager, no options, each step synchronised: 22.0%" in text
    assert "FAIL  SDM paper bf16 MFU, eager, no options, steady, as training runs: 23.0%" in text
    assert "FAIL  SDM paper bf16 MFU, any option, each step synchronised: 30.0%" in text
    assert "PASS  SDM paper bf16 MFU, any option, steady, as training runs: 36.0%" in text
    assert "## Where the step's time goes" in text
    assert "GPU busy 500.0 ms (83.3 %)" in text
    assert "| convolution | 500.00 | 100.0 % |" in text
    assert "host waits 2 (unet.py:183, sdm.py:165)" in text

    failed = _gpu_row("compile default", 256, 0.30, 0.31, profile={"error": "AttributeError: x"})
    document["commands"][0]["json"]["results"] = [failed]
    assert "The profile failed: AttributeError: x" in gpu_suite.summarize(document)


@pytest.mark.parametrize(("model", "preset"), [("sdm", "tiny"), ("sdm", "tiny-report"),
                                               ("ae", "tiny"), ("sr", "tiny")])  # fmt: skip
def test_flops_from_small_batches_are_the_full_batch_count(model: str, preset: str) -> None:
    """A compiled row counts its FLOPs on 1 and 2 rows (an eager step of the whole batch may
    not fit beside a compiled one): the extrapolation must equal counting the whole batch."""
    import bench_train
    import torch

    def build() -> bench_train.Setup:
        torch.manual_seed(0)
        return bench_train.MODELS[model](preset, 6, None, True, False, torch.device("cpu"))

    def step(setup: bench_train.Setup) -> None:
        trainer = bench_train.placed_trainer(setup, torch.device("cpu"), precision="fp32")
        trainer.train_step([setup.batch])  # the loop's own step

    full = bench_train.flop_counter()
    with full:
        step(build())
    total, by_op = bench_train._flops_from_small_batches(build(), step, bench_train._AttentionOps())
    assert total == pytest.approx(full.get_total_flops(), rel=1e-9)
    assert by_op == bench_train._flops_by_op(full)


def test_inductor_settings_are_checked_before_anything_runs() -> None:
    """``--inductor KEY=VALUE``: an existing Inductor key and a Python literal, with --compile;
    a typo must stop the run at once, not after minutes of set-up on a GPU machine."""
    import argparse

    import bench_train

    assert bench_train.inductor_setting("coordinate_descent_tuning=True") == (
        "coordinate_descent_tuning",
        True,
    )
    assert bench_train.inductor_setting("triton.cudagraphs = False") == ("triton.cudagraphs", False)
    for bad in (
        "coordinate_descent_tunin=True",
        "triton.nope=1",
        "no_equals",
        "conv_1x1_as_mm=yes",
        "os=1",  # a module attribute of the config module, not a setting
        "coordinate_descent_tuning=1",  # a bool setting
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_train.inductor_setting(bad)

    command = [sys.executable, str(BENCHMARKS / "bench_train.py"), "sdm", "--preset", "tiny"]
    done = subprocess.run(
        [*command, "--inductor", "coordinate_descent_tuning=True"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCHMARKS,
    )
    assert done.returncode == 2 and "add --compile" in done.stderr
    done = subprocess.run(
        [*command, "--compile", "--inductor", "no_such_key=1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCHMARKS,
    )
    assert done.returncode == 2 and "has no setting 'no_such_key'" in done.stderr
    done = subprocess.run(
        [*command, "--compile-channels-last"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCHMARKS,
    )
    assert done.returncode == 2 and "--compile-channels-last sets" in done.stderr


def test_inductor_setting_is_applied_and_recorded() -> None:
    import argparse

    import bench_train
    from torch._inductor import config

    # config.patch, not monkeypatch: the latter's undo hid the setting for later tests
    with config.patch(coordinate_descent_tuning=False):
        bench_train.set_inductor("coordinate_descent_tuning", True)
        assert config.coordinate_descent_tuning is True
    assert config.coordinate_descent_tuning is False
    args = argparse.Namespace(
        optimizer=True,
        grad_checkpointing=False,
        compile=True,
        inductor=[("coordinate_descent_tuning", True)],
    )
    row = bench_train._row("sdm", "tiny", 2, bench_train.torch.device("cpu"), False, args)
    assert row["inductor"] == {"coordinate_descent_tuning": True}
    assert "inductor coordinate_descent_tuning=True" in row["step"]
    assert row["compile_channels_last"] is False and "channels-last" not in row["step"]
    args.compile_channels_last = True
    row = bench_train._row("sdm", "tiny", 2, bench_train.torch.device("cpu"), False, args)
    assert row["compile_channels_last"] is True and "compiled channels-last" in row["step"]


def test_host_waits_name_the_code_that_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench_train``'s sync check (CUDA only, faked here): torch's sync debug mode warns at
    each synchronising call, and the row keeps where each came from; the mode is reset."""
    import warnings

    import bench_train

    modes = []
    monkeypatch.setattr(bench_train.torch.cuda, "set_sync_debug_mode", modes.append)

    def step() -> None:
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)

    waits = bench_train._host_waits(step)
    assert len(waits) == 1 and waits[0].startswith("test_step_profile.py:")
    assert modes == ["warn", "default"]


def test_gpu_suite_records_a_command_as_it_starts(tmp_path: Path, monkeypatch) -> None:
    """A device call cut off by SIGKILL (no handler runs) left no trace of the row it was in."""
    import subprocess

    import gpu_suite

    suite = gpu_suite.Suite(tmp_path, budget=60, smoke=True)
    seen = {}

    class Started(subprocess.Popen):
        def __init__(self, argv, **kwargs):
            document = json.loads((tmp_path / "gpu_results.json").read_text())
            seen.update(document["commands"][-1])
            super().__init__([sys.executable, "-c", "print('ran')"], **kwargs)

    monkeypatch.setattr(gpu_suite.subprocess, "Popen", Started)
    command = gpu_suite.Command("row", "bench_train.py", ["sdm"], 1.0, 30.0, "a row")
    suite.run(command)
    assert seen["name"] == "row" and "started_at_s" in seen and "status" not in seen
    assert suite.records[-1]["status"] == "ok"
    suite.log.close()
