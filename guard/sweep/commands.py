"""The built-in job: a chain of ``guard`` commands (scan a checkpoint, poison then repair, ...) per grid point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def commands(commands: list[list[str]], workdir: str | None = None, result: str | None = None,
             **params: Any) -> dict[str, Any]:
    """Run each ``guard`` command of ``commands`` in order, each in a child process on this job's threads.

    ``{name}`` in an argument is the job's parameter ``name``; ``{workdir}`` is the job's own directory beside
    the sweep's results. Returns the JSON file ``result`` names (``guard scan --out {workdir}/scan.json``), or
    else the JSON the last command printed (``--json``).

    Raises ``RuntimeError`` naming the command and its last error line when one exits non-zero (the sweep
    records the job as failed).
    """
    import torch

    if not isinstance(commands, list) or not commands or not all(isinstance(c, list) for c in commands):
        raise ValueError(f"commands: expected a non-empty list of argument lists like [[scan, --model, resnet20, "
                         f"...]], got {commands!r}")
    if workdir is None:  # a grid without an out file: a fresh directory for this job
        workdir = tempfile.mkdtemp(prefix="guard-sweep-")
    values = {**params, "workdir": workdir}

    def fill(text: Any) -> str:
        try:
            return str(text).format(**values)
        except KeyError as exc:
            raise ValueError(f"commands: {{{exc.args[0]}}} in {text!r} is not a parameter of this job; "
                             f"its parameters are {sorted(values)}") from None

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for argv in commands:
        argv = [fill(a) for a in argv]
        done = subprocess.run([sys.executable, "-m", "guard.cli", *argv], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output on stderr)"])[-1]
            raise RuntimeError(f"`guard {' '.join(argv)}` exited with code {done.returncode}: {last}")
    if result is None:
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            raise ValueError(f"result: `guard {' '.join(argv)}` printed no JSON; add --json to it or name the "
                             f"file it writes as result") from None
    path = Path(fill(result))
    if not path.is_file():
        raise FileNotFoundError(f"result: the commands did not write {path}")
    return json.loads(path.read_text())
