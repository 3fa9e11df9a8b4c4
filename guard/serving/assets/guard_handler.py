"""TorchServe handler for a guarded image classifier (archives built by ``guard archive``).

Package data (:data:`guard.serving.HANDLER_FILE`): ``guard archive`` packs it into every archive and
TorchServe loads it from there by path.

Thin by design: ``initialize`` loads the archive once through :class:`guard.serving.GuardedClassifier`
(which checks the weights' SHA-256 and refuses a mismatch); ``preprocess`` decodes each request on its
own, turning bad input into a per-request 4xx; ``inference`` runs one ReScaler pass over the decodable
part of the server batch (in halves when it runs out of memory: :mod:`guard.serving.memory`) — plus, when
the archive carries a repaired model, one forward of it for the per-request backdoor score, and, when it
carries a trigger detector, the score of the features that pass computed; ``postprocess`` answers every
request under the endpoint policy (a refused request gets its own 4xx, its batch-mates their answers) and
updates the guard metrics. An archive's scan report is exported once at load as per-class anomaly gauges and
a verdict, its trigger detector's threshold as a gauge.
"""

from __future__ import annotations

import http
import logging
import time

import torch
from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from guard.serving import (BACKDOOR_SCORE, BAD_REQUESTS, BATCH_SIZE, DISAGREEMENTS, ESTIMATED_ASR, FLAGGED, LATENCY,
                           METRICS, REQUESTS, REVERTED, SCAN_BACKDOORED, SCAN_SCORE, TRIGGER_SCORE, TRIGGER_THRESHOLD,
                           BadRequest, GuardedClassifier, RevertMonitor, decode_request, reject_form_encoding,
                           select_field)
from guard.serving.memory import concat, limit_memory, run_in_halves

log = logging.getLogger(__name__)

_TYPES = {"counter": MetricTypes.COUNTER, "gauge": MetricTypes.GAUGE, "histogram": MetricTypes.HISTOGRAM}


class GuardHandler(BaseHandler):
    """Answers ``{"label", "class", "probabilities", "original_label", "reverted", "anomaly_score"}``, plus
    ``{"backdoor_score", "repaired_label", "disagree"}`` when the archive carries a repaired model and
    ``{"trigger_score", "flagged"}`` when it carries a trigger detector (or a 422 for a flagged request, when the
    guard config refuses them)."""

    def initialize(self, context) -> None:
        properties = context.system_properties
        gpu = properties.get("gpu_id")
        device = torch.device(f"cuda:{gpu}" if gpu is not None and torch.cuda.is_available() else "cpu")
        try:
            self.classifier = GuardedClassifier.from_archive_dir(properties["model_dir"], device)
        except Exception as exc:
            log.error("guard: refusing to load model %s: %s", context.model_name, exc)
            raise
        self.device = device
        self.model_name = context.model_name
        limit = self.classifier.config.memory_limit_mb
        if limit is not None:  # counted from a warm worker: one pass creates the threads and kernels batches share
            self.classifier.observe(torch.zeros(1, 3, *self.classifier.input_hw, device=device))
            log.info("guard: model %s capped at %s", context.model_name, limit_memory(limit, device))
        detector = self.classifier.detector
        self.monitor = RevertMonitor(len(self.classifier.class_names), self.classifier.config.asr_window,
                                     0.0 if detector is None else detector.false_positive_rate)
        self._asr_sent: list[float | None] = [None] * len(self.classifier.class_names)
        self._metrics = {spec.name: self._declare(context.metrics, spec) for spec in METRICS}
        self.context = context
        self._export_scan()
        if detector is not None:
            self._emit(TRIGGER_THRESHOLD, detector.threshold, f"{detector.false_positive_rate:g}",
                       self.classifier.config.on_trigger)
        self.initialized = True
        log.info("guard: model %s ready on %s", self.model_name, device)

    def _export_scan(self) -> None:
        """The archive's scan report as gauges: per-class anomaly scores and the model verdict."""
        scorer = self.classifier.scorer
        if scorer is None or scorer.report is None:
            return
        report, names = scorer.report, self.classifier.class_names
        for c, value in scorer.class_gauges().items():
            self._emit(SCAN_SCORE, value, report.method, names[c])
        flagged = "none" if report.flagged_class is None else names[report.flagged_class]
        self._emit(SCAN_BACKDOORED, float(report.backdoored), report.method, flagged)

    @staticmethod
    def _declare(cache, spec):
        """The declared metric; one the metrics file lacks is added so the worker still emits it."""
        try:
            return cache.get_metric(spec.name, _TYPES[spec.kind])
        except MetricsCacheKeyError:
            log.warning("metric %s is not declared in the server's metrics file", spec.name)
            return cache.add_metric_to_cache(spec.name, spec.unit, list(spec.labels), _TYPES[spec.kind])

    def _emit(self, spec, value: float, *labels: str) -> None:
        self._metrics[spec.name].add_or_update(value, [self.model_name, *labels])

    # -- the three stages ------------------------------------------------------------------------------
    def preprocess(self, data):
        """Decode every request alone: a tensor for a good one, a :class:`BadRequest` for a bad one.

        Under a request envelope (KServe's TorchServe runtime sets ``TS_SERVICE_ENVELOPE=kserve``), ``data`` is
        the ``instances`` of one request, each ``{"data": "<base64 image>"}``: they are decoded alike and answered
        together in its ``predictions``."""
        start = time.perf_counter()
        config, size = self.classifier.config, self.classifier.input_hw
        self._enveloped = len(data) != len(self.context.request_processor)
        items = []
        for idx, request in enumerate(data):
            try:
                if self._enveloped and isinstance(request, str):
                    request = {"data": request}
                if not isinstance(request, dict):
                    raise BadRequest(400, f"expected a request body, got {type(request).__name__}")
                reject_form_encoding(self.context.get_all_request_header(self._request(idx)))
                field = select_field(request)
                content_type = None if self._enveloped else self._part_type(idx, field)
                items.append(decode_request(request[field], content_type, config, size))
            except BadRequest as exc:
                items.append(exc)
            except Exception as exc:  # a decoder failing in a way it does not document: still this request only
                log.warning("guard: request %d failed to decode", idx, exc_info=True)
                items.append(BadRequest(400, f"could not decode the request: {type(exc).__name__}: {exc}"))
        self._emit(LATENCY, time.perf_counter() - start, "preprocess")
        return items

    def _request(self, idx: int) -> int:
        """The HTTP request item ``idx`` came in (under an envelope, every instance is of the first)."""
        return 0 if self._enveloped else idx

    def _part_type(self, idx: int, field: str) -> str | None:
        """The media type of one request field (TorchServe keeps it under the field's name)."""
        part = self.context.get_request_header(idx, field)
        return part.get("content-type") if isinstance(part, dict) else None

    def inference(self, items, *args, **kwargs):
        """One ReScaler pass (one forward + one backward) over all decodable requests of the batch, one
        forward of the repaired model when the archive has one, and the trigger detector on the features of
        the first forward when it has one. A batch that runs out of memory is retried in halves
        (:func:`guard.serving.memory.run_in_halves`); a request that does not fit alone gets a 507."""
        index = [i for i, item in enumerate(items) if isinstance(item, torch.Tensor)]
        if not index:
            return items, None, None, None
        images = torch.stack([items[i] for i in index]).to(self.classifier.device)  # one copy for all passes
        parts = run_in_halves(lambda a, b: self._passes(images[a:b]), len(index),
                              what=f"{len(index)}-request batch of {self.model_name}")
        for a, b, out in parts:
            if isinstance(out, MemoryError):
                for i in index[a:b]:
                    items[i] = BadRequest(507, f"the server ran out of memory answering this request ({out})",
                                          kind="OutOfMemory")
        done = [out for _, _, out in parts if not isinstance(out, MemoryError)]
        if not done:
            return items, None, None, None
        return (items, *(concat([out[k] for out in done]) for k in range(3)))

    def _passes(self, images: torch.Tensor):
        """(adaptation, repaired-model scores, trigger scores) of one batch, with each stage's latency."""
        start = time.perf_counter()
        result, features = self.classifier.observe(images)
        if result.logits.is_cuda:
            torch.cuda.synchronize(result.logits.device)
        self._emit(LATENCY, time.perf_counter() - start, "adapt")
        start = time.perf_counter()
        scores = self.classifier.score(images, result)
        if scores is not None:
            self._emit(LATENCY, time.perf_counter() - start, "score")
        start = time.perf_counter()
        trigger = self.classifier.detect(result, features, images)
        if trigger is not None:
            self._emit(LATENCY, time.perf_counter() - start, "detect")
        return result, scores, trigger

    def postprocess(self, data):
        """Answer each request (4xx for bad or refused ones, set on that request only) and update the metrics."""
        start = time.perf_counter()
        items, result, scores, trigger = data
        answers = iter(self.classifier.describe(result, scores, trigger) if result is not None else ())
        responses, refused = [], []
        for idx, item in enumerate(items):
            self.context.set_response_content_type(self._request(idx), "application/json")
            answer = item if isinstance(item, BadRequest) else next(answers)
            if isinstance(answer, BadRequest):
                if not self._enveloped:
                    self.context.set_response_status(answer.status, http.HTTPStatus(answer.status).phrase, idx)
                refused.append(answer.status)
                self._emit(BAD_REQUESTS, 1, str(answer.status))
                answer = answer.to_dict()
            responses.append(answer)
        if self._enveloped and len(refused) == len(items):  # one request: its status is an error only if all are
            self.context.set_response_status(refused[0], http.HTTPStatus(refused[0]).phrase, 0)
        if result is not None:
            reverted = result.reverted.cpu()
            self._update_guard_metrics(result.original_labels.cpu(), reverted,
                                       reverted if trigger is None else trigger.flagged)
        if scores is not None:
            self._update_scan_metrics(result.original_labels.cpu(), scores)
        if trigger is not None:
            self._update_trigger_metrics(result.original_labels.cpu(), trigger)
        self._emit(REQUESTS, len(items))
        self._emit(BATCH_SIZE, len(items))
        self._emit(LATENCY, time.perf_counter() - start, "postprocess")
        return responses

    def _update_guard_metrics(self, original: torch.Tensor, reverted: torch.Tensor, attacked: torch.Tensor) -> None:
        """Reverts by class, and the estimated ASR from ``attacked``: the flagged requests with a trigger
        detector, else the reverted ones."""
        names = self.classifier.class_names
        for label in original[reverted].tolist():
            self._emit(REVERTED, 1, names[label])
        self.monitor.update(original, attacked)
        for c, value in enumerate(self.monitor.estimated_asr()):
            if value != self._asr_sent[c]:
                self._emit(ESTIMATED_ASR, value, names[c])
                self._asr_sent[c] = value

    def _update_trigger_metrics(self, original: torch.Tensor, trigger) -> None:
        names = self.classifier.class_names
        for value in (trigger.score / max(trigger.threshold, 1e-12)).tolist():
            self._emit(TRIGGER_SCORE, value)
        for label in original[trigger.flagged].tolist():
            self._emit(FLAGGED, 1, names[label])

    def _update_scan_metrics(self, original: torch.Tensor, scores) -> None:
        names = self.classifier.class_names
        for value in scores.score.tolist():
            self._emit(BACKDOOR_SCORE, value)
        for label in original[scores.disagree].tolist():
            self._emit(DISAGREEMENTS, 1, names[label])

    def explain_handle(self, data_preprocess, raw_data):
        """``/explanations`` gets the same answers as ``/predictions`` (the guard has no other explanation)."""
        return self.postprocess(self.inference(data_preprocess))
