"""Shared fixtures: the data directory (GUARD_DATA_DIR, CI points it at ../shared/data) and tiny inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = os.environ.get("GUARD_DATA_DIR")
    if not root or not Path(root).is_dir():
        pytest.skip("real data needs GUARD_DATA_DIR pointing at a directory with cifar10/ and weights/")
    return Path(root)


@pytest.fixture(scope="session")
def resnet20_weights(data_root: Path) -> Path:
    path = data_root / "weights" / "resnet20-12fca82f.th"
    if not path.is_file():
        pytest.skip(f"pretrained ResNet-20 not found at {path}")
    return path


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)
