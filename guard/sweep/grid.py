"""A sweep's grid: one job function, the parameters every job shares, the points that vary, the resources each
job declares. Loaded from YAML (``guard sweep GRID.yaml``) or built in Python (the benchmark scripts).

Grid file::

    name: scan-zoo                      # default: the file's stem
    function: guard.sweep:commands      # "package.module:function" or "path/to/file.py:function"
    params: {model: resnet20}           # shared by every job
    grid: {seed: [0, 1, 2]}             # the cartesian product of these lists ...
    jobs: [{weights: a.pt}, {weights: b.pt}]   # ... times these explicit points (a list of checkpoints)
    resources: {cpus: 1, gpus: 0, memory_mb: 4000, retries: 0}
    out: scan_zoo.json                  # default: GRID.json beside the file
    runtime_env: {working_dir: .}       # passed to ray.init when the sweep runs on a cluster

A job is ``function(**params)`` returning a JSON-serializable dict. Its key is a hash of the function and its
declared parameters: a job with the same key is the same job, so a finished one is never run again. ``${VAR}``
in a string parameter is the environment variable, expanded where the job runs (not part of the key).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from .._validation import is_int, is_number

_GRID_KEYS = ("name", "function", "params", "grid", "jobs", "resources", "out", "runtime_env")


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one job holds while it runs: Ray schedules on these, and the job runs torch on ``cpus`` threads."""

    cpus: float = 1
    gpus: float = 0
    memory_mb: int | None = None
    #: how many times Ray reruns a job whose worker process died (an exception inside the job is not retried)
    retries: int = 0

    def __post_init__(self) -> None:
        if not is_number(self.cpus) or self.cpus <= 0:
            raise ValueError(f"resources.cpus: expected a number > 0, got {self.cpus!r}")
        if not is_number(self.gpus) or self.gpus < 0:
            raise ValueError(f"resources.gpus: expected a number >= 0, got {self.gpus!r}")
        if self.memory_mb is not None and (not is_int(self.memory_mb) or self.memory_mb <= 0):
            raise ValueError(f"resources.memory_mb: expected a positive integer or null, got {self.memory_mb!r}")
        if not is_int(self.retries) or self.retries < 0:
            raise ValueError(f"resources.retries: expected an integer >= 0, got {self.retries!r}")

    @property
    def threads(self) -> int:
        """The torch threads a job runs on: its CPUs, at least one."""
        return max(1, int(self.cpus))


@dataclasses.dataclass(frozen=True)
class Job:
    """One point of the grid: ``function(**params)``, identified by ``key``."""

    key: str
    params: dict[str, Any]


def job_key(function: str, params: Mapping[str, Any]) -> str:
    """The hash of the function and its declared parameters (before ``${VAR}`` expansion)."""
    text = json.dumps({"function": function, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Grid:
    """A validated grid; ``jobs()`` expands it in a fixed order (explicit points outer, grid lists inner)."""

    name: str
    function: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid: dict[str, list] = dataclasses.field(default_factory=dict)
    #: explicit points (``jobs:`` in a file), each multiplied by the grid lists; None: the grid lists alone
    points: list[dict[str, Any]] | None = None
    resources: Resources = Resources()
    out: Path | None = None
    runtime_env: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        if not isinstance(self.function, str) or ":" not in self.function:
            raise ValueError(f"function: expected 'package.module:function' or 'path/file.py:function', "
                             f"got {self.function!r}")
        for field, shown, kind in (("params", "params", dict), ("grid", "grid", dict), ("points", "jobs", list)):
            value = getattr(self, field)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"{shown}: expected a {'mapping' if kind is dict else 'list'}, got {value!r}")
        for name, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid.{name}: expected a non-empty list of values, got {values!r}")
        for i, point in enumerate(self.points or []):
            if not isinstance(point, dict):
                raise ValueError(f"jobs[{i}]: expected a mapping of parameters, got {point!r}")
            clash = set(point) & set(self.grid)
            if clash:
                raise ValueError(f"jobs[{i}]: parameters {sorted(clash)} are also grid lists; set each in one place")
        if self.runtime_env is not None and not isinstance(self.runtime_env, dict):
            raise ValueError(f"runtime_env: expected a mapping, got {self.runtime_env!r}")

    def jobs(self) -> list[Job]:
        names = list(self.grid)
        jobs, seen = [], set()
        for point in [{}] if self.points is None else self.points:
            for values in itertools.product(*(self.grid[n] for n in names)):
                params = {**self.params, **point, **dict(zip(names, values))}
                key = job_key(self.function, params)
                if key not in seen:
                    seen.add(key)
                    jobs.append(Job(key, params))
        return jobs

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], *, base: Path | None = None, name: str | None = None) -> "Grid":
        """A grid from its YAML/JSON form; ``base`` is the directory relative paths (``out``) start from."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"a grid: expected a mapping with keys {list(_GRID_KEYS)}, got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(_GRID_KEYS))
        if unknown:
            raise ValueError(f"a grid: unknown keys {unknown}; expected some of {list(_GRID_KEYS)}")
        if "function" not in spec:
            raise ValueError("a grid: expected a 'function' key ('package.module:function' or 'file.py:function')")
        resources = spec.get("resources") or {}
        if not isinstance(resources, Mapping):
            raise ValueError(f"resources: expected a mapping, got {resources!r}")
        fields = {f.name for f in dataclasses.fields(Resources)}
        if set(resources) - fields:
            raise ValueError(f"resources: unknown keys {sorted(set(resources) - fields)}; expected some of "
                             f"{sorted(fields)}")
        function = spec["function"]
        module, _, attr = function.partition(":") if isinstance(function, str) else ("", "", "")
        if module.endswith(".py") and base is not None and not Path(module).is_absolute():
            function = f"{(base / module).resolve()}:{attr}"
        out = spec.get("out")
        out = None if out is None else Path(os.path.normpath(out if base is None else base / out))
        return cls(name=spec.get("name") or name or "sweep", function=function, params=spec.get("params") or {},
                   grid=spec.get("grid") or {}, points=spec.get("jobs"),
                   resources=Resources(**resources), out=out, runtime_env=spec.get("runtime_env"))


def load_grid(path: str | Path) -> Grid:
    """Read a grid file (YAML or JSON); its ``out`` defaults to ``GRID.json`` beside it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"grid file {path}: not valid YAML ({exc})") from None
    grid = Grid.from_dict(spec, base=path.parent.resolve(), name=path.stem)
    return grid if grid.out is not None else dataclasses.replace(grid, out=path.with_suffix(".json"))


def resolve_function(spec: str) -> Callable[..., Any]:
    """``package.module:function`` (imported) or ``path/file.py:function`` (loaded from the file, its directory
    first on ``sys.path`` so its sibling modules import)."""
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"job function {spec!r}: {path} does not exist")
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        unique = f"_guard_sweep_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}_{path.stem}"
        module = sys.modules.get(unique)
        if module is None:
            loader = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[unique] = module
            loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"job function {spec!r}: cannot import {module_name!r} ({exc})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"job function {spec!r}: {module.__name__} has no function {attr!r}")
    return function


def expand_env(value: Any) -> Any:
    """``${VAR}`` in every string of ``value`` (nested lists and mappings too) replaced by the environment's."""
    if isinstance(value, str):
        expanded = os.path.expandvars(value)
        unset = re.findall(r"\$\{(\w+)\}", expanded)
        if unset:
            raise ValueError(f"{value!r}: environment variable {unset[0]} is not set where the job runs")
        return expanded
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    return value


def accepts(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` takes a keyword ``name`` (explicitly or through ``**kwargs``)."""
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
