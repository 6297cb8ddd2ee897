"""``torchrun -m cheff train``: two CPU processes (gloo) train exactly what one process with
the same global batch trains (autoencoder, latent diffusion, report model, super-resolution),
and their checkpoint resumes in one process.

Each run is the real command line in subprocesses (``python -m torch.distributed.run``), on
the 32-image training fixture, float32, one thread per process.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TRAINING_HOLDOUT

pytestmark = pytest.mark.slow

STEPS = 20
REL_TOL = 1e-5


def _run(args: list[str], processes: int) -> None:
    """``cheff ARGS`` in one process, or under torchrun in ``processes``."""
    if processes == 1:
        command = [sys.executable, "-m", "cheff", *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(processes), "-m", "cheff", *args,
        ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, (
        f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )


def _losses(run: Path) -> dict[int, dict[str, float]]:
    """metrics.csv by step: every loss column (not the timing)."""
    with open(run / "metrics.csv", newline="") as handle:
        return {
            int(row["step"]): {
                k: float(v) for k, v in row.items() if k not in ("step", "it_per_s", "lr") and v
            }
            for row in csv.DictReader(handle)
        }


def _assert_match(single: dict, several: dict, steps: range) -> None:
    for step in steps:
        assert set(single[step]) == set(several[step]), step
        for key, value in single[step].items():
            other = several[step][key]
            assert abs(other - value) <= REL_TOL * max(abs(value), 1e-12), (
                f"step {step} {key}: one process {value!r}, two processes {other!r}"
            )


def _one_equals_two(
    args: Callable[[Path, int], list[str]], root: Path, batch: int, steps: int
) -> None:
    """Train ``args(run, batch)`` in one process and ``args(run, batch // 2)`` on two; their
    per-step losses must agree."""
    _run(args(root / "one", batch), 1)
    _run(args(root / "two", batch // 2), 2)
    one, two = _losses(root / "one"), _losses(root / "two")
    assert sorted(two) == list(range(1, steps + 1))
    _assert_match(one, two, range(1, steps + 1))


def _ae_args(data: Path, run: Path, batch: int, *extra: str, steps: int = STEPS) -> list[str]:
    return [
        "train", "ae", "--data", str(data), "--run-dir", str(run), "--preset", "tiny",
        "--image-size", "16", "--holdout", TRAINING_HOLDOUT, "--batch-size", str(batch),
        "--max-steps", str(steps), "--device", "cpu", "--precision", "fp32", "-q",
        "--set", "train.log_every=1", "--set", "train.checkpoint_every=10",
        "--set", "data.num_workers=0", *extra,
    ]  # fmt: skip


def test_two_processes_train_the_autoencoder_as_one_with_the_global_batch(
    training_collection: Path, tmp_path: Path
) -> None:
    """The one-process run takes the global batch of 4 as 2 x 2 accumulated: the same sums as
    two ranks of 2, so the runs agree to rounding (here: bit for bit). Against one batch of 4
    the autoencoder drifts apart by up to 2e-4 within the 20 steps, as ONE process run with 1
    and with 2 threads does (1e-4): its training amplifies batch-level rounding. The latent
    diffusion test below compares with one batch of 8 directly."""
    accumulated = ("--set", "train.grad_accum=2")
    _run(_ae_args(training_collection, tmp_path / "one", 2, *accumulated), 1)
    _run(_ae_args(training_collection, tmp_path / "two", 2), 2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    _assert_match(one, two, range(1, STEPS + 1))
    assert one[STEPS]["ae/total"] < one[1]["ae/total"]  # it trains
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert (run["world_size"], run["batch_size"], run["effective_batch"]) == (2, 2, 4)

    # The two-process checkpoint of step 10 resumes in one process: steps 11-20 as before.
    resumed = tmp_path / "resumed"
    step10 = tmp_path / "two" / "checkpoints" / "step-00000010"
    shutil.copytree(step10, resumed / "checkpoints" / step10.name)
    _run([*_ae_args(training_collection, resumed, 2, *accumulated), "--resume"], 1)
    _assert_match(one, _losses(resumed), range(11, STEPS + 1))


def test_the_discriminator_trains_on_two_processes(
    training_collection: Path, tmp_path: Path
) -> None:
    """From ``disc_start`` each loss leaves the other optimiser's parameters unused (DDP
    must be told) and the adaptive weight averages its gradients over the ranks."""
    extra = ("--set", "loss.disc_start=3", "--image-size", "32")  # the discriminator's least
    _run(_ae_args(training_collection, tmp_path / "two", 2, *extra, steps=5), 2)
    losses = _losses(tmp_path / "two")
    assert "disc/total" in losses[5] and "ae/d_weight" in losses[5]
    assert all(math.isfinite(v) for step in losses.values() for v in step.values())


def test_two_processes_train_the_latent_diffusion_model_as_one(
    training_collection: Path, ae_path: Path, tmp_path: Path
) -> None:
    def args(run: Path, batch: int) -> list[str]:
        return [
            "train", "sdm", "--data", str(training_collection), "--ae", str(ae_path),
            "--run-dir", str(run), "--preset", "tiny", "--image-size", "16",
            "--holdout", TRAINING_HOLDOUT, "--batch-size", str(batch),
            "--max-steps", str(STEPS), "--device", "cpu", "--precision", "fp32", "-q",
            "--set", "train.log_every=1", "--set", "data.num_workers=0",
        ]  # fmt: skip

    _one_equals_two(args, tmp_path, 8, STEPS)


def test_two_processes_train_the_report_model_as_one(
    report_collection: Path, report_vocab: Path, ae_path: Path, tmp_path: Path
) -> None:
    """The report model: the text encoder trains under DDP beside the U-Net, and the
    classifier-free condition drop (here of half the reports) is drawn for the global
    batch, so each rank drops the rows one process would. Open-i's 8 images with a report
    make whole global batches of 4 (all 13 would leave one process a short last batch,
    which several ranks drop)."""

    def args(run: Path, batch: int) -> list[str]:
        return [
            "train", "sdm", "--data", str(report_collection), "--ae", str(ae_path),
            "--sources", "openi",
            "--vocab", str(report_vocab), "--report-text", "findings_impression",
            "--cond-drop", "0.5",
            "--run-dir", str(run), "--preset", "tiny-report", "--image-size", "16",
            "--batch-size", str(batch), "--max-steps", "10", "--device", "cpu",
            "--precision", "fp32", "-q", "--set", "train.log_every=1",
            "--set", "data.num_workers=0",
        ]  # fmt: skip

    _one_equals_two(args, tmp_path, 4, 10)
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert saved["condition"]["kind"] == "report" and saved["condition"]["drop"] == 0.5


def test_two_processes_train_the_super_resolution_model_as_one(
    training_collection: Path, tmp_path: Path
) -> None:
    def args(run: Path, batch: int) -> list[str]:
        return [
            "train", "sr", "--data", str(training_collection), "--run-dir", str(run),
            "--preset", "tiny", "--holdout", TRAINING_HOLDOUT, "--batch-size", str(batch),
            "--max-steps", "10", "--device", "cpu", "--precision", "fp32", "-q",
            "--set", "train.log_every=1", "--set", "data.num_workers=0",
        ]  # fmt: skip

    _one_equals_two(args, tmp_path, 4, 10)


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_draws_its_rows_of_the_global_batch(monkeypatch, world: int) -> None:
    """The ranks' rows, side by side, are one process's draw for the global batch, and every
    rank's generator ends where that process's does, also after a rank's short batch."""
    from cheff.train import distributed

    per_rank, shape = 4, (3, 2, 2)

    def draws(rank: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        monkeypatch.setattr(distributed, "rank_and_world", lambda: (rank, world))
        generator = torch.Generator().manual_seed(7)
        d = distributed.BatchDraws(generator, per_rank, torch.device("cpu"))
        return d.normal((count, *shape)), d.integers(1000, count), generator

    ranks = [draws(rank, per_rank) for rank in range(world)]
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 1))
    generator = torch.Generator().manual_seed(7)
    single = distributed.BatchDraws(generator, world * per_rank, torch.device("cpu"))
    normal, integers = (
        single.normal((world * per_rank, *shape)),
        single.integers(1000, world * per_rank),
    )
    assert torch.equal(torch.cat([r[0] for r in ranks]), normal)
    assert torch.equal(torch.cat([r[1] for r in ranks]), integers)
    short = draws(1, per_rank - 1)  # an unreadable image left this rank one short
    assert torch.equal(short[0], ranks[1][0][: per_rank - 1])
    assert torch.equal(short[2].get_state(), generator.get_state())


def test_an_epoch_smaller_than_the_global_batch_is_an_error(
    training_collection: Path, tmp_path: Path
) -> None:
    """Cut to whole global batches, 32 images give 2 ranks of 32 nothing: say so, do not
    loop over empty epochs for ever."""
    args = _ae_args(training_collection, tmp_path / "two", 32, steps=2)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "cheff", *args,
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "smaller than one global batch (2 ranks x 32)" in done.stdout + done.stderr


def _reduce_on_rank(rank: int, world: int, store: str, out: str) -> None:
    """One rank of ``test_ranks_agree_on_the_logs_and_the_first_diverged_step``."""
    import torch.distributed as dist

    from cheff.train import distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        logs = {"loss": torch.tensor(float(rank + 1)), "norm": 10.0 * rank}
        first = distributed.smallest_over_ranks(math.inf if rank == 0 else 4 * 2 + 1)
        result = {"logs": distributed.mean_over_ranks(logs), "first": first}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_logs_and_the_first_diverged_step(tmp_path: Path) -> None:
    """Two gloo ranks: logged values are averaged (in the order given), and a loss that
    went non-finite on rank 1 alone (step 4, loss 1 of 2: key 9) is known to both."""
    import torch.multiprocessing as mp

    mp.spawn(_reduce_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert list(result["logs"].items()) == [("loss", 1.5), ("norm", 5.0)]
        assert result["first"] == 9.0


def _stop_on_rank(rank: int, world: int, store: str, out: str) -> None:
    """One rank of ``test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_step``."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from cheff.train.loop import Trainer
    from cheff.train.stopping import StopNotice

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        notice = StopNotice()
        trainer = SimpleNamespace(step=0, config=SimpleNamespace(stop_check_every=4))
        answers = []
        for step in range(1, 11):
            trainer.step = step
            if rank == 1 and step == 5:
                notice.received = "SIGUSR1"  # what its handler records
            answers.append(Trainer._stop_requested(trainer, notice, save_step=step == 6))
        Path(out, f"rank{rank}.json").write_text(json.dumps(answers))
    finally:
        dist.destroy_process_group()


def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """Rank 1 alone is signalled at step 5; both learn it at the next agreement (the
    checkpoint of step 6 here; else step 8, every stop_check_every = 4) and stop together."""
    import torch.multiprocessing as mp

    mp.spawn(_stop_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        answers = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert answers.index(True) == 5  # step 6


def _levels_on_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of ``test_only_rank_0_logs_what_the_run_decided``."""
    import logging

    from cheff.train.distributed import process_group

    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    logging.getLogger("cheff.train").setLevel(logging.INFO)  # what the CLI sets
    with process_group("cpu"):
        level = logging.getLogger("cheff.train.loop").getEffectiveLevel()
    Path(out, f"rank{rank}.json").write_text(json.dumps(level))


def test_only_rank_0_logs_what_the_run_decided(tmp_path: Path) -> None:
    """The CLI's own level for cheff.train outranked the group's WARNING for cheff: every
    rank printed "training on ...", 16 copies on 2 x 8 GPUs."""
    import logging
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_levels_on_rank, args=(2, port, str(tmp_path)), nprocs=2)
    levels = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert levels == [logging.INFO, logging.WARNING]
