"""A worker that runs out of memory answers what fits instead of dying: the memory cap of the guard config, and
server batches retried in halves.

Without a cap a CPU worker that outgrows the host is killed by the kernel and TorchServe restarts it into the same
batch configuration; with ``memory_limit_mb`` the allocator refuses instead (``RLIMIT_AS`` on the CPU,
:func:`torch.cuda.set_per_process_memory_fraction` on a GPU), the handler catches the refusal, logs it, frees
what it can and retries the batch in halves, down to single requests (a single request that still does not fit
gets a 507; its batch-mates their answers).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import re
import resource
from typing import Any, Callable

import torch

__all__ = ["concat", "limit_memory", "out_of_memory", "run_in_halves"]

log = logging.getLogger(__name__)
#: the CPU allocator's, CUDA's and oneDNN's words for a refused allocation (oneDNN reports one as a primitive it
#: could not create)
_OOM_WORDS = re.compile(r"can't allocate memory|out of memory|cannot allocate memory|could not create a primitive",
                        re.I)


def limit_memory(limit_mb: int, device: torch.device) -> str:
    """Cap what this process may allocate from now on at ``limit_mb`` MiB more; returns what was set (for the
    log). A GPU caps the process's share of the device; the CPU caps the address space."""
    extra = limit_mb << 20
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fraction = min(1.0, (torch.cuda.memory_reserved(device) + extra) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        return f"{fraction:.3f} of {device} ({total >> 20} MiB)"
    status = open("/proc/self/status").read()
    now = int(re.search(r"^VmSize:\s+(\d+) kB", status, re.M).group(1)) << 10
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = now + extra if hard == resource.RLIM_INFINITY else min(now + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return f"address space {cap >> 20} MiB ({now >> 20} MiB in use at load + {limit_mb} MiB)"


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation refusal: CUDA's OutOfMemoryError, MemoryError, or the CPU allocator's."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and bool(_OOM_WORDS.search(str(exc))))


def run_in_halves(run: Callable[[int, int], Any], n: int, *, what: str = "batch"
                  ) -> list[tuple[int, int, Any]]:
    """``run(start, stop)`` over ``[0, n)``; where it runs out of memory, again on each half (after freeing
    cached memory), down to single items. Returns ``(start, stop, output)`` in order; a single item that still
    runs out of memory has its exception as output. Any other exception propagates."""
    try:
        return [(0, n, run(0, n))]
    except Exception as exc:  # noqa: BLE001 - only allocation refusals are handled, the rest re-raised
        if not out_of_memory(exc):
            raise
        message = str(exc).splitlines()[0][:200]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if n == 1:
        log.error("guard: out of memory on a single request of the %s (%s); answering it 507", what, message)
        return [(0, 1, MemoryError(message))]
    half = n // 2
    log.error("guard: out of memory on %d requests of the %s (%s); retrying in halves of %d and %d",
              n, what, message, half, n - half)
    first = run_in_halves(run, half, what=what)
    second = run_in_halves(lambda a, b: run(half + a, half + b), n - half, what=what)
    return first + [(half + a, half + b, out) for a, b, out in second]


def concat(parts: list[Any]) -> Any:
    """One result from the results of consecutive slices: tensors concatenated along dimension 0 (also as fields
    of a dataclass, or items of a dict); anything else must be equal in every part and is kept."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: concat([p[k] for p in parts]) for k in first}
    if dataclasses.is_dataclass(first):
        return type(first)(**{f.name: concat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(first)})
    if any(p != first for p in parts):
        raise ValueError(f"cannot join parts that differ in a non-tensor value: {[p for p in parts][:4]}")
    return first
