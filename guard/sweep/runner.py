"""Run a grid's jobs serially or as Ray tasks, stream their results as they finish, and keep them in one JSON
file keyed by each job's key, so that an interrupted sweep resumes without rerunning a finished job.

The store (``grid.out``)::

    {"sweep": NAME, "function": ..., "resources": {...}, "total": N, "finished": M, "failed": F,
     "jobs": {KEY: {"params": {...}, "status": "ok" | "failed", "result": {...} | null,
                    "error": "ValueError: ..." | null, "traceback": ..., "seconds": 1.2, "host": ..., "pid": ...}}}

A job that raises is recorded as failed with its parameters and the error and the sweep goes on; a job whose
worker dies is recorded the same way (after ``resources.retries`` reruns). A failed job runs again on the next
run; a finished one does not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

from ..serving.metrics import MetricSpec, PrometheusExporter
from .grid import Grid, Job, accepts, expand_env, resolve_function

log = logging.getLogger(__name__)

#: what a sweep's driver exports (``guard sweep --metrics-port``): finished jobs by status, their durations, and
#: the jobs still to run
SWEEP_JOBS = MetricSpec("guard_sweep_jobs_total", "counter", "jobs", ("sweep", "status"))
SWEEP_JOB_SECONDS = MetricSpec("guard_sweep_job_seconds", "histogram", "seconds", ("sweep",),
                               buckets=(1, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf")))
SWEEP_REMAINING = MetricSpec("guard_sweep_jobs_remaining", "gauge", "jobs", ("sweep",))
SWEEP_METRICS = (SWEEP_JOBS, SWEEP_JOB_SECONDS, SWEEP_REMAINING)


def execute(function: str, params: dict[str, Any], threads: int | None, workdir: str | None) -> dict[str, Any]:
    """Run one job where it is scheduled (this process or a Ray worker) and return its record; never raises for an
    error of the job itself."""
    import torch

    started = time.perf_counter()
    record: dict[str, Any] = {"status": "ok", "result": None, "error": None, "traceback": None,
                              "host": socket.gethostname(), "pid": os.getpid()}
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        fn = resolve_function(function)
        kwargs = expand_env(params)
        if workdir is not None and accepts(fn, "workdir"):
            Path(workdir).mkdir(parents=True, exist_ok=True)
            kwargs["workdir"] = workdir
        result = fn(**kwargs)
        record["result"] = json.loads(json.dumps(result if result is not None else {}))
    except Exception as exc:  # the job's own failure is its result; the sweep goes on
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    finally:
        torch.set_num_threads(previous)
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


@dataclasses.dataclass
class Store:
    """The sweep's JSON file: every job's record by key, rewritten atomically after each finished job."""

    path: Path | None
    header: dict[str, Any]
    records: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def open(cls, grid: Grid) -> "Store":
        header = {"sweep": grid.name, "function": grid.function, "resources": dataclasses.asdict(grid.resources)}
        records = {}
        if grid.out is not None and grid.out.is_file():
            try:
                records = json.loads(grid.out.read_text()).get("jobs", {})
            except (json.JSONDecodeError, AttributeError) as exc:
                raise ValueError(f"sweep results {grid.out}: expected the JSON a sweep writes, got unreadable "
                                 f"content ({exc}); move it away to start afresh") from None
        return cls(grid.out, header, records)

    def finished(self, job: Job) -> bool:
        record = self.records.get(job.key)
        return record is not None and record.get("status") == "ok"

    def add(self, job: Job, record: dict[str, Any], jobs: list[Job]) -> None:
        self.records[job.key] = {"params": job.params, **record}
        self.save(jobs)

    def save(self, jobs: list[Job]) -> None:
        """Write every record (those of jobs no longer in the grid too); the counts are the grid's ``jobs``'."""
        if self.path is None:
            return
        statuses = [self.records.get(job.key, {}).get("status") for job in jobs]
        data = {**self.header, "total": len(jobs), "finished": statuses.count("ok"),
                "failed": statuses.count("failed"), "jobs": self.records}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)


@dataclasses.dataclass(frozen=True)
class JobResult:
    """A finished job as the sweep streams it."""

    job: Job
    record: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.record["status"] == "ok"

    @property
    def result(self) -> dict[str, Any] | None:
        return self.record["result"]


@dataclasses.dataclass(frozen=True)
class SweepReport:
    """What a run did: jobs run now, skipped as finished before, and failed (with their records)."""

    total: int
    ran: int
    skipped: int
    failed: list[JobResult]
    results: dict[str, dict[str, Any]]
    seconds: float
    backend: str

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "ran": self.ran, "skipped": self.skipped, "seconds": round(self.seconds, 2),
                "backend": self.backend,
                "failed": [{"key": r.job.key, "params": r.job.params, "error": r.record["error"]} for r in self.failed]}


def _workdir(grid: Grid, job: Job) -> str | None:
    return None if grid.out is None else str(grid.out.with_suffix("").with_name(grid.out.stem + ".jobs") / job.key)


def _serial(grid: Grid, jobs: list[Job]) -> Iterator[JobResult]:
    for job in jobs:
        yield JobResult(job, execute(grid.function, job.params, None, _workdir(grid, job)))


def _ray(grid: Grid, jobs: list[Job]) -> Iterator[JobResult]:
    import ray

    r = grid.resources
    options: dict[str, Any] = {"num_cpus": r.cpus, "num_gpus": r.gpus, "max_retries": r.retries}
    if r.memory_mb is not None:
        options["memory"] = r.memory_mb * 2**20
    task = ray.remote(execute)
    pending = {task.options(name=f"{grid.name}:{job.key}", **options).remote(
        grid.function, job.params, r.threads, _workdir(grid, job)): job for job in jobs}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory, segfault)
                    record = {"status": "failed", "result": None, "error": f"{type(exc).__name__}: {exc}",
                              "traceback": None, "host": None, "pid": None, "seconds": None}
                yield JobResult(job, record)
    finally:
        for ref in pending:  # interrupted: stop what is still running
            ray.cancel(ref, force=True)


def iter_sweep(grid: Grid, *, backend: str = "ray", address: str | None = None,
               num_cpus: int | None = None) -> Iterator[JobResult]:
    """Stream the results of ``grid``'s unfinished jobs as they finish, recording each in the store first.

    ``backend``: ``ray`` (tasks with the grid's resources; a local Ray is started and stopped unless one is
    running in this process or ``address`` names a cluster) or ``serial`` (one job after the other here).
    """
    if backend not in ("ray", "serial"):
        raise ValueError(f"backend: expected 'ray' or 'serial', got {backend!r}")
    resolve_function(grid.function)  # fail before any work on a function that does not import
    store = Store.open(grid)
    jobs = grid.jobs()
    todo = [job for job in jobs if not store.finished(job)]
    store.save(jobs)
    if not todo:
        return
    if backend == "serial":
        stream = _serial(grid, todo)
        started_ray = False
    else:
        from .._validation import require_extra

        require_extra("ray", "sweep", "guard sweep on Ray")
        import ray

        started_ray = not ray.is_initialized()
        if started_ray:  # Ray logs its dashboard's address (127.0.0.1:8265 locally, with ray[default]); the
            # jobs' output reaches this process's, prefixed with the worker
            ray.init(address=address, num_cpus=None if address else num_cpus,
                     runtime_env=grid.runtime_env if address else None)
        stream = _ray(grid, todo)
    try:
        for result in stream:
            store.add(result.job, result.record, jobs)
            yield result
    finally:
        stream.close()
        if started_ray:
            import ray

            ray.shutdown()


def run_sweep(grid: Grid, *, backend: str = "ray", address: str | None = None, num_cpus: int | None = None,
              progress: bool = False, metrics: PrometheusExporter | None = None) -> SweepReport:
    """Run ``grid`` to the end (see ``iter_sweep``) and return what happened; every job's record, finished now
    or before, is in ``results`` by key and in the store. ``metrics``: an exporter declaring
    :data:`SWEEP_METRICS`, updated as jobs finish."""
    started = time.perf_counter()
    resolve_function(grid.function)
    jobs = grid.jobs()
    store = Store.open(grid)
    skipped = sum(store.finished(job) for job in jobs)
    results = {job.key: store.records[job.key] for job in jobs if store.finished(job)}
    ran, failed = 0, []
    if metrics is not None:
        metrics.emit(SWEEP_REMAINING, len(jobs) - skipped, grid.name)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), initial=skipped, desc=grid.name, unit="job")
    for result in iter_sweep(grid, backend=backend, address=address, num_cpus=num_cpus):
        ran += 1
        results[result.job.key] = {"params": result.job.params, **result.record}
        if metrics is not None:
            metrics.emit(SWEEP_JOBS, 1, grid.name, result.record["status"])
            if result.record["seconds"] is not None:
                metrics.emit(SWEEP_JOB_SECONDS, result.record["seconds"], grid.name)
            metrics.emit(SWEEP_REMAINING, len(jobs) - skipped - ran, grid.name)
        if not result.ok:
            failed.append(result)
            log.info("job %s failed %s: %s", result.job.key, json.dumps(result.job.params, default=str),
                        result.record["error"])
        if bar is not None:
            bar.update()
            bar.set_postfix(failed=len(failed))
    if bar is not None:
        bar.close()
    return SweepReport(total=len(jobs), ran=ran, skipped=skipped, failed=failed, results=results,
                       seconds=time.perf_counter() - started, backend=backend)
