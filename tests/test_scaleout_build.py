"""Preprocessing on a cluster: a Dask build, ``--part`` runs plus ``machex merge``, and a
worker killed mid-shard all give the very files of a local build."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.machex_cli import app
from machex.build import BuildOptions, plan_source, read_build_file, shard_specs
from machex.collection import build_collection, read_roots
from machex.executors import DaskExecutor, DaskSettings, ExecutorError, ShardsFailed
from machex.parts import Part, PartError
from machex.shards import ShardWriter
from machex.shardwork import ShardSummary, ShardTask, process_shard, run_shard, shard_path

runner = CliRunner()
SOURCES = ("chestxray14", "chexpert")
SHARD_SIZE = "3"  # 34 images -> 12 shards: several per split and per part
WORKERS = "2"
#: build.json's timestamps: the only bytes that differ between two builds of the same data.
TIMESTAMPS = ("updated", "finished")
#: The shard whose first worker dies mid-write (test_a_worker_killed_mid_shard_is_retried).
VICTIM = "chexpert-train-000001"


@pytest.fixture(scope="module")
def roots_file(tmp_path_factory: pytest.TempPathFactory, sample_roots_pristine) -> Path:
    path = tmp_path_factory.mktemp("roots") / "roots.toml"
    path.write_text("".join(f'{s} = "{sample_roots_pristine[s]}"\n' for s in SOURCES))
    return path


def build_args(roots_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        "build",
        "-s",
        "all",
        "--roots",
        str(roots_file),
        "--out",
        str(out),
        "-j",
        WORKERS,
        "--shard-size",
        SHARD_SIZE,
        "-q",
        *extra,
    ]


def invoke(args: list[str], code: int = 0) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def local_build(tmp_path_factory: pytest.TempPathFactory, roots_file: Path) -> Path:
    out = tmp_path_factory.mktemp("local") / "machex"
    invoke(build_args(roots_file, out))
    return out


def snapshot(out: Path) -> dict[str, object]:
    """Every file under ``out`` (tars, parquet fragments, lock files) by path, as bytes;
    build.json parsed, less its timestamps (``TIMESTAMPS``), which differ run to run."""
    files: dict[str, object] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        files[str(path.relative_to(out))] = path.read_bytes()
    document = json.loads(files.pop("build.json"))
    for entry in document["sources"].values():
        for key in TIMESTAMPS:
            entry.pop(key)
    return {"files": files, "build.json": document}


def assert_identical(expected: Path, actual: Path, *, resumed: str | None = None) -> None:
    """Same files, byte for byte; ``resumed``: a source finished by a second run, whose
    ``shards_written`` counts that run's shards only."""
    want, got = snapshot(expected), snapshot(actual)
    if resumed:
        for document in (want, got):
            document["build.json"]["sources"][resumed].pop("shards_written")
    assert sorted(got["files"]) == sorted(want["files"])
    assert any(name.endswith(".tar") for name in want["files"])
    for name, data in want["files"].items():
        assert got["files"][name] == data, name
    assert got["build.json"] == want["build.json"]


@pytest.mark.slow
def test_a_dask_local_cluster_builds_what_local_builds(roots_file, local_build, tmp_path):
    out = tmp_path / "dask"
    invoke(build_args(roots_file, out, "--executor", "dask"))  # a LocalCluster of 2 processes
    assert_identical(local_build, out)


@pytest.mark.slow
def test_two_parts_and_a_merge_build_what_local_builds(
    roots_file, local_build, sample_roots_pristine, tmp_path
):
    out = tmp_path / "parts"
    output = invoke(build_args(roots_file, out, "--part", "0/2"))
    assert "machex merge" in output
    record = json.loads((out / ".parts/chexpert/part-0-of-2.json").read_text())
    assert record["status"] == "complete"
    plan = plan_source("chexpert", sample_roots_pristine["chexpert"])
    stems = [spec.stem for spec in shard_specs(plan, int(SHARD_SIZE))]
    assert record["shards"] == stems[0::2]  # every other shard of the plan, from the first
    assert sorted(p.stem for p in out.glob("shards/chexpert/*.tar")) == stems[0::2]
    assert not (out / "build.json").exists()  # parts never write it: no two parts share a file
    invoke(build_args(roots_file, out, "--part", "1/2"))
    invoke(["merge", str(out)])
    assert not (out / ".parts").exists()
    assert_identical(local_build, out)
    # Merged: a plain build of the same folder has nothing left to do.
    assert "nothing to do" in invoke(build_args(roots_file, out))


def test_merge_with_a_missing_part_names_it(roots_file, tmp_path):
    out = tmp_path / "half"
    invoke(build_args(roots_file, out, "--part", "1/2", "-j", "1"))
    output = invoke(["merge", str(out)], code=2)
    assert "part 0/2 missing" in output and "part-0-of-2.json" in output
    assert (out / ".parts").is_dir() and not (out / "build.json").exists()
    # Another split of the same folder: advice that works with --part (it used to suggest
    # deleting .parts, after which the build asked for --overwrite, which --part refuses).
    output = invoke(build_args(roots_file, out, "--part", "0/3", "-j", "1"), code=2)
    assert "2-way split, not 3" in output and "into a new --out" in output


def crash_once(task: ShardTask) -> ShardSummary:
    """A Dask worker's shard function whose first run of ``VICTIM`` dies mid-write: half a
    tar in its temporary file, then the process ends (``os._exit``: no cleanup at all)."""
    marker = task.out.parent / f"crashed-{task.spec.stem}"
    if task.spec.stem == VICTIM and not marker.exists():
        marker.touch()
        samples = process_shard(task)
        writer = ShardWriter(shard_path(task.out, task.source, task.spec.stem))
        writer.add("half.jpg", b"\0" * 5000)
        assert samples and writer.tmp_path.exists()
        os._exit(1)
    return run_shard(task)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A LocalCluster of 2 worker processes; yields its scheduler's address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as local:
        yield local.scheduler_address


def build_on(scheduler: str, roots_file: Path, out: Path, shard_fn=run_shard, retries=2) -> None:
    """The sample built through the API on a running cluster, with the CLI's options."""
    from distributed import Client

    with Client(scheduler) as client:  # a worker killed by the test before may be restarting
        client.wait_for_workers(2, timeout=60)
    options = BuildOptions(workers=int(WORKERS), shard_size=int(SHARD_SIZE))
    settings = DaskSettings(scheduler=scheduler, retries=retries)
    with DaskExecutor(settings, shard_fn=shard_fn) as executor:
        assert executor.workers_used() == 2
        build_collection(read_roots(roots_file), out, options, executor=executor)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_worker_killed_mid_shard_is_retried(cluster, roots_file, local_build, tmp_path):
    out = tmp_path / "killed" / "machex"
    build_on(cluster, roots_file, out, shard_fn=crash_once)
    assert (out.parent / f"crashed-{VICTIM}").exists(), "the worker was not killed"
    assert not list(out.rglob("*.tmp"))  # what the dead worker left is gone
    assert_identical(local_build, out)


def fail_victim(task: ShardTask) -> ShardSummary:
    """Every run of ``VICTIM`` raises (a disk that refuses it); the other shards build."""
    if task.spec.stem == VICTIM:
        raise OSError(f"no space left for {task.spec.stem}")
    return run_shard(task)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_shard_failing_for_good_is_named_and_resumable(
    cluster, roots_file, local_build, tmp_path
):
    out = tmp_path / "failing"
    with pytest.raises(ShardsFailed, match=f"{VICTIM}: OSError: no space left") as error:
        build_on(cluster, roots_file, out, shard_fn=fail_victim, retries=1)
    assert list(error.value.failed) == [VICTIM]
    assert read_build_file(out)["sources"]["chexpert"]["status"] == "in_progress"
    assert not (out / "manifests/images/source=chexpert" / f"{VICTIM}.parquet").exists()
    build_on(cluster, roots_file, out)  # the same build again: only the failed shard is left
    assert read_build_file(out)["sources"]["chexpert"]["shards_written"] == 1
    assert_identical(local_build, out, resumed="chexpert")


def test_unreachable_scheduler_is_a_clear_error() -> None:
    settings = DaskSettings(scheduler="tcp://127.0.0.1:9", connect_timeout=1)
    with pytest.raises(ExecutorError, match="cannot reach the Dask scheduler at tcp://"):
        DaskExecutor(settings).__enter__()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--part", "2/2"], "numbered from 0"),
        (["--part", "1-2"], "expected I/N"),
        (["--scheduler", "tcp://h:8786"], "--scheduler needs --executor dask"),
        (["--executor", "spark"], "choose one of local, dask"),
        (["--executor", "dask", "--cluster", "pbs"], "choose one of slurm"),
        (["--executor", "dask", "--slurm-jobs", "4"], "need --executor dask --cluster slurm"),
        (["--part", "0/2", "--overwrite"], "--overwrite cannot be combined with --part"),
    ],
)
def test_bad_cluster_options_exit_2(roots_file, tmp_path, extra, message) -> None:
    output = invoke(build_args(roots_file, tmp_path / "o", *extra), code=2)
    assert message in output
    assert not (tmp_path / "o" / "shards").exists()


def test_parts_split_the_plan_round_robin() -> None:
    shards = list(range(7))
    parts = [Part.parse(f"{i}/3") for i in range(3)]
    assert [p.select(shards) for p in parts] == [[0, 3, 6], [1, 4], [2, 5]]
    assert Part.parse(" 1 / 3 ").label == "1/3"
    for bad in ("3/3", "-1/3", "0/0", "a/b", "1"):
        with pytest.raises(PartError):
            Part.parse(bad)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_losing_the_scheduler_mid_build_says_the_same_command_resumes(
    cluster, roots_file, local_build, tmp_path, monkeypatch
):
    """A scheduler that went away surfaced as a 137-line CommClosedError traceback (exit 1);
    it is one ExecutorError (exit 2) saying the finished shards are kept."""
    from distributed.comm.core import CommClosedError

    real_window, calls = DaskExecutor._window, []

    def window(self):
        calls.append(1)
        if len(calls) == 3:  # mid-build: some shards done, some in flight
            raise CommClosedError("in <TCP (closed)>: Stream is closed")
        return real_window(self)

    monkeypatch.setattr(DaskExecutor, "_window", window)
    out = tmp_path / "lost"
    with pytest.raises(ExecutorError, match="lost the Dask scheduler .* run the same command"):
        build_on(cluster, roots_file, out)
    monkeypatch.undo()
    build_on(cluster, roots_file, out)
    assert_identical(local_build, out, resumed="chestxray14")
