"""Build TorchServe model archives (``.mar``) for guarded models with ``torch-model-archiver``.

An archive holds the handler (``handlers/guard_handler.py``), the weights file as given and
:data:`~guard.serving.config.MANIFEST_NAME` (architecture, class count, the weights' SHA-256 and the
:class:`~guard.serving.config.GuardConfig`). The handler recomputes the SHA-256 at load and refuses a
mismatch.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .. import models
from .config import MANIFEST_NAME, ArchiveManifest, GuardConfig
from .predictor import sha256_file

log = logging.getLogger(__name__)

#: the handler shipped with this source tree
DEFAULT_HANDLER = Path(__file__).resolve().parents[2] / "handlers" / "guard_handler.py"
#: version written into every archive (TorchServe's per-model settings are keyed by it)
ARCHIVE_VERSION = "1.0"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")


def build_archive(model: str, weights: str | Path, out: str | Path, guard_config: GuardConfig | None = None, *,
                  num_classes: int = 10, handler: str | Path | None = None, force: bool = False) -> Path:
    """Package ``model`` (a registered name) with ``weights`` into ``out`` (``DIR/NAME.mar``).

    The weights are loaded into the architecture first, so a file that does not fit fails here rather
    than in the server. ``NAME`` becomes the endpoint: ``/predictions/NAME``.

    Example::

        build_archive("resnet20", "resnet20-12fca82f.th", "model_store/resnet20.mar",
                      GuardConfig(class_names=("airplane", ..., "truck")))
    """
    out, weights = Path(out), Path(weights)
    handler = DEFAULT_HANDLER if handler is None else Path(handler)
    if out.suffix != ".mar" or not _NAME.match(out.stem):
        raise ValueError(f"out must be DIR/NAME.mar with NAME made of letters, digits, '_', '-', '.'; got {out}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    for path, what in ((weights, "weights"), (handler, "handler")):
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
    if weights.name == MANIFEST_NAME:
        raise ValueError(f"the weights file may not be called {MANIFEST_NAME}")
    config = GuardConfig() if guard_config is None else guard_config
    models.create(model, num_classes=num_classes, weights=weights)  # fail early: the weights must fit
    manifest = ArchiveManifest(model, num_classes, weights.name, sha256_file(weights), config)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="guard-archive-") as tmp:
        manifest_path = manifest.save(Path(tmp) / MANIFEST_NAME)
        command = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", out.stem,
                   "--version", ARCHIVE_VERSION, "--handler", str(handler), "--serialized-file", str(weights),
                   "--extra-files", str(manifest_path), "--export-path", str(out.parent), "--force"]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"torch-model-archiver failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-2000:]}")
    log.info("wrote %s (%s, weights sha256 %s)", out, model, manifest.weights_sha256)
    return out


def read_manifest(archive: str | Path) -> ArchiveManifest:
    """The :class:`ArchiveManifest` inside a ``.mar`` file."""
    archive = Path(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            data = json.loads(zf.read(MANIFEST_NAME))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{archive} is not a guard model archive (no {MANIFEST_NAME} inside): {exc}") from exc
    return ArchiveManifest.from_dict(data, where=f"{archive}:{MANIFEST_NAME}")
