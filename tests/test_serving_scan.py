"""A scanned and repaired model behind a real TorchServe: ``guard scan``'s report and ``guard repair``'s model
travel in the archive; the endpoint exports the CNC gauges and verdict at load and scores every request
against the repaired model (one extra forward per server batch).

The served model is the tiny ResNet with a planted BadNets backdoor of ``test_repair``; the scan and the
repair are real (CNC at tiny scale), only their size is reduced.
"""

from __future__ import annotations

import io
import re
import shutil
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from guard.cli import main
from guard.detect import CalibratedTriggerInversion
from guard.models import save_weights
from guard.serving import GuardedClassifier, ServerSettings, TorchServe, free_ports, read_manifest
from outcomes import SEED, check
from test_detect import TINY_CNC
from test_repair import TARGET, planted

requests = pytest.importorskip("requests")
pytestmark = pytest.mark.serve

NAME = "suspect"


def _png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, "PNG")
    return buf.getvalue()


def _samples(text: str, name: str) -> dict[str, float]:
    """``{label-set: value}`` for every sample of ``name`` in a Prometheus scrape."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M)}


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """The backdoored tiny model, its CNC scan report and the repair the scan made, as files."""
    tmp = tmp_path_factory.mktemp("scanned")
    p = planted()
    scan = CalibratedTriggerInversion(TINY_CNC).scan(p.backdoored, p.trusted, p.test_set,
                                                     generator=torch.Generator().manual_seed(SEED))
    return {"weights": save_weights(p.backdoored, tmp / "suspect.pt"), "report": scan.report.save(tmp / "report.json"),
            "repaired": save_weights(scan.reference, tmp / "repaired.pt"), "scan": scan, "planted": p, "tmp": tmp}


@pytest.fixture(scope="module")
def server(scanned):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs a Java runtime")
    tmp = scanned["tmp"]
    store = tmp / "store"
    assert main(["archive", "--model", "tiny_resnet", "--num-classes", "4", "--weights", str(scanned["weights"]),
                 "--scan", str(scanned["report"]), "--repaired", str(scanned["repaired"]),
                 "--out", str(store / f"{NAME}.mar")]) == 0
    settings = ServerSettings(*free_ports(5), token_auth=False, batch_size=8, max_batch_delay_ms=100)
    with TorchServe(tmp / "run", store, {NAME: f"{NAME}.mar"}, settings) as running:
        yield running


def _post_batch(server, images: torch.Tensor) -> list[dict]:
    """All images at once (they share server batches); the answers in order."""
    from concurrent.futures import ThreadPoolExecutor

    def send(image):
        reply = requests.post(server.inference_url(NAME), data=_png(image), headers={"Content-Type": "image/png"},
                              timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()

    with ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(send, images))


def test_archive_carries_the_scan_and_the_repaired_model(scanned, server):
    manifest = read_manifest(server.model_store / f"{NAME}.mar")
    assert manifest.scan_file == "guard-scan.json" and manifest.repaired_file == "guard-repaired.pt"
    assert manifest.scan_method == "cnc"
    with zipfile.ZipFile(server.model_store / f"{NAME}.mar") as zf:
        assert {"guard-scan.json", "guard-repaired.pt", "suspect.pt"} <= set(zf.namelist())


def test_metrics_endpoint_exports_the_scan_at_load(scanned, server):
    report = scanned["scan"].report
    assert report.backdoored and report.flagged_class == TARGET  # the scan found the planted backdoor
    text = requests.get(server.metrics_url, timeout=10).text
    gauges = {re.search(r'class="(\w+)"', k).group(1): v for k, v in _samples(text, "guard_scan_score").items()
              if 'method="cnc"' in k}
    assert gauges == pytest.approx({str(c): s for c, s in report.scores.items()}, abs=1e-6)
    verdict = _samples(text, "guard_scan_backdoored")
    assert len(verdict) == 1
    (labels, value), = verdict.items()
    assert value == 1.0 and f'flagged_class="{TARGET}"' in labels and 'method="cnc"' in labels


@pytest.mark.outcome
def test_responses_carry_per_request_scores_against_the_repaired_model(scanned, server):
    p = planted()
    clean = p.test_set.images[p.test_set.labels != TARGET][:8]
    triggered = p.triggered.images[p.triggered.labels != TARGET][:8]
    before = requests.get(server.metrics_url, timeout=10).text
    answers = {"clean": _post_batch(server, clean), "triggered": _post_batch(server, triggered)}

    # what the server must answer: the same archive loaded here
    into = scanned["tmp"] / "unpacked"
    with zipfile.ZipFile(server.model_store / f"{NAME}.mar") as zf:
        zf.extractall(into)
    local = GuardedClassifier.from_archive_dir(into)
    for kind, images in (("clean", clean), ("triggered", triggered)):
        x = images.float() / 255
        result = local.classify(x)
        want = local.describe(result, local.score(x, result))
        for got, expected in zip(answers[kind], want):
            assert got["repaired_label"] == expected["repaired_label"]
            assert got["disagree"] == expected["disagree"]
            assert got["backdoor_score"] == pytest.approx(expected["backdoor_score"], abs=1e-4)
            assert got["original_label"] == expected["original_label"]

    # the backdoor fires on the served model, the repaired model keeps the true labels: high scores
    fired = [a for a in answers["triggered"] if a["original_label"] == TARGET]
    check("triggered requests the backdoor fires on", len(fired), low=6)
    check("disagreement on those", sum(a["disagree"] for a in fired) / len(fired), low=0.75)
    mean = {k: float(np.mean([a["backdoor_score"] for a in v])) for k, v in answers.items()}
    check("triggered - clean mean backdoor_score", mean["triggered"] - mean["clean"], low=0.3)

    time.sleep(0.5)
    after = requests.get(server.metrics_url, timeout=10).text
    disagreements = sum(a["disagree"] for v in answers.values() for a in v)
    assert sum(_samples(after, "guard_repair_disagreements_total").values()) \
        - sum(_samples(before, "guard_repair_disagreements_total").values()) == disagreements
    count = lambda text: sum(_samples(text, "guard_backdoor_score_count").values())  # noqa: E731
    assert count(after) - count(before) == 16
    assert re.search(r'guard_inference_latency_seconds_count\{.*stage="score"', after)
