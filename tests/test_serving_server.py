"""A real TorchServe on free loopback ports, started and stopped through ``guard serve``, answering real
HTTP requests with CIFAR-10 test images; metrics scraped directly and by a real Prometheus.

One server (the demo: pretrained ResNet-20 behind ReScaler, token authorization on) is shared by the
module; batch size 8 with a 150 ms batch delay so that concurrent requests share a server batch.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from guard import data
from guard.cli import main
from guard.serving import METRICS, GuardedClassifier, ServerError, ServerSettings, TorchServe, free_ports

requests = pytest.importorskip("requests")
pytestmark = pytest.mark.serve

MODEL = "resnet20"
BATCH = 8
RESPONSE_KEYS = {"label", "class", "probabilities", "original_label", "reverted", "anomaly_score"}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cifar(data_root):
    test = data.load_dataset("cifar10", data_root, split="test-lossless")
    return test.images[:64].permute(0, 2, 3, 1).numpy(), test.labels[:64]


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_root):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs a Java runtime")
    tmp = tmp_path_factory.mktemp("serve")
    run_dir = tmp / "run"
    code = main(["serve", "--model-store", str(tmp / "store"), "--run-dir", str(run_dir), "--data-dir",
                 str(data_root), "--ports", ",".join(map(str, free_ports(5))), "--batch-size", str(BATCH),
                 "--max-batch-delay", "150", "--no-progress"])
    assert code == 0
    server = TorchServe.attach(run_dir)
    assert server.settings.token_auth
    pids = [server.pid, *server.worker_pids(MODEL)]
    yield server
    assert main(["serve", "--stop", "--run-dir", str(run_dir)]) == 0
    assert not any(_alive(pid) for pid in pids), "guard serve --stop returned before TorchServe exited"
    assert not (run_dir / "server.json").exists()


@pytest.fixture(scope="module")
def local(server, tmp_path_factory):
    """The same archive loaded in this process: what the server should answer."""
    into = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(server.model_store / server.models[MODEL]) as zf:
        zf.extractall(into)
    return GuardedClassifier.from_archive_dir(into)


def post(server, body, content_type: str | None = "image/png", **kwargs):
    headers = dict(server.auth_headers())
    if content_type is not None:
        headers["Content-Type"] = content_type
    return requests.post(server.inference_url(MODEL), data=body, headers=headers, timeout=60, **kwargs)


def post_concurrently(server, bodies: list[tuple[object, str | None]]):
    """Send all requests at once (threads released together) and return the responses in order."""
    barrier = threading.Barrier(len(bodies))

    def send(item):
        barrier.wait()
        return post(server, *item)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def scrape(server) -> str:
    return requests.get(server.metrics_url, timeout=10).text


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def batches_of(server, action) -> tuple[float, float, object]:
    """Run ``action`` and return how many server batches and requests ``guard_batch_size`` saw for it."""
    before = scrape(server)
    result = action()
    time.sleep(0.5)
    after = scrape(server)
    count = sample(after, "guard_batch_size_count") - sample(before, "guard_batch_size_count")
    total = sample(after, "guard_batch_size_sum") - sample(before, "guard_batch_size_sum")
    return count, total, result


def in_one_batch(server, bodies):
    """Send ``bodies`` concurrently until they share one server batch (3 tries), return the responses."""
    for _ in range(3):
        count, total, responses = batches_of(server, lambda: post_concurrently(server, bodies))
        assert total == len(bodies)
        if count == 1:
            return responses
    pytest.fail(f"{len(bodies)} concurrent requests never arrived in one server batch")


def expected_answers(local, images: np.ndarray) -> list[dict]:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return local.describe(local.classify(x))


def assert_same_answer(got: dict, want: dict) -> None:
    assert set(got) == RESPONSE_KEYS
    for key in ("label", "class", "original_label", "reverted"):
        assert got[key] == want[key], key
    assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)
    assert got["anomaly_score"] == pytest.approx(want["anomaly_score"], abs=1e-4)


def test_cifar_images_get_the_guarded_answer(server, local, cifar):
    images, labels = cifar
    responses = post_concurrently(server, [(png(im), "image/png") for im in images[:32]])
    assert [r.status_code for r in responses] == [200] * 32
    answers = [r.json() for r in responses]
    for got, want in zip(answers, expected_answers(local, images[:32])):
        assert_same_answer(got, want)
    accuracy = np.mean([a["original_label"] == int(y) for a, y in zip(answers, labels[:32])])
    assert accuracy >= 0.8  # the pretrained ResNet-20 (91.5 % on these images)
    assert all(a["class"] == data.CIFAR10_CLASSES[a["label"]] for a in answers)
    assert all(len(a["probabilities"]) == 3 for a in answers)


def test_concurrent_requests_arrive_in_one_batch(server, cifar):
    images, _ = cifar
    responses = in_one_batch(server, [(png(im), "image/png") for im in images[32:32 + BATCH]])
    assert [r.status_code for r in responses] == [200] * BATCH


def test_bad_requests_are_answered_alone_in_a_shared_batch(server, local, cifar):
    images, _ = cifar
    good = images[40:44]
    bodies = [(png(good[0]), "image/png"), (b"\x89PNG garbage", "image/png"), (png(good[1]), "image/png"),
              (b"", "image/png"), (png(good[2]), None), (b"hello", "text/plain"), (png(good[3]), "image/png"),
              (b'{"image": ', "application/json")]
    responses = in_one_batch(server, bodies)
    assert [r.status_code for r in responses] == [200, 400, 200, 400, 200, 415, 200, 400]
    for got, want in zip((responses[i].json() for i in (0, 2, 4, 6)), expected_answers(local, good)):
        assert_same_answer(got, want)
    assert "could not decode" in responses[1].json()["message"]
    assert "malformed JSON" in responses[7].json()["message"]


def _bomb() -> bytes:
    from test_serving_decode import png_bomb  # tests/ is on sys.path under pytest's default import mode

    return png_bomb(20_000, 20_000)


BAD_INPUTS = {
    "undecodable": (b"definitely not an image", "image/png", 400, "could not decode the body as an image"),
    "empty": (b"", "image/png", 400, "empty request body"),
    "wrong content type": (b"hello", "text/plain", 415, "unsupported content type 'text/plain'"),
    "form-encoded": (b"a=1&b=2", "application/x-www-form-urlencoded", 415, "--data-binary"),
    "malformed JSON": (b'{"image": [', "application/json", 400, "malformed JSON"),
    "JSON without image": (b'{"picture": "x"}', "application/json", 400, "keys ['picture']"),
    "malformed base64": (b'{"image": "$$$"}', "application/json", 400, "malformed base64"),
    "JSON of no image": (json.dumps({"image": base64.b64encode(b"nope").decode()}).encode(), "application/json",
                         400, "could not decode the body"),
}


def test_every_bad_input_kind_gets_a_4xx_with_a_message(server, cifar):
    images, _ = cifar
    truncated = png(images[0])[:300]
    kinds = {**BAD_INPUTS, "truncated PNG": (truncated, "image/png", 400, "could not decode the PNG"),
             "decompression bomb": (None, "image/png", 413, "decompression-bomb guard")}
    bodies = [(body if body is not None else _bomb(), ctype) for body, ctype, _, _ in kinds.values()]
    responses = post_concurrently(server, bodies)
    for (name, (_, _, status, words)), response in zip(kinds.items(), responses):
        assert response.status_code == status, name
        assert words in response.json()["message"], name
    oversized = post(server, b"\0" * 7_000_000)  # above max_request_size: refused by the server itself
    assert oversized.status_code == 413


def test_other_encodings_and_colour_modes_are_handled(server, local, cifar):
    images, _ = cifar
    rgb = images[50]
    gray8 = np.array(Image.fromarray(rgb).convert("L"))
    gray16 = gray8.astype(np.uint16) * 257
    rgba = np.concatenate([rgb, np.full((32, 32, 1), 128, np.uint8)], axis=2)
    raw = png(rgb)
    headers = server.auth_headers()
    multipart = requests.post(server.inference_url(MODEL), files={"data": ("x.png", raw, "image/png")},
                              headers=headers, timeout=60)
    as_json = requests.post(server.inference_url(MODEL), json={"image": base64.b64encode(raw).decode()},
                            headers=headers, timeout=60)
    others = post_concurrently(server, [(png(gray8), "image/png"), (png(gray16), "image/png"),
                                        (png(rgba), "image/png"), (raw, None)])
    assert [r.status_code for r in (multipart, as_json, *others)] == [200] * 6
    want_rgb, want_gray = expected_answers(local, np.stack([rgb, np.repeat(gray8[..., None], 3, axis=2)]))
    for response in (multipart, as_json, others[2], others[3]):
        assert_same_answer(response.json(), want_rgb)  # RGBA: alpha dropped
    for response in others[:2]:
        assert_same_answer(response.json(), want_gray)  # 16-bit scaled to the same pixels


def test_requests_without_the_token_are_refused(server, cifar):
    images, _ = cifar
    response = requests.post(server.inference_url(MODEL), data=png(images[0]),
                             headers={"Content-Type": "image/png"}, timeout=30)
    assert 400 <= response.status_code < 500
    assert "label" not in response.text


def test_metrics_endpoint_exports_the_guard_metrics(server, cifar):
    images, _ = cifar
    before = scrape(server)
    bodies = [(png(im), "image/png") for im in images[:5]] + [(b"x", "image/png"), (b"", "image/png"),
                                                               (b"a", "text/plain")]
    post_concurrently(server, bodies)
    time.sleep(0.5)
    text = scrape(server)
    types = dict(re.findall(r"^# TYPE (guard_\w+) (\w+)$", text, re.M))
    assert types == {spec.name: spec.kind for spec in METRICS}  # every declared metric, with its kind
    for spec in METRICS:  # and its labels plus Hostname, as guard.serving.metrics.PrometheusExporter exports them
        for labels in re.findall(rf"^{spec.name}(?:_count)?\{{(.*)\}} ", text, re.M):
            assert sorted(re.findall(r'(\w+)="', labels)) == sorted([*spec.labels, "Hostname"]), spec.name
    delta = sample(text, "guard_requests_total") - sample(before, "guard_requests_total")
    assert delta == 8
    for status, count in (("400", 2), ("415", 1)):
        got = sample(text, "guard_bad_requests_total", status=status)
        assert got - sample(before, "guard_bad_requests_total", status=status) == count
    stages = set(re.findall(r'guard_inference_latency_seconds_count\{.*stage="(\w+)"', text))
    assert stages == {"preprocess", "adapt", "postprocess"}
    asr = re.findall(r'^guard_estimated_asr\{.*class="(\w+)".*\} (\S+)$', text, re.M)
    assert {c for c, _ in asr} <= set(data.CIFAR10_CLASSES) and asr
    assert all(0.0 <= float(v) <= 1.0 for _, v in asr)


def test_1000_mixed_requests_from_8_clients_restart_no_worker(server, cifar):
    images, _ = cifar
    workers = server.worker_pids(MODEL)
    bad = list(BAD_INPUTS.values())
    jobs = []
    for i in range(1000):
        if i % 4 == 3:
            body, ctype, status, _ = bad[(i // 4) % len(bad)]
            jobs.append((body, ctype, status))
        else:
            jobs.append((png(images[i % len(images)]), "image/png", 200))
    before = scrape(server)

    def client(offset: int) -> list[tuple[int, int]]:
        session = requests.Session()
        session.headers.update(server.auth_headers())
        out = []
        for body, ctype, _ in jobs[offset::8]:
            response = session.post(server.inference_url(MODEL), data=body, headers={"Content-Type": ctype},
                                    timeout=60)
            out.append((response.status_code, "label" in response.json()))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [r for offset_results in pool.map(client, range(8)) for r in offset_results]
    expected = [status for offset in range(8) for _, _, status in jobs[offset::8]]
    assert [code for code, _ in results] == expected
    assert all(has_label == (code == 200) for code, has_label in results)
    assert server.worker_pids(MODEL) == workers
    assert all(w["status"] == "READY" for d in server.model_status(MODEL) for w in d["workers"])
    time.sleep(0.5)
    after = scrape(server)
    assert sample(after, "Requests5XX") == sample(before, "Requests5XX")
    assert sample(after, "guard_requests_total") - sample(before, "guard_requests_total") == 1000


def test_prometheus_scrapes_the_latency_histogram(server, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian package: prometheus)")
    (port,) = free_ports(1)
    target = urllib.parse.urlsplit(server.metrics_url).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: guard\n"
                      f"    static_configs:\n      - targets: ['{target}']\n")
    process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    query = "sum by (stage) (guard_inference_latency_seconds_count)"
    try:
        deadline = time.monotonic() + 90
        result = []
        while time.monotonic() < deadline and len(result) < 3:
            time.sleep(1)
            try:
                reply = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5)
            except requests.ConnectionError:
                continue
            if reply.ok:
                result = reply.json()["data"]["result"]
        assert {r["metric"]["stage"] for r in result} == {"preprocess", "adapt", "postprocess"}
        assert all(float(r["value"][1]) > 0 for r in result)
        quantile = "histogram_quantile(0.99, sum by (le, stage) (guard_inference_latency_seconds_bucket))"
        reply = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": quantile}, timeout=5)
        values = {r["metric"]["stage"]: float(r["value"][1]) for r in reply.json()["data"]["result"]}
        assert set(values) == {"preprocess", "adapt", "postprocess"} and all(v > 0 for v in values.values())
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_tampered_archive_is_refused_at_start(server, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    source = server.model_store / server.models[MODEL]
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(store / "bad.mar", "w") as zout:
        for item in zin.infolist():
            payload = zin.read(item)
            if item.filename.endswith(".th"):
                payload += b"\0"  # same manifest, different weights
            zout.writestr(item, payload)
    ports = free_ports(5)
    bad = TorchServe(tmp_path / "run", store, {"bad": "bad.mar"},
                     ServerSettings(*ports, token_auth=False, batch_size=1))
    started = time.monotonic()
    with pytest.raises(ServerError) as info:
        bad.start(timeout=120)
    assert time.monotonic() - started < 100
    assert "guard: refusing to load model bad" in str(info.value) and "SHA-256" in str(info.value)
    assert not bad.is_running()
