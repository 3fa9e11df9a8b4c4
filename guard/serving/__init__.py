"""Serving a guarded classifier with TorchServe: archives, request decoding, metrics, server control.

The TorchServe handler itself ships as package data, :data:`HANDLER_FILE` (``assets/guard_handler.py``, the
only code importing ``ts``), beside the TorchServe configuration :data:`TS_CONFIG_FILE` and the metrics file
:data:`METRICS_FILE`; everything the handler needs is here, testable without a server.

Example::

    from guard.serving import build_archive, TorchServe, ServerSettings
    mar = build_archive("resnet20", "resnet20-12fca82f.th", "model_store/resnet20.mar")
    with TorchServe("runs/serve", "model_store", {"resnet20": mar.name}, ServerSettings()) as server:
        print(server.inference_url("resnet20"))
"""

from .archive import build_archive, checksum_path, read_manifest, verify_archive
from .config import (ANSWERS, DETECTOR_NAME, MANIFEST_NAME, ON_TRIGGER, REFUSED_STATUS, REPAIRED_STEM, RESIZE_MODES,
                     SCAN_NAME, ArchiveManifest, GuardConfig)
from .decode import BadRequest, decode_request, reject_form_encoding, select_field
from .metrics import (BACKDOOR_SCORE, BAD_REQUESTS, BATCH_SIZE, DISAGREEMENTS, ESTIMATED_ASR, FLAGGED, LATENCY,
                      METRICS, REQUESTS, REVERTED, SCAN_BACKDOORED, SCAN_SCORE, STAGES, TRIGGER_SCORE,
                      TRIGGER_THRESHOLD, MetricSpec)
from .kserve import KSERVE_MOUNT, build_kserve_layout
from .monitor import RevertMonitor
from .predictor import GuardedClassifier, WeightsMismatchError, sha256_file
from .resources import HANDLER_FILE, METRICS_FILE, TS_CONFIG_FILE
from .server import PORT_NAMES, ServerError, ServerSettings, TorchServe, free_ports

__all__ = ["ANSWERS", "DETECTOR_NAME", "FLAGGED", "ON_TRIGGER", "REFUSED_STATUS", "TRIGGER_SCORE",
           "TRIGGER_THRESHOLD", "free_ports", "ArchiveManifest", "BACKDOOR_SCORE", "BAD_REQUESTS", "BATCH_SIZE",
           "BadRequest",
           "DISAGREEMENTS", "ESTIMATED_ASR", "GuardConfig", "GuardedClassifier", "HANDLER_FILE", "LATENCY",
           "MANIFEST_NAME", "METRICS", "METRICS_FILE", "MetricSpec", "PORT_NAMES", "REPAIRED_STEM", "REQUESTS",
           "RESIZE_MODES", "REVERTED", "RevertMonitor", "SCAN_BACKDOORED", "SCAN_NAME", "SCAN_SCORE", "STAGES",
           "ServerError", "ServerSettings", "TS_CONFIG_FILE", "TorchServe", "WeightsMismatchError", "build_archive",
           "checksum_path", "verify_archive", "KSERVE_MOUNT", "build_kserve_layout",
           "decode_request", "read_manifest", "reject_form_encoding", "select_field", "sha256_file"]
