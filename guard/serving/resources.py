"""The files guard ships for TorchServe, as package data under ``guard/serving/assets/``.

Found through :mod:`importlib.resources`, so a regular install, an editable install and a source checkout
all read the same files: the handler packed into every archive, the TorchServe configuration ``guard
serve`` starts from, and the metrics file that declares :data:`guard.serving.METRICS` to TorchServe.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ASSETS = resources.files(__package__) / "assets"
if not isinstance(ASSETS, Path):  # TorchServe and torch-model-archiver read these files from disk
    raise ImportError(f"guard.serving needs its package data on disk, found {ASSETS!r}; install guard with pip")

#: the TorchServe handler of guarded archives (the only code importing ``ts``)
HANDLER_FILE = ASSETS / "guard_handler.py"
#: the TorchServe configuration ``guard serve`` starts from (loopback addresses, batching, token auth)
TS_CONFIG_FILE = ASSETS / "config.properties"
#: the metrics TorchServe accepts from guarded handlers (the same list as ``guard.serving.METRICS``)
METRICS_FILE = ASSETS / "metrics.yaml"
