"""The Prometheus metrics a guarded endpoint exports, declared once.

``metrics.yaml`` at the repository root declares the same metrics to TorchServe (which refuses
undeclared backend metrics by default); a test checks that the two agree.

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
# from an archive's scan report, set once when the worker loads the model (guard archive --scan)
CNC_SCORE = MetricSpec("guard_cnc_anomaly_score", "gauge", "score", ("model_name", "class"))
NC_INDEX = MetricSpec("guard_nc_anomaly_index", "gauge", "index", ("model_name", "class"))
# from an archive's cleansing report (guard archive --scan with a guard cleanse report): the cleanser's per-class
# score, larger = more suspicious (RE: −log10 of the class's order-statistic p-value; AC: silhouette; CI: impurity)
CLEANSE_SCORE = MetricSpec("guard_cleanse_score", "gauge", "score", ("model_name", "class"))
SCAN_BACKDOORED = MetricSpec("guard_scan_backdoored", "gauge", "verdict", ("model_name", "method", "flagged_class"))
# per request, against an archive's repaired model (guard archive --repaired)
BACKDOOR_SCORE = MetricSpec("guard_backdoor_score", "histogram", "score", ("model_name",))
DISAGREEMENTS = MetricSpec("guard_repair_disagreements_total", "counter", "predictions",
                           ("model_name", "original_class"))
#: the per-class gauge of each scan method
SCAN_SCORES = {"cnc": CNC_SCORE, "nc": NC_INDEX, "re": CLEANSE_SCORE, "ac": CLEANSE_SCORE, "ci": CLEANSE_SCORE}

#: every metric the handler emits
METRICS = (LATENCY, REQUESTS, REVERTED, ESTIMATED_ASR, BATCH_SIZE, BAD_REQUESTS, CNC_SCORE, NC_INDEX,
           CLEANSE_SCORE, SCAN_BACKDOORED, BACKDOOR_SCORE, DISAGREEMENTS)
#: values of the ``stage`` label of :data:`LATENCY`: decoding, the ReScaler pass, the repaired model's
#: forward (archives with a repaired model only), building the answers
STAGES = ("preprocess", "adapt", "score", "postprocess")
