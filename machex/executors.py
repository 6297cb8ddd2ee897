"""Where the shard work runs: this machine (joblib) or a Dask cluster (local, remote, SLURM).

An executor has one job: run a list of ``ShardTask``s and yield each finished shard's
``ShardSummary``. What it writes does not depend on which executor ran it, in which order or
on how many workers: every shard's bytes are fixed by the plan. ``dask``, ``distributed`` and
``dask_jobqueue`` are imported only when a Dask executor starts.
"""

from __future__ import annotations

import importlib
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol

from joblib import Parallel, cpu_count, delayed
from joblib.externals.loky import get_reusable_executor

from machex.assemble import BuiltSample, build_in_worker
from machex.records import Failure
from machex.shardwork import ShardSummary, ShardTask, run_shard, write_shard

EXECUTORS = ("local", "dask")
CLUSTERS = ("slurm",)


class ExecutorError(RuntimeError):
    """The executor cannot start or go on as asked (exit code 2); says what to install or
    fix."""


class ShardsFailed(RuntimeError):
    """Shards that failed for good on the cluster (exit code 1); the others are done."""

    def __init__(self, failed: dict[str, str]) -> None:
        self.failed = failed
        listed = "; ".join(f"{stem}: {why}" for stem, why in sorted(failed.items())[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        super().__init__(
            f"{len(failed)} shard(s) failed on the cluster after their retries ({listed}{more}); "
            "the other shards of this source are done (sources after it were not started): run "
            "the same command again to retry these and go on"
        )


class ShardExecutor(Protocol):
    """Runs shard tasks; yields summaries as shards finish, calling ``on_advance(images)``."""

    def workers_used(self) -> int: ...

    def run(
        self, tasks: Sequence[ShardTask], on_advance: Callable[[int], None]
    ) -> Iterator[ShardSummary]: ...


def local_workers(workers: int) -> int:
    """joblib's count: ``-1`` all cores, ``-n`` all but ``n - 1``."""
    return workers if workers > 0 else max(1, cpu_count() + 1 + workers)


@dataclass(frozen=True)
class LocalExecutor:
    """joblib worker processes on this machine, parallel over images (not shards), so a
    source with a single shard still uses every core. The main process writes the shards."""

    workers: int = -1

    def workers_used(self) -> int:
        return local_workers(self.workers)

    def run(
        self, tasks: Sequence[ShardTask], on_advance: Callable[[int], None]
    ) -> Iterator[ShardSummary]:
        """Shards in order: joblib returns results in submission order, so shards fill one
        after another while the workers run ahead."""
        if not tasks:
            return
        task_of = [index for index, task in enumerate(tasks) for _ in task.spec.records]
        parallel = Parallel(n_jobs=self.workers, return_as="generator", batch_size=4)
        results = parallel(
            delayed(build_in_worker)(record, task.pixels, task.root, task.report)
            for task in tasks
            for record in task.spec.records
        )
        buffer: list[BuiltSample | Failure] = []
        finished = False
        try:
            for index, result in zip(task_of, results):
                buffer.append(result)
                on_advance(1)
                task = tasks[index]
                if len(buffer) == len(task.spec.records):  # every shard holds >= 1 record
                    yield write_shard(task.out, task.source, task.spec, buffer, task.report_owners)
                    buffer = []
            finished = True
        finally:
            if not finished:
                # Interrupted (Ctrl-C, an error, the consumer stopped): closing the generator
                # makes joblib stop dispatching and kill the running workers. Waiting for the
                # pool instead hangs: joblib's callback thread keeps submitting work to it.
                with warnings.catch_warnings():  # joblib's "tasks executed but not used"
                    warnings.simplefilter("ignore")
                    results.close()
            # joblib keeps its worker processes for reuse; a build run inside a
            # multiprocessing child (a scheduler, a notebook helper) would then hang at exit
            # joining them.
            if self.workers != 1:  # n_jobs=1 runs in this process: no pool to release
                get_reusable_executor().shutdown(wait=finished, kill_workers=not finished)


@dataclass(frozen=True)
class SlurmSettings:
    """A dask-jobqueue ``SLURMCluster``: ``jobs`` batch jobs, each ``cores`` single-threaded
    worker processes sharing ``memory`` for ``walltime``. ``extra``: more ``#SBATCH`` lines."""

    queue: str | None = None
    account: str | None = None
    jobs: int = 1
    cores: int = 8
    memory: str = "32GB"
    walltime: str = "04:00:00"
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class DaskSettings:
    """Which cluster: ``scheduler`` (an address such as ``tcp://host:8786``) connects to a
    running one; else ``cluster="slurm"`` asks SLURM for workers; else a ``LocalCluster``.

    ``retries``: re-runs of a shard whose task raised. A worker that dies mid-shard (killed,
    out of memory) is handled by the scheduler itself, which reruns the shard elsewhere up to
    ``distributed.scheduler.allowed-failures`` times (3 by default)."""

    scheduler: str | None = None
    cluster: str | None = None
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    retries: int = 2
    connect_timeout: float = 30.0


def check_executor(kind: str, dask: DaskSettings) -> None:
    """Reject settings that cannot work, before any file is read."""
    if kind not in EXECUTORS:
        raise ExecutorError(f"--executor {kind}: choose one of {', '.join(EXECUTORS)}")
    if kind == "local" and (dask.scheduler or dask.cluster):
        flag = "--scheduler" if dask.scheduler else "--cluster"
        raise ExecutorError(f"{flag} needs --executor dask")
    if dask.scheduler and dask.cluster:
        raise ExecutorError("give --scheduler ADDRESS (a running cluster) or --cluster, not both")
    if dask.cluster is not None and dask.cluster not in CLUSTERS:
        raise ExecutorError(f"--cluster {dask.cluster}: choose one of {', '.join(CLUSTERS)}")
    if dask.cluster != "slurm" and dask.slurm != SlurmSettings():
        raise ExecutorError("--slurm-* options need --executor dask --cluster slurm")
    if dask.slurm.jobs < 1 or dask.slurm.cores < 1:
        raise ExecutorError(
            f"--slurm-jobs and --slurm-cores must be at least 1, got {dask.slurm.jobs} "
            f"and {dask.slurm.cores}"
        )
    if dask.retries < 0:
        raise ExecutorError(f"retries must be 0 or more, got {dask.retries}")


@contextmanager
def open_executor(
    kind: str = "local", *, workers: int = -1, dask: DaskSettings | None = None
) -> Iterator[ShardExecutor]:
    """The executor asked for, started, and shut down (cluster and all) on leaving."""
    dask = dask or DaskSettings()
    check_executor(kind, dask)
    if kind == "local":
        yield LocalExecutor(workers)
        return
    with DaskExecutor(dask, workers=workers) as executor:
        yield executor


class DaskExecutor:
    """Each shard is one Dask task that builds the whole shard on a worker (reads its
    images, writes its tar and fragments, returns a ``ShardSummary``): a worker lost
    mid-shard loses that shard alone, and the scheduler reruns it.

    ``workers``: the ``LocalCluster``'s worker processes (``-1``: all cores). ``shard_fn``
    is what a worker runs per shard (tests wrap it to kill a worker mid-shard)."""

    #: Shards in flight at least; more with more worker threads (2 per thread). Bounded so
    #: the scheduler holds a few hundred shards' records at most, not the whole plan's.
    MIN_IN_FLIGHT = 64

    def __init__(
        self,
        settings: DaskSettings | None = None,
        *,
        workers: int = -1,
        shard_fn: Callable[[ShardTask], ShardSummary] = run_shard,
    ) -> None:
        self.settings = settings or DaskSettings()
        self.workers = workers
        self.shard_fn = shard_fn
        self._client: Any = None
        self._cluster: Any = None
        self._expected_threads = 0

    def __enter__(self) -> DaskExecutor:
        distributed = _import("distributed", "pip install 'dask[distributed]'")
        settings = self.settings
        try:
            if settings.scheduler:
                self._client = _connect(distributed, settings)
                self._expected_threads = _threads(self._client)
            elif settings.cluster == "slurm":
                self._cluster = _slurm_cluster(settings.slurm)
                self._cluster.scale(jobs=settings.slurm.jobs)
                self._client = distributed.Client(self._cluster)
                self._expected_threads = settings.slurm.jobs * settings.slurm.cores
            else:
                n_workers = local_workers(self.workers)
                self._cluster = distributed.LocalCluster(
                    n_workers=n_workers, threads_per_worker=1, processes=True
                )
                self._client = distributed.Client(self._cluster)
                self._expected_threads = n_workers
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def workers_used(self) -> int:
        """Worker threads asked for (SLURM, LocalCluster) or found (a running scheduler)."""
        return self._expected_threads

    def run(
        self, tasks: Sequence[ShardTask], on_advance: Callable[[int], None]
    ) -> Iterator[ShardSummary]:
        """Shards in completion order; ``ShardsFailed`` at the end names those that failed."""
        if self._client is None:
            raise ExecutorError("DaskExecutor.run outside `with DaskExecutor(...)`")
        from distributed import as_completed

        client = self._client
        waiting = iter(tasks)
        in_flight: dict[str, tuple[Any, ShardTask]] = {}

        def submit(task: ShardTask) -> Any:
            key = f"machex-shard-{task.spec.stem}-{uuid.uuid4().hex[:8]}"
            future = client.submit(
                self.shard_fn, task, key=key, retries=self.settings.retries, pure=False
            )
            in_flight[future.key] = (future, task)
            return future

        completed = as_completed([submit(t) for t in islice(waiting, self._window())])
        failed: dict[str, str] = {}
        try:
            for future in completed:
                _, task = in_flight.pop(future.key)
                try:
                    summary = future.result()
                except Exception as error:  # noqa: BLE001 - reported with its shard below
                    failed[task.spec.stem] = f"{type(error).__name__}: {error}"
                else:
                    on_advance(len(task.spec.records))
                    yield summary
                finally:
                    future.release()
                for more in islice(waiting, max(0, self._window() - len(in_flight))):
                    completed.add(submit(more))
        except OSError as error:  # distributed's CommClosedError: the scheduler went away
            raise ExecutorError(
                f"lost the Dask scheduler ({type(error).__name__}: {error}); the shards "
                "finished so far are kept: run the same command again to go on"
            ) from None
        finally:
            if in_flight:  # interrupted: nothing more runs for this build
                with suppress(OSError):  # a scheduler that is gone cancels nothing
                    client.cancel([future for future, _ in in_flight.values()])
        if failed:
            raise ShardsFailed(failed)

    def _window(self) -> int:
        threads = max(self._expected_threads, _threads(self._client))
        return max(self.MIN_IN_FLIGHT, 2 * threads)


def _import(module: str, install: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExecutorError(
            f"--executor dask needs the {module} package, which is not installed: {install}"
        ) from None


def _connect(distributed: Any, settings: DaskSettings) -> Any:
    try:
        return distributed.Client(settings.scheduler, timeout=settings.connect_timeout)
    except (OSError, TimeoutError, ValueError) as error:
        raise ExecutorError(
            f"cannot reach the Dask scheduler at {settings.scheduler} ({error}); is "
            "`dask scheduler` running there, and its port open from this machine?"
        ) from None


def _threads(client: Any) -> int:
    return sum(client.nthreads().values())


def _slurm_cluster(slurm: SlurmSettings) -> Any:
    """A ``SLURMCluster`` of single-threaded worker processes, one per core (the image
    pipeline holds the GIL: threads would not run in parallel)."""
    jobqueue = _import("dask_jobqueue", "pip install dask-jobqueue")
    try:
        return jobqueue.SLURMCluster(
            queue=slurm.queue,
            account=slurm.account,
            cores=slurm.cores,
            processes=slurm.cores,
            memory=slurm.memory,
            walltime=slurm.walltime,
            job_extra_directives=list(slurm.extra),
        )
    except (ValueError, TypeError, RuntimeError) as error:
        raise ExecutorError(f"cannot set up the SLURM cluster: {error}") from None
