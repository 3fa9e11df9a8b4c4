"""Checks for tests whose result comes out of training or optimization.

Such a test must hold with margin on any CPU and for any seed, not for one lucky draw. Every seed these tests
use is offset by ``SEED`` (``GUARD_TEST_SEED``, default 0), and each assertion goes through :func:`check`,
which records the value, the bound and the margin in the JSON-lines file named by ``GUARD_MARGIN_LOG``.
``tests/audit_outcomes.py`` reruns the ``outcome``-marked tests over seeds 0–4 under both OpenMP wait
policies and tabulates the smallest margin of every check.
"""

from __future__ import annotations

import json
import os

SEED = int(os.environ.get("GUARD_TEST_SEED", "0"))


def check(what: str, value: float, *, low: float | None = None, high: float | None = None) -> None:
    """Assert ``low <= value <= high`` (either bound optional) and log the margin to the nearer bound."""
    value = float(value)
    margins = ([value - low] if low is not None else []) + ([high - value] if high is not None else [])
    if not margins:
        raise ValueError("check needs a low or a high bound")
    log = os.environ.get("GUARD_MARGIN_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(log, "a") as f:
            f.write(json.dumps({"test": test, "check": what, "value": value, "low": low, "high": high,
                                "margin": min(margins), "seed": SEED,
                                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}) + "\n")
    bounds = f"{'-inf' if low is None else low} <= {what} <= {'inf' if high is None else high}"
    assert min(margins) >= 0, f"{what} = {value:.4f}, expected {bounds} (seed offset {SEED})"
