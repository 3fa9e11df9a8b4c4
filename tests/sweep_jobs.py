"""Job functions the sweep tests run (loaded by path in Ray workers, as a grid file's ``file.py:function``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from guard.models import create


def train_tiny(seed: int, lr: float, steps: int = 5) -> dict:
    """A few SGD steps of a tiny CIFAR model on seeded random data: the final loss and a weight checksum."""
    generator = torch.Generator().manual_seed(seed)
    model = create("tiny_resnet", num_classes=10, generator=generator)
    x = torch.rand(16, 3, 16, 16, generator=generator)
    y = torch.randint(0, 10, (16,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return {"loss": loss.item(), "checksum": float(sum(p.detach().double().sum() for p in model.parameters())),
            "threads": torch.get_num_threads()}


def counted(i: int, log: str, workdir: str, sleep: float = 0.0) -> dict:
    """Append this job's index to ``log`` (every run of every job leaves a line), then sleep."""
    with open(log, "a") as f:
        f.write(f"{i}\n")
    time.sleep(sleep)
    Path(workdir, "done").write_text(str(i))
    return {"i": i, "square": i * i}


def fails_on(i: int, bad: int) -> dict:
    if i == bad:
        raise ValueError(f"job {i} is the bad one")
    return {"i": i}


def dies_on(i: int, bad: int) -> dict:
    if i == bad:
        os._exit(3)  # the worker process dies, as under the kernel's OOM killer
    return {"i": i}


def on_gpu(i: int) -> dict:
    """Where a job declared with one GPU runs: the devices it sees and the one torch picks."""
    import os

    return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "count": torch.cuda.device_count(),
            "device": str(torch.zeros(1, device="cuda").device)}
