"""Sweeps: a grid of jobs (attack × defense × seed × model, or a list of checkpoints to scan) run as Ray tasks
with declared resources, streamed as they finish, resumed without rerunning finished jobs.

Example::

    from guard.sweep import Grid, run_sweep
    grid = Grid(name="demo", function="mypackage.jobs:evaluate", params={"model": "resnet20"},
                grid={"seed": [0, 1, 2]}, out=Path("demo.json"))
    report = run_sweep(grid)                      # a local Ray, started and stopped here
    report = run_sweep(grid, backend="serial")    # the same jobs one after the other in this process

``guard sweep GRID.yaml [--address ray://HOST:10001]`` runs a grid file (see ``guard.sweep.grid``).
"""

from .commands import commands
from .grid import Grid, Job, Resources, job_key, load_grid, resolve_function
from .runner import SWEEP_METRICS, JobResult, SweepReport, execute, iter_sweep, run_sweep

__all__ = ["SWEEP_METRICS", "Grid", "Job", "JobResult", "Resources", "SweepReport", "commands", "execute", "iter_sweep",
           "job_key", "load_grid", "resolve_function", "run_sweep"]
