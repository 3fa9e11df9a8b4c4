"""Build TorchServe model archives (``.mar``) for guarded models with ``torch-model-archiver``.

An archive holds the handler (:data:`~guard.serving.HANDLER_FILE`, package data), the weights file as
given and :data:`~guard.serving.config.MANIFEST_NAME` (architecture, class count, the weights' SHA-256 and the
:class:`~guard.serving.config.GuardConfig`); optionally a scan report (``guard scan --out``, served as
per-class anomaly gauges and a verdict; a ``guard cleanse --out`` report is stored as its verdict), a
repaired model (``guard repair --out``, which scores every request against the served one;
pick_your_poison.txt §4, ALGORITHMS.md D2/D3) and a calibrated trigger detector (``guard calibrate --out``,
which scores every request and drives the endpoint policy of the guard config). The handler recomputes every
SHA-256 at load, the manifest's own included, and refuses a mismatch. Beside the archive goes
``NAME.mar.sha256``, which :class:`~guard.serving.TorchServe` checks before serving it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .. import models
from .._validation import require_extra
from ..cleanse import REPORT_KIND, CleanseResult
from ..detect import ScanReport, TriggerDetector
from .config import DETECTOR_NAME, MANIFEST_NAME, REPAIRED_STEM, SCAN_NAME, ArchiveManifest, GuardConfig
from .predictor import WeightsMismatchError, sha256_file
from .resources import HANDLER_FILE

log = logging.getLogger(__name__)

#: version written into every archive (TorchServe's per-model settings are keyed by it)
ARCHIVE_VERSION = "1.0"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")


def build_archive(model: str, weights: str | Path, out: str | Path, guard_config: GuardConfig | None = None, *,
                  num_classes: int = 10, handler: str | Path | None = None, force: bool = False,
                  scan: str | Path | None = None, repaired: str | Path | None = None,
                  repaired_method: str | None = None, weights_method: str | None = None,
                  detector: str | Path | None = None) -> Path:
    """Package ``model`` (a registered name) with ``weights`` into ``out`` (``DIR/NAME.mar``).

    The weights are loaded into the architecture first, so a file that does not fit fails here rather
    than in the server. ``NAME`` becomes the endpoint: ``/predictions/NAME``. ``scan``: a scan report of
    these weights, or a cleansing report of the set they were trained on (stored as its verdict,
    :meth:`guard.cleanse.CleanseResult.scan_report`); ``repaired``: repaired weights of the same architecture.
    Both are checked here (the report must parse and score classes of this model, the weights must fit) and
    stored under fixed names. The manifest names the method that wrote the report and, when given, the
    defenses that produced the repaired weights (``repaired_method``) and the served weights
    (``weights_method``, e.g. ``"moth"``). ``detector``: a trigger detector calibrated on these weights
    (``guard calibrate``); the config's ``on_trigger="refuse"`` needs one, ``answer="repaired"`` needs ``repaired``.

    Example::

        build_archive("resnet20", "resnet20-12fca82f.th", "model_store/resnet20.mar",
                      GuardConfig(class_names=("airplane", ..., "truck")))
    """
    require_extra("model_archiver", "serve", "building a model archive")
    out, weights = Path(out), Path(weights)
    handler = HANDLER_FILE if handler is None else Path(handler)
    if out.suffix != ".mar" or not _NAME.match(out.stem):
        raise ValueError(f"out must be DIR/NAME.mar with NAME made of letters, digits, '_', '-', '.'; got {out}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    scan = None if scan is None else Path(scan)
    repaired = None if repaired is None else Path(repaired)
    detector = None if detector is None else Path(detector)
    for path, what in ((weights, "weights"), (handler, "handler"), (scan, "scan report"),
                       (repaired, "repaired weights"), (detector, "trigger detector")):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
    if weights.name in (MANIFEST_NAME, SCAN_NAME, DETECTOR_NAME) or weights.stem == REPAIRED_STEM:
        raise ValueError(f"the weights file may not be called {MANIFEST_NAME}, {SCAN_NAME}, {DETECTOR_NAME} or "
                         f"{REPAIRED_STEM}.*; got {weights.name}")
    config = GuardConfig() if guard_config is None else guard_config
    served = models.create(model, num_classes=num_classes, weights=weights)  # fail early: the weights must fit
    extras: dict[str, object] = {}
    report, converted = (None, False) if scan is None else _load_verdict(scan)
    if report is not None:
        outside = sorted(c for c in report.scores if c >= num_classes)
        if outside:
            raise ValueError(f"scan report {scan} scores classes {outside}, but the model has {num_classes} "
                             f"classes; was it made for another model?")
        extras.update(scan_file=SCAN_NAME, scan_method=report.method)
    if repaired is not None:
        try:
            models.create(model, num_classes=num_classes, weights=repaired)
        except ValueError as exc:
            raise ValueError(f"repaired weights {repaired}: {exc}") from exc
        extras.update(repaired_file=REPAIRED_STEM + repaired.suffix, repaired_sha256=sha256_file(repaired),
                      repaired_method=repaired_method)
    elif repaired_method is not None:
        raise ValueError(f"repaired_method={repaired_method!r} given without repaired weights")
    if detector is not None:
        try:
            TriggerDetector.load(detector).check_model(served)
        except ValueError as exc:
            raise ValueError(f"trigger detector {detector}: {exc}") from exc
        extras.update(detector_file=DETECTOR_NAME, detector_sha256=sha256_file(detector))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="guard-archive-") as tmp:
        if converted:  # a cleansing report travels as its verdict
            scan = report.save(Path(tmp) / SCAN_NAME)
        if scan is not None:
            extras.update(scan_sha256=sha256_file(scan))
        manifest = ArchiveManifest(model, num_classes, weights.name, sha256_file(weights), config,
                                   weights_method=weights_method, **extras)
        manifest = dataclasses.replace(manifest, manifest_sha256=manifest.digest())
        extra_files = [manifest.save(Path(tmp) / MANIFEST_NAME)]
        for source, name in ((scan, manifest.scan_file), (repaired, manifest.repaired_file),
                             (detector, manifest.detector_file)):
            if source is not None:
                target = Path(tmp) / name
                extra_files.append(target if source == target else Path(shutil.copyfile(source, target)))
        command = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", out.stem,
                   "--version", ARCHIVE_VERSION, "--handler", str(handler), "--serialized-file", str(weights),
                   "--extra-files", ",".join(str(p) for p in extra_files), "--export-path", str(out.parent),
                   "--force"]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"torch-model-archiver failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-2000:]}")
    checksum_path(out).write_text(f"{sha256_file(out)}  {out.name}\n", encoding="utf-8")
    log.info("wrote %s (%s, weights sha256 %s)", out, model, manifest.weights_sha256)
    return out


def checksum_path(archive: str | Path) -> Path:
    """Where ``build_archive`` writes an archive's SHA-256 (``NAME.mar.sha256``, the ``sha256sum`` format)."""
    archive = Path(archive)
    return archive.with_name(archive.name + ".sha256")


def verify_archive(archive: str | Path) -> bool:
    """Check ``archive`` against its checksum file: ``True`` when it matches, ``False`` when there is no checksum
    file (an archive not built by ``guard archive``); raises :class:`WeightsMismatchError` naming the file when the
    archive was changed after it was written."""
    archive = Path(archive)
    recorded = checksum_path(archive)
    if not recorded.is_file():
        return False
    expected = (recorded.read_text(encoding="utf-8").split() or [""])[0]
    actual = sha256_file(archive)
    if actual != expected:
        raise WeightsMismatchError(f"archive {archive} has SHA-256 {actual}, but {recorded.name} records "
                                   f"{expected or '(nothing)'}; refusing to serve it (rebuild it with `guard archive`)")
    return True


def _load_verdict(path: Path) -> tuple[ScanReport, bool]:
    """The report of ``guard scan`` as it is, or that of ``guard cleanse`` as its verdict (then ``True``)."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and data.get("kind") == REPORT_KIND:
        return CleanseResult.from_dict(data).scan_report(), True
    return ScanReport.from_dict(data), False


def read_manifest(archive: str | Path) -> ArchiveManifest:
    """The :class:`ArchiveManifest` inside a ``.mar`` file."""
    archive = Path(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            data = json.loads(zf.read(MANIFEST_NAME))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{archive} is not a guard model archive (no {MANIFEST_NAME} inside): {exc}") from exc
    return ArchiveManifest.from_dict(data, where=f"{archive}:{MANIFEST_NAME}")
