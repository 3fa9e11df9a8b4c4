"""The Prometheus metrics a guarded endpoint exports, declared once.

``assets/metrics.yaml`` (:data:`guard.serving.METRICS_FILE`) declares the same metrics to TorchServe (which
refuses undeclared backend metrics by default); a test checks that the two agree.

TorchServe 0.12 renders histograms with the Prometheus Java client's default buckets
(0.005 … 10, +Inf), which it does not let a metrics file change: they suit latencies in seconds; for
``guard_batch_size`` they resolve batches of 1, ≤2, ≤5, ≤7, ≤10 and more — ``_sum / _count`` gives the
exact mean batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

METRIC_KINDS = ("counter", "gauge", "histogram")


@dataclass(frozen=True)
class MetricSpec:
    """A metric's Prometheus name, kind, unit (TorchServe puts it in the HELP line) and label names."""

    name: str
    kind: str
    unit: str
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in METRIC_KINDS:
            raise ValueError(f"metric kind must be one of {METRIC_KINDS}, got {self.kind!r}")


LATENCY = MetricSpec("guard_inference_latency_seconds", "histogram", "seconds", ("model_name", "stage"))
REQUESTS = MetricSpec("guard_requests_total", "counter", "requests", ("model_name",))
REVERTED = MetricSpec("guard_reverted_total", "counter", "predictions", ("model_name", "original_class"))
ESTIMATED_ASR = MetricSpec("guard_estimated_asr", "gauge", "ratio", ("model_name", "class"))
BATCH_SIZE = MetricSpec("guard_batch_size", "histogram", "requests", ("model_name",))
BAD_REQUESTS = MetricSpec("guard_bad_requests_total", "counter", "requests", ("model_name", "status"))
# from an archive's scan report, set once when the worker loads the model (guard archive --scan); ``method``
# is the registered detector that wrote the report (guard.detect.list_detectors()), ``class`` a class name
SCAN_SCORE = MetricSpec("guard_scan_score", "gauge", "score", ("model_name", "method", "class"))
SCAN_BACKDOORED = MetricSpec("guard_scan_backdoored", "gauge", "verdict", ("model_name", "method", "flagged_class"))
# per request, against an archive's repaired model (guard archive --repaired)
BACKDOOR_SCORE = MetricSpec("guard_backdoor_score", "histogram", "score", ("model_name",))
DISAGREEMENTS = MetricSpec("guard_repair_disagreements_total", "counter", "predictions",
                           ("model_name", "original_class"))
# per request, from the archive's trigger detector (guard archive --detector): the score in units of the
# threshold (1 = at it, so the default buckets resolve it), the flagged requests by undefended class, and the
# calibrated threshold with its false-positive rate and the policy acting on it (set once at load)
TRIGGER_SCORE = MetricSpec("guard_trigger_score", "histogram", "threshold", ("model_name",))
FLAGGED = MetricSpec("guard_flagged_total", "counter", "requests", ("model_name", "original_class"))
TRIGGER_THRESHOLD = MetricSpec("guard_trigger_threshold", "gauge", "score",
                               ("model_name", "false_positive_rate", "on_trigger"))
#: every metric the handler emits
METRICS = (LATENCY, REQUESTS, REVERTED, ESTIMATED_ASR, BATCH_SIZE, BAD_REQUESTS, SCAN_SCORE, SCAN_BACKDOORED,
           BACKDOOR_SCORE, DISAGREEMENTS, TRIGGER_SCORE, FLAGGED, TRIGGER_THRESHOLD)
#: values of the ``stage`` label of :data:`LATENCY`: decoding, the ReScaler pass, the repaired model's
#: forward (archives with a repaired model only), the trigger detector (archives with one only), building the answers
STAGES = ("preprocess", "adapt", "score", "detect", "postprocess")
