"""``guard sweep``: run a grid of jobs as Ray tasks (a local Ray by default, a cluster with --address).

Example::

    guard sweep benchmarks/grids/scan_zoo.yaml                      # local Ray, started and stopped here
    guard sweep grid.yaml --address ray://head:10001                # a running cluster
    guard sweep grid.yaml --serial                                  # the same jobs one after the other

The grid file names a job function, the parameters every job shares and the lists that vary (see
``guard.sweep.grid``). Results stream into the grid's ``out`` JSON as jobs finish, keyed by each job's config:
run the same command again after an interruption and only the unfinished (or failed) jobs run. A failing job is
reported with its parameters and does not stop the others; the exit code is 1 when any job failed.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import CLIError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a grid of jobs on Ray (local or a cluster), resumable",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="grid file (YAML): function, params, grid, jobs, resources, out")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--address", default=None,
                       help="a running Ray cluster (ray://HOST:10001 or auto); default: a local Ray")
    where.add_argument("--serial", action="store_true", help="run the jobs one after the other in this process")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--out", default=None, help="results JSON (default: the grid's out, or GRID.json beside it)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="export the sweep's progress (guard_sweep_*) for Prometheus on 127.0.0.1:PORT/metrics")
    p.add_argument("--dry-run", action="store_true", help="list the jobs and whether each is finished; run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run's summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from ..sweep import load_grid, run_sweep
    from ..sweep.runner import Store

    grid = load_grid(args.grid)
    if args.out is not None:
        grid = dataclasses.replace(grid, out=Path(args.out))
    if args.num_cpus is not None and args.num_cpus < 1:
        raise CLIError(f"--num-cpus must be >= 1, got {args.num_cpus}")
    if args.dry_run:
        store = Store.open(grid)
        for job in grid.jobs():  # what varies between jobs (the shared params are the grid's)
            state = store.records.get(job.key, {}).get("status", "todo")
            varying = {k: v for k, v in job.params.items() if grid.params.get(k, object()) != v}
            print(f"{job.key} {state:6s} {json.dumps(varying, default=str)}")
        return 0
    metrics = None
    if args.metrics_port is not None:
        from ..serving.metrics import PrometheusExporter
        from ..sweep import SWEEP_METRICS

        if not 0 < args.metrics_port < 65536:
            raise CLIError(f"--metrics-port must be a TCP port in 1..65535, got {args.metrics_port}")
        metrics = PrometheusExporter(SWEEP_METRICS)
        metrics.serve(args.metrics_port)
        print(f"sweep metrics on http://127.0.0.1:{args.metrics_port}/metrics", file=sys.stderr)
    report = run_sweep(grid, backend="serial" if args.serial else "ray", address=args.address,
                       num_cpus=args.num_cpus, progress=not args.no_progress, metrics=metrics)
    for failure in report.failed:
        print(f"guard sweep: job {failure.job.key} failed with params {json.dumps(failure.job.params, default=str)}: "
              f"{failure.record['error']}", file=sys.stderr)
    summary = {"grid": args.grid, "out": str(grid.out), **report.to_dict()}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{grid.name}: {report.ran} jobs run, {report.skipped} finished before, {len(report.failed)} failed, "
              f"of {report.total}, in {report.seconds:.1f} s ({report.backend}); results in {grid.out}")
    return 1 if report.failed else 0
