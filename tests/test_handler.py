"""The TorchServe handler, driven through TorchServe's own ``Context`` and metrics cache (no server).

A batch mixing good and bad requests: the bad ones get their own 4xx, the good ones their predictions,
and every guard metric is emitted the way the worker logs it for the frontend.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import logging
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ts")
from ts.context import Context, RequestProcessor  # noqa: E402
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl  # noqa: E402

from guard import models  # noqa: E402
from guard.serving import HANDLER_FILE, METRICS_FILE, GuardConfig, GuardedClassifier, build_archive  # noqa: E402

# loaded by path, as TorchServe does
_spec = importlib.util.spec_from_file_location("guard_handler", HANDLER_FILE)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
GuardHandler = _module.GuardHandler
NAMES = tuple(f"c{i}" for i in range(10))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("handler")
    weights = models.save_weights(models.create("tiny_resnet"), tmp / "tiny.pt")
    archive = build_archive("tiny_resnet", weights, tmp / "tiny.mar", GuardConfig(class_names=NAMES, top_k=2))
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp / "model")
    return tmp / "model"


def _context(model_dir: Path, metrics_file: Path = METRICS_FILE) -> Context:
    metrics = MetricsCacheYamlImpl(str(metrics_file))
    metrics.initialize_cache()
    metrics.model_name = "tiny"
    return Context("tiny", str(model_dir), {"model": {"handler": "guard_handler.py"}}, 8, None, "0.12.0",
                   metrics=metrics, model_yaml_config={})


def _png(seed: int, size: int = 16) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _batch(context: Context, requests: list[tuple[str, object, str]]) -> list[dict]:
    """Set up the context as TorchServe's ``Service.predict`` does and return the handler's input."""
    headers, data = [], []
    for field, value, content_type in requests:
        headers.append(RequestProcessor({field: {"content-type": content_type}, "Content-Type": content_type}))
        data.append({field: value})
    context.request_processor = headers
    context.request_ids = {i: f"req-{i}" for i in range(len(requests))}
    context.metrics.set_request_ids(context.request_ids)
    return data


def test_a_kserve_envelope_request_is_answered_instance_by_instance(model_dir):
    """KServe's TorchServe runtime (``TS_SERVICE_ENVELOPE=kserve``): one request's ``instances`` are one batch,
    a bad instance gets its error in ``predictions`` and its batch-mates their answers."""
    from ts.torch_handler.request_envelope.kserve import KServeEnvelope

    handler = GuardHandler()
    context = _context(model_dir)
    handler.initialize(context)
    good = [_png(i) for i in range(2)]
    body = {"instances": [{"data": base64.b64encode(good[0]).decode()}, {"data": "@@ not base64"},
                          base64.b64encode(good[1]).decode(), {"data": base64.b64encode(b"garbage").decode()}]}
    data = _batch(context, [("body", body, "application/json")])
    (response,) = KServeEnvelope(handler.handle).handle(data, context)
    predictions = response["predictions"]
    assert len(predictions) == 4 and context.get_response_status(0)[0] == 200
    assert "malformed base64" in predictions[1]["message"] and predictions[1]["code"] == 400
    assert predictions[3]["code"] == 400
    classifier = GuardedClassifier.from_archive_dir(model_dir)
    images = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(g)))).permute(2, 0, 1).float() / 255
                          for g in good])
    for got, want in zip((predictions[0], predictions[2]), classifier.describe(classifier.classify(images))):
        assert got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    all_bad = _batch(context, [("body", {"instances": [{"data": "@@"}]}, "application/json")])
    (response,) = KServeEnvelope(handler.handle).handle(all_bad, context)
    assert context.get_response_status(0)[0] == 400 and response["predictions"][0]["code"] == 400


def _metric_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]guard_")]


def test_batch_with_bad_requests_answers_each_alone(model_dir, caplog):
    handler = GuardHandler()
    context = _context(model_dir)
    handler.initialize(context)
    good = [_png(i) for i in range(3)]
    data = _batch(context, [
        ("body", good[0], "image/png"),
        ("body", b"garbage", "image/png"),
        ("data", good[1], "image/png"),                                   # multipart field
        ("body", b"", ""),
        ("body", {"image": base64.b64encode(good[2]).decode()}, "application/json"),
        ("body", b"hello", "text/plain"),
        ("body", b'{"image": "@@"}', "application/json"),
    ])
    with caplog.at_level(logging.INFO):
        out = handler.handle(data, context)

    statuses = [context.get_response_status(i)[0] for i in range(len(data))]
    assert statuses == [200, 400, 200, 400, 200, 415, 400]
    assert context.get_response_status(5)[1] == "Unsupported Media Type"
    assert all(context.get_response_content_type(i) == "application/json" for i in range(len(data)))
    assert "could not decode" in out[1]["message"] and "empty request body" in out[3]["message"]
    assert "malformed base64" in out[6]["message"] and out[5]["code"] == 415

    classifier = GuardedClassifier.from_archive_dir(model_dir)
    images = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(g)))).permute(2, 0, 1).float() / 255
                          for g in good])
    expected = classifier.describe(classifier.classify(images))
    for got, want in zip((out[0], out[2], out[4]), expected):
        assert got["label"] == want["label"] and got["reverted"] == want["reverted"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)

    lines = _metric_lines(caplog)
    assert any(line.startswith("[METRICS]guard_batch_size.requests:7|#model_name:tiny|#type:HISTOGRAM")
               for line in lines)
    assert any(line.startswith("[METRICS]guard_requests_total.requests:7|#model_name:tiny|") for line in lines)
    bad = [line for line in lines if line.startswith("[METRICS]guard_bad_requests_total")]
    assert sorted(re.search(r"status:(\d+)", line).group(1) for line in bad) == ["400", "400", "400", "415"]
    stages = {re.search(r"stage:(\w+)", line).group(1) for line in lines if "guard_inference_latency_seconds" in line}
    assert stages == {"preprocess", "adapt", "postprocess"}
    asr = [line for line in lines if line.startswith("[METRICS]guard_estimated_asr")]
    assert len(asr) == 10  # every class reported on the first batch


def test_estimated_asr_and_reverted_follow_the_guard(model_dir, caplog):
    handler = GuardHandler()
    context = _context(model_dir)
    handler.initialize(context)
    pngs = [_png(100 + i) for i in range(16)]
    with caplog.at_level(logging.INFO):
        out = handler.handle(_batch(context, [("body", p, "image/png") for p in pngs]), context)
    reverted = [o["original_label"] for o in out if o["reverted"]]
    lines = _metric_lines(caplog)
    counted = [re.search(r"original_class:(\w+)", line).group(1)
               for line in lines if line.startswith("[METRICS]guard_reverted_total")]
    assert sorted(counted) == sorted(NAMES[c] for c in reverted)
    gauges = {re.search(r"class:(\w+)", line).group(1): float(re.search(r":([0-9.]+)\|", line).group(1))
              for line in lines if line.startswith("[METRICS]guard_estimated_asr")}
    for c, name in enumerate(NAMES):
        predicted = [o for o in out if o["original_label"] == c]
        share = sum(o["reverted"] for o in predicted) / len(predicted) if predicted else 0.0
        assert gauges[name] == pytest.approx(share)


def test_undecodable_batch_runs_no_inference(model_dir, caplog):
    handler = GuardHandler()
    context = _context(model_dir)
    handler.initialize(context)
    with caplog.at_level(logging.INFO):
        out = handler.handle(_batch(context, [("body", b"x", "image/png"), ("a", b"", "")]), context)
    assert [context.get_response_status(i)[0] for i in range(2)] == [400, 400]
    assert [o["code"] for o in out] == [400, 400]
    assert not any("stage:adapt" in line for line in _metric_lines(caplog))


def test_explanations_answer_like_predictions(model_dir):
    handler = GuardHandler()
    context = _context(model_dir)
    handler.initialize(context)
    data = _batch(context, [("body", _png(7), "image/png")])
    context.request_processor[0] = RequestProcessor({"body": {"content-type": "image/png"}, "explain": "True"})
    out = handler.handle(data, context)
    assert set(out[0]) == {"label", "class", "probabilities", "original_label", "reverted", "anomaly_score"}


def test_tampered_weights_are_refused_with_a_log_line(model_dir, tmp_path, caplog):
    tampered = tmp_path / "model"
    tampered.mkdir()
    for path in model_dir.iterdir():
        if path.is_file():
            (tampered / path.name).write_bytes(path.read_bytes())
    (tampered / "tiny.pt").write_bytes((tampered / "tiny.pt").read_bytes() + b"\0")
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="SHA-256"):
        GuardHandler().initialize(_context(tampered))
    assert any("guard: refusing to load model tiny" in r.getMessage() for r in caplog.records)


def test_metrics_absent_from_the_servers_metrics_file_are_still_emitted(model_dir, caplog):
    import ts

    handler = GuardHandler()
    context = _context(model_dir, Path(ts.__file__).parent / "configs" / "metrics.yaml")  # TorchServe's default
    with caplog.at_level(logging.INFO):
        handler.initialize(context)
        handler.handle(_batch(context, [("body", _png(1), "image/png")]), context)
    assert any("guard_batch_size is not declared" in r.getMessage() for r in caplog.records)
    assert any(line.startswith("[METRICS]guard_batch_size.requests:1|") for line in _metric_lines(caplog))


def test_scan_report_and_repaired_model_become_metrics_and_answers(tmp_path, caplog):
    from guard.detect import ScanReport

    weights = models.save_weights(models.create("tiny_resnet"), tmp_path / "tiny.pt")
    repaired = models.save_weights(models.create("tiny_resnet", generator=torch.Generator().manual_seed(3)),
                                   tmp_path / "repaired.pt")
    scores = {c: round(0.05 * c, 2) for c in range(10)}
    report = ScanReport("cnc", True, 9, scores, 0.4).save(tmp_path / "report.json")
    archive = build_archive("tiny_resnet", weights, tmp_path / "tiny.mar", GuardConfig(class_names=NAMES),
                            scan=report, repaired=repaired)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp_path / "model")
    handler = GuardHandler()
    context = _context(tmp_path / "model")
    with caplog.at_level(logging.INFO):
        handler.initialize(context)
    lines = _metric_lines(caplog)
    gauges = {re.search(r"class:(\w+)", line).group(1): float(re.search(r":([0-9.]+)\|", line).group(1))
              for line in lines if line.startswith("[METRICS]guard_scan_score.score:") and "method:cnc," in line}
    assert gauges == {NAMES[c]: s for c, s in scores.items()}
    verdict = [line for line in lines if line.startswith("[METRICS]guard_scan_backdoored")]
    assert len(verdict) == 1
    assert verdict[0].startswith("[METRICS]guard_scan_backdoored.verdict:1.0|#model_name:tiny,method:cnc,"
                                 "flagged_class:c9|")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        out = handler.handle(_batch(context, [("body", _png(i), "image/png") for i in range(5)]
                                    + [("body", b"bad", "image/png")]), context)
    assert all({"backdoor_score", "repaired_label", "disagree"} <= set(o) for o in out[:5]) and "code" in out[5]
    lines = _metric_lines(caplog)
    assert len([line for line in lines if line.startswith("[METRICS]guard_backdoor_score")]) == 5
    counted = [re.search(r"original_class:(\w+)", line).group(1)
               for line in lines if line.startswith("[METRICS]guard_repair_disagreements_total")]
    assert sorted(counted) == sorted(NAMES[o["original_label"]] for o in out[:5] if o["disagree"])
    assert any("stage:score" in line for line in lines)
