"""The endpoint policy behind a real TorchServe: one server, the planted tiny backdoor archived twice with the same
calibrated trigger detector — ``flag`` (answer and flag) and ``refuse`` (422 with the score and threshold).
Mixed clean and triggered requests share server batches; the answers are those of the same archive loaded here,
refused requests leave their batch-mates' answers alone, and the threshold, flags and refusals show in the
metrics."""

from __future__ import annotations

import io
import re
import shutil
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from guard.detect import TriggerDetector
from guard.models import save_weights
from guard.serving import GuardConfig, GuardedClassifier, ServerSettings, TorchServe, build_archive, free_ports
from outcomes import SEED, check
from test_repair import TARGET, planted

requests = pytest.importorskip("requests")
pytestmark = pytest.mark.serve

BATCH = 8
POLICIES = {"flagging": GuardConfig(on_trigger="flag"), "refusing": GuardConfig(on_trigger="refuse")}


def _png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, "PNG")
    return buf.getvalue()


def _samples(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for match in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M):
        if all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs a Java runtime")
    tmp = tmp_path_factory.mktemp("policy-serve")
    p = planted()
    weights = save_weights(p.backdoored, tmp / "suspect.pt")
    detector = TriggerDetector.calibrate(p.backdoored, p.test_set.images[:200].float() / 255,
                                         false_positive_rate=0.05, generator=torch.Generator().manual_seed(SEED))
    detector_file = detector.save(tmp / "detector.safetensors")
    store, local = tmp / "store", {}
    for name, config in POLICIES.items():
        archive = build_archive("tiny_resnet", weights, store / f"{name}.mar", config, num_classes=4,
                                detector=detector_file)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp / name)
        local[name] = GuardedClassifier.from_archive_dir(tmp / name)
    settings = ServerSettings(*free_ports(5), token_auth=False, batch_size=BATCH, max_batch_delay_ms=150)
    with TorchServe(tmp / "run", store, {n: f"{n}.mar" for n in POLICIES}, settings) as server:
        yield server, local, detector


def _post_together(server, model: str, images: torch.Tensor):
    """All images at once (threads released together); the responses in order."""
    barrier = threading.Barrier(len(images))

    def send(image):
        barrier.wait()
        return requests.post(server.inference_url(model), data=_png(image), headers={"Content-Type": "image/png"},
                             timeout=60)

    with ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(send, images))


def _in_one_batch(server, model: str, images: torch.Tensor):
    """Send ``images`` together until they share one server batch (3 tries)."""
    for _ in range(3):
        before = requests.get(server.metrics_url, timeout=10).text
        replies = _post_together(server, model, images)
        time.sleep(0.5)
        after = requests.get(server.metrics_url, timeout=10).text
        count = _samples(after, "guard_batch_size_count", model_name=model) \
            - _samples(before, "guard_batch_size_count", model_name=model)
        if count == 1:
            return replies, before, after
    pytest.fail(f"{len(images)} concurrent requests never arrived in one server batch")


def _mixed() -> torch.Tensor:
    """Four clean and four triggered non-target test images (not among the calibration images), interleaved."""
    p = planted()
    clean = p.test_set.images[200:][p.test_set.labels[200:] != TARGET][:4]
    triggered = p.triggered.images[200:][p.triggered.labels[200:] != TARGET][:4]
    return torch.stack([img for pair in zip(clean, triggered) for img in pair])


def test_the_threshold_is_read_from_the_archive_and_exported(served):
    server, local, detector = served
    text = requests.get(server.metrics_url, timeout=10).text
    for name, config in POLICIES.items():
        assert local[name].detector.threshold == detector.threshold
        value = _samples(text, "guard_trigger_threshold", model_name=name, false_positive_rate="0.05",
                         on_trigger=config.on_trigger)
        assert value == pytest.approx(detector.threshold, rel=1e-6)


@pytest.mark.outcome
def test_flag_answers_every_request_and_refuse_answers_the_flagged_with_a_422(served):
    server, local, detector = served
    x = _mixed()
    want = local["flagging"].describe(*_local(local["flagging"], x))
    flagged = [w["flagged"] for w in want]
    check("triggered requests flagged", sum(flagged[1::2]), low=3)
    check("clean requests flagged (batch-mates answered)", sum(flagged[0::2]), high=2)

    replies, before, after = _in_one_batch(server, "flagging", x)
    assert [r.status_code for r in replies] == [200] * BATCH
    for reply, expected in zip(replies, want):
        got = reply.json()
        assert got["flagged"] == expected["flagged"] and got["label"] == expected["label"]
        assert got["trigger_score"] == pytest.approx(expected["trigger_score"], rel=1e-4)
    assert _samples(after, "guard_flagged_total", model_name="flagging") \
        - _samples(before, "guard_flagged_total", model_name="flagging") == sum(flagged)
    assert _samples(after, "guard_trigger_score_count", model_name="flagging") \
        - _samples(before, "guard_trigger_score_count", model_name="flagging") == BATCH

    replies, before, after = _in_one_batch(server, "refusing", x)
    for reply, expected in zip(replies, want):
        if expected["flagged"]:
            assert reply.status_code == 422, reply.text
            body = reply.json()
            assert body["type"] == "TriggerDetected" and body["threshold"] == pytest.approx(detector.threshold)
            assert body["trigger_score"] == pytest.approx(expected["trigger_score"], rel=1e-4)
        else:  # batch-mates of refused requests get their answers
            assert reply.status_code == 200, reply.text
            assert reply.json()["label"] == expected["label"] and reply.json()["flagged"] is False
    assert _samples(after, "guard_bad_requests_total", model_name="refusing", status="422") \
        - _samples(before, "guard_bad_requests_total", model_name="refusing", status="422") == sum(flagged)
    # the flagged triggered requests were predicted as the target by the undefended model: its estimated ASR rises
    asr = _samples(after, "guard_estimated_asr", model_name="refusing", **{"class": str(TARGET)})
    check("estimated ASR of the target class", asr, low=0.2)


def _local(classifier: GuardedClassifier, images: torch.Tensor):
    x = images.float() / 255
    result, features = classifier.observe(x)
    return result, None, classifier.detect(result, features, x)
