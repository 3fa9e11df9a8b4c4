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
    """A metric's Prometheus name, kind, unit (TorchServe puts it in the HELP line) and label names; ``buckets``
    of a histogram exported through :class:`PrometheusExporter` (TorchServe's are fixed; default: the same)."""

    name: str
    kind: str
    unit: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None

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


class PrometheusExporter:
    """The guard metrics through prometheus-client, where the guard core runs outside TorchServe (a sweep's
    driver, a custom predictor): the same names, kinds and labels as TorchServe exports, ``Hostname`` included,
    and the same default histogram buckets.

    ``emit(spec, value, *labels)`` is the handler's verb: a counter adds ``value``, a gauge is set to it, a
    histogram observes it. ``serve(port)`` exposes ``/metrics`` on loopback for Prometheus to scrape.
    """

    def __init__(self, specs: tuple[MetricSpec, ...] = METRICS, registry=None) -> None:
        import socket

        from .._validation import require_extra

        require_extra("prometheus_client", "sweep", "exporting guard metrics outside TorchServe")
        import prometheus_client as prom

        prom.disable_created_metrics()  # TorchServe exports no *_created series; neither do we
        self.registry = prom.CollectorRegistry() if registry is None else registry
        self.hostname = socket.gethostname()
        kinds = {"counter": prom.Counter, "gauge": prom.Gauge, "histogram": prom.Histogram}
        self._metrics = {}
        for spec in specs:
            extra = {"buckets": spec.buckets} if spec.kind == "histogram" and spec.buckets else {}
            self._metrics[spec.name] = kinds[spec.kind](spec.name, spec.unit, [*spec.labels, "Hostname"],
                                                        registry=self.registry, **extra)
        self._specs = {spec.name: spec for spec in specs}

    def emit(self, spec: MetricSpec, value: float, *labels: str) -> None:
        if self._specs.get(spec.name) != spec:
            raise ValueError(f"metric {spec.name} is not declared to this exporter; declared: {sorted(self._specs)}")
        if len(labels) != len(spec.labels):
            raise ValueError(f"metric {spec.name}: expected labels {spec.labels}, got {labels}")
        child = self._metrics[spec.name].labels(*labels, self.hostname)
        verb = {"counter": "inc", "gauge": "set", "histogram": "observe"}[spec.kind]
        getattr(child, verb)(value)

    def text(self) -> str:
        """The Prometheus text exposition of every metric."""
        import prometheus_client as prom

        return prom.generate_latest(self.registry).decode()

    def serve(self, port: int, address: str = "127.0.0.1"):
        """Serve ``/metrics`` on ``address:port`` (loopback by default) from a daemon thread; returns the server
        (``shutdown()`` stops it)."""
        import prometheus_client as prom

        server, _ = prom.start_http_server(port, addr=address, registry=self.registry)
        return server
