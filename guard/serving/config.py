"""The guard configuration a model archive carries, validated once when the server loads it.

Two frozen dataclasses travel inside every archive as one JSON file (:data:`MANIFEST_NAME`):
:class:`GuardConfig` (how requests are decoded and how ReScaler defends them — the file a user passes to
``guard archive --guard-config``) and :class:`ArchiveManifest` (which registered architecture, which
weights and their SHA-256, plus the :class:`GuardConfig`, and optionally a scan report, a repaired model and a
calibrated trigger detector, each with its SHA-256).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..detect import report_methods
from ..repair import list_defenses
from ..rescaler import ReScalerConfig

#: name of the manifest file inside a model archive
MANIFEST_NAME = "guard-archive.json"
#: bump when the manifest layout changes; the handler refuses layouts it does not know
MANIFEST_VERSION = 3
#: layouts this guard reads: version 1 lacks the method names, versions 1–2 the trigger detector (``None``)
READABLE_VERSIONS = (1, 2, 3)
#: names the optional scan report and repaired weights get inside an archive (the weights keep their suffix)
SCAN_NAME = "guard-scan.json"
REPAIRED_STEM = "guard-repaired"
DETECTOR_NAME = "guard-detector.safetensors"
#: how a request image is brought to the model's input size
RESIZE_MODES = ("center-crop", "stretch", "exact")
#: which model's prediction the endpoint answers, and what it does with a request its trigger detector flags
ANSWERS = ("rescaler", "repaired")
ON_TRIGGER = ("flag", "refuse")
#: the HTTP status of a refused request (the request is well-formed; the guard will not answer it)
REFUSED_STATUS = 422


def _reject_unknown(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")


def _check_sha256(name: str, sha: object) -> None:
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"{name} must be 64 lowercase hex digits, got {sha!r}")


def _check_file_name(name: str, value: object) -> None:
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError(f"{name} must be a bare file name inside the archive, got {value!r}")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class GuardConfig:
    """How the served guard decodes requests and defends predictions.

    ``rescaler``: ε, α, steps of ReScaler (rescaler_main.txt §3; defaults from rescaler_appendix.txt §A).
    ``enabled``: ``False`` serves the same model unguarded (the baseline of ``benchmarks/serve_load.py``).
    ``top_k``: how many classes the response's ``probabilities`` lists.
    ``class_names``: one name per output class; ``None`` names them ``"0" … "K-1"``.
    ``resize``: ``center-crop`` scales the shorter side to the model's input size and crops the centre;
    ``stretch`` resizes both sides; ``exact`` refuses any other size with a 400.
    ``max_image_pixels``: decompression-bomb limit, checked from the image header before decoding (413).
    ``convert_color``: convert grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images to 8-bit
    RGB; ``False`` answers them with a 415 instead.
    ``asr_window``: how many recent predictions the estimated attack-success-rate gauge looks back over.

    The endpoint policy (README, "Endpoint policy"): ``answer`` — ``"rescaler"`` answers ReScaler's defended
    label (the plain model's when ``enabled`` is false), ``"repaired"`` the label of the archive's repaired model
    (``guard archive --repaired``); ``on_trigger`` — what happens to a request the archive's trigger detector
    (``guard calibrate``, ``guard archive --detector``) scores above its threshold: ``"flag"`` answers it with
    ``"flagged": true``, ``"refuse"`` answers :data:`REFUSED_STATUS` with the score and the threshold instead of
    a label. Without a detector, answers carry no trigger score and nothing is refused.

    ``memory_limit_mb``: how much memory the worker's passes may take beyond what it holds once loaded — on a
    GPU the per-process share of the device's memory, on the CPU the process's address space (``RLIMIT_AS``).
    A server batch that runs out of memory (capped or not) is retried in halves, down to single requests; a
    single request that still does not fit gets a 507. ``None``: no cap.
    """

    rescaler: ReScalerConfig = field(default_factory=ReScalerConfig)
    enabled: bool = True
    top_k: int = 3
    class_names: tuple[str, ...] | None = None
    resize: str = "center-crop"
    max_image_pixels: int = 16_000_000
    convert_color: bool = True
    asr_window: int = 1000
    answer: str = "rescaler"
    on_trigger: str = "flag"
    memory_limit_mb: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rescaler, ReScalerConfig):
            raise TypeError(f"rescaler must be a ReScalerConfig, got {type(self.rescaler).__name__}")
        for name in ("enabled", "convert_color"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _positive_int("top_k", self.top_k)
        _positive_int("max_image_pixels", self.max_image_pixels)
        _positive_int("asr_window", self.asr_window)
        if self.memory_limit_mb is not None:
            _positive_int("memory_limit_mb", self.memory_limit_mb)
        for name, allowed in (("resize", RESIZE_MODES), ("answer", ANSWERS), ("on_trigger", ON_TRIGGER)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.class_names is not None:
            names = self.class_names
            if isinstance(names, (str, bytes)) or not all(isinstance(n, str) and n for n in names):
                raise TypeError(f"class_names must be a list of non-empty strings, got {names!r:.120}")
            if len(set(names)) != len(names):
                raise ValueError(f"class_names must be distinct, got {list(names)}")
            object.__setattr__(self, "class_names", tuple(names))

    def names_for(self, num_classes: int) -> tuple[str, ...]:
        """The class names for a model with ``num_classes`` outputs (checked against ``class_names``)."""
        if self.class_names is None:
            return tuple(str(i) for i in range(num_classes))
        if len(self.class_names) != num_classes:
            raise ValueError(f"class_names lists {len(self.class_names)} names but the model has "
                             f"{num_classes} classes")
        return self.class_names

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["class_names"] = None if self.class_names is None else list(self.class_names)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "guard config") -> "GuardConfig":
        """Build from a JSON-like dict; unknown keys are refused so a typo cannot silently do nothing."""
        if not isinstance(data, dict):
            raise TypeError(f"{where}: expected a JSON object, got {type(data).__name__}")
        _reject_unknown(cls, data, where)
        data = dict(data)
        rescaler = data.pop("rescaler", {})
        if isinstance(rescaler, dict):
            _reject_unknown(ReScalerConfig, rescaler, f"{where}: rescaler")
            rescaler = ReScalerConfig(**rescaler)
        class_names = data.pop("class_names", None)
        if isinstance(class_names, list):
            class_names = tuple(class_names)
        return cls(rescaler=rescaler, class_names=class_names, **data)

    @classmethod
    def load(cls, path: str | Path) -> "GuardConfig":
        """Read a guard config JSON file (e.g. ``{"rescaler": {"eps": 0.1}, "top_k": 5}``)."""
        return cls.from_dict(_read_json(Path(path)), where=str(path))


@dataclass(frozen=True)
class ArchiveManifest:
    """What a guard model archive holds: architecture, weights (with their SHA-256) and guard config; and,
    when built with ``guard archive --scan/--repaired/--detector``, the scan report (``guard scan --out``), the
    repaired weights (``guard repair --out``) and the trigger detector (``guard calibrate --out``), each with its
    SHA-256. The method names — the detector that
    wrote the scan (``scan_method``), the defense that produced the repaired weights (``repaired_method``)
    and the served weights (``weights_method``, e.g. ``guard harden``'s ``moth``) — must be registered
    names (``guard.detect.report_methods()``, ``guard.repair.list_defenses()``)."""

    model: str
    num_classes: int
    weights_file: str
    weights_sha256: str
    guard: GuardConfig = field(default_factory=GuardConfig)
    version: int = MANIFEST_VERSION
    scan_file: str | None = None
    scan_sha256: str | None = None
    repaired_file: str | None = None
    repaired_sha256: str | None = None
    scan_method: str | None = None
    repaired_method: str | None = None
    weights_method: str | None = None
    detector_file: str | None = None
    detector_sha256: str | None = None
    manifest_sha256: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a registered model name, got {self.model!r}")
        _positive_int("num_classes", self.num_classes)
        _check_file_name("weights_file", self.weights_file)
        _check_sha256("weights_sha256", self.weights_sha256)
        for part in ("scan", "repaired", "detector"):
            file, sha = getattr(self, f"{part}_file"), getattr(self, f"{part}_sha256")
            if (file is None) != (sha is None):
                raise ValueError(f"{part}_file and {part}_sha256 go together, got {file!r} and {sha!r}")
            if file is not None:
                _check_file_name(f"{part}_file", file)
                _check_sha256(f"{part}_sha256", sha)
        if self.scan_method is not None and self.scan_method not in report_methods():
            raise ValueError(f"scan_method must be a registered detector or cleanser "
                             f"({', '.join(report_methods())}), "
                             f"got {self.scan_method!r}")
        if self.scan_method is not None and self.scan_file is None:
            raise ValueError(f"scan_method={self.scan_method!r} needs a scan_file")
        for name, file in (("repaired_method", self.repaired_file), ("weights_method", self.weights_file)):
            value = getattr(self, name)
            if value is not None and value not in list_defenses():
                raise ValueError(f"{name} must be a registered defense ({', '.join(list_defenses())}), got {value!r}")
            if value is not None and file is None:
                raise ValueError(f"{name}={value!r} needs the file it describes")
        if not isinstance(self.guard, GuardConfig):
            raise TypeError(f"guard must be a GuardConfig, got {type(self.guard).__name__}")
        if self.manifest_sha256 is not None:
            _check_sha256("manifest_sha256", self.manifest_sha256)
        if self.version not in READABLE_VERSIONS:
            raise ValueError(f"unsupported archive manifest version {self.version!r}; this guard reads "
                             f"versions {READABLE_VERSIONS} (rebuild the archive with `guard archive`)")
        self.guard.names_for(self.num_classes)
        if self.guard.answer == "repaired" and self.repaired_file is None:
            raise ValueError("the guard config answers the repaired model's label (answer='repaired'), but the "
                             "archive has no repaired model; add one with --repaired")
        if self.guard.on_trigger == "refuse" and self.detector_file is None:
            raise ValueError("the guard config refuses flagged requests (on_trigger='refuse'), but the archive has "
                             "no trigger detector; calibrate one with `guard calibrate` and add it with --detector")

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.model, "num_classes": self.num_classes,
                "weights_file": self.weights_file, "weights_sha256": self.weights_sha256,
                "guard": self.guard.to_dict(), "scan_file": self.scan_file, "scan_sha256": self.scan_sha256,
                "repaired_file": self.repaired_file, "repaired_sha256": self.repaired_sha256,
                "scan_method": self.scan_method, "repaired_method": self.repaired_method,
                "weights_method": self.weights_method, "detector_file": self.detector_file,
                "detector_sha256": self.detector_sha256, "manifest_sha256": self.manifest_sha256}

    def digest(self) -> str:
        """SHA-256 of the manifest's canonical JSON without ``manifest_sha256``: ``guard archive`` records it
        there, and the server refuses a manifest (a guard config, a file name or checksum) edited after
        archiving. It catches edits that do not recompute it; the archive's own checksum file
        (``NAME.mar.sha256``, checked by :class:`~guard.serving.TorchServe` before it serves) catches the rest."""
        data = self.to_dict()
        data.pop("manifest_sha256")
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST_NAME) -> "ArchiveManifest":
        if not isinstance(data, dict):
            raise TypeError(f"{where}: expected a JSON object, got {type(data).__name__}")
        _reject_unknown(cls, data, where)
        data = dict(data)
        guard = GuardConfig.from_dict(data.pop("guard", {}), where=f"{where}: guard")
        return cls(guard=guard, **data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ArchiveManifest":
        return cls.from_dict(_read_json(Path(path)), where=str(path))


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
