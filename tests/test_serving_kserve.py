"""The KServe layout (``guard archive --kserve DIR``) served by a real TorchServe started exactly as KServe's
TorchServe runtime starts it, answering a KServe v1 request; the deploy/kserve manifests checked against the
KServe SDK's schema of each resource."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from guard import models
from guard.cli import main
from guard.serving import GuardConfig, build_archive, build_kserve_layout

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kserve"
NAMES = [f"c{i}" for i in range(10)]


def _png(seed: int) -> str:
    array = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("kserve")
    weights = models.save_weights(models.create("tiny_resnet"), tmp / "tiny.pt")
    return build_archive("tiny_resnet", weights, tmp / "store" / "tiny.mar", GuardConfig(class_names=NAMES))


def test_the_layout_is_what_the_runtime_reads(tiny_archive, tmp_path):
    layout = tmp_path / "layout"
    code = main(["archive", "--model", "tiny_resnet", "--weights", str(tiny_archive.parent.parent / "tiny.pt"),
                 "--guard-config", str(_config(tmp_path)), "--out", str(tmp_path / "a" / "cifar.mar"),
                 "--kserve", str(layout)])
    assert code == 0
    build_kserve_layout(layout, tiny_archive, name="second", workers=2)
    assert sorted(p.name for p in (layout / "model-store").iterdir()) == [
        "cifar.mar", "cifar.mar.sha256", "second.mar", "second.mar.sha256"]
    props = dict(line.split("=", 1) for line in (layout / "config" / "config.properties").read_text().splitlines()
                 if line and not line.startswith("#"))
    assert props["inference_address"] == "http://127.0.0.1:8085"  # where KServe's model server forwards
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["metrics_config"] == "/mnt/models/config/metrics.yaml"
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["modelCount"] == 2 and set(snapshot["models"]) == {"cifar", "second"}
    assert snapshot["models"]["second"]["1.0"]["minWorkers"] == 2
    assert snapshot["models"]["cifar"]["1.0"]["marName"] == "cifar.mar"


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "guard.json"
    path.write_text(json.dumps({"class_names": NAMES}))
    return path


@pytest.mark.parametrize("problem, message", [("missing", "does not exist"), ("name", "model name: expected"),
                                              ("workers", "workers: expected"), ("tampered", "records"),
                                              ("unverified", "no checksum file")])
def test_bad_layout_requests_are_refused(tiny_archive, tmp_path, problem, message):
    archive = tmp_path / "none.mar" if problem == "missing" else tiny_archive
    if problem in ("tampered", "unverified"):
        archive = tmp_path / "copy.mar"
        archive.write_bytes(tiny_archive.read_bytes() + (b"x" if problem == "tampered" else b""))
        if problem == "tampered":
            checksum = tiny_archive.with_name(tiny_archive.name + ".sha256").read_text()
            archive.with_name(archive.name + ".sha256").write_text(checksum)
    kwargs = {"name": "a/b"} if problem == "name" else {"workers": 0} if problem == "workers" else {}
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        build_kserve_layout(tmp_path / "layout", archive, **kwargs)


@pytest.mark.serve
def test_torchserve_started_as_the_runtime_does_answers_a_kserve_v1_request(tiny_archive, tmp_path):
    """``torchserve --start --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties``
    with ``TS_SERVICE_ENVELOPE=kserve``, the layout mounted at its own path (``--kserve-mount``)."""
    requests = pytest.importorskip("requests")
    busy = [p for p in (8085, 8082, 7070, 7071) if not _port_free(p)]
    if busy:
        pytest.skip(f"the runtime's fixed ports {busy} are in use on this machine")
    mount = tmp_path / "mnt" / "models"
    build_kserve_layout(mount, tiny_archive, name="cifar", mount=str(mount))
    env = {**os.environ, "TS_SERVICE_ENVELOPE": "kserve", "TMPDIR": str(tmp_path),
           "LOG_LOCATION": str(tmp_path / "logs"), "METRICS_LOCATION": str(tmp_path / "logs")}
    env.pop("TS_CONFIG_FILE", None)
    torchserve = str(Path(sys.executable).with_name("torchserve"))  # TorchServe's own command, of this environment
    start = [torchserve, "--start", f"--model-store={mount}/model-store",
             f"--ts-config={mount}/config/config.properties"]
    try:
        with open(tmp_path / "torchserve.out", "wb") as out:  # the daemon inherits it: no pipe to wait on
            subprocess.run(start, cwd=tmp_path, env=env, check=True, stdout=out, stderr=subprocess.STDOUT,
                           timeout=60)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                status = requests.get("http://127.0.0.1:8085/models/cifar", timeout=2).json()
                if any(w.get("status") == "READY" for w in status[0].get("workers", [])):
                    break
            except (requests.RequestException, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"the model never got a READY worker; log: {_log_tail(tmp_path)}")
        body = {"instances": [{"data": _png(0)}, {"data": _png(1)}, {"data": "@@"}]}
        for path in ("/predictions/cifar", "/v1/models/cifar:predict"):
            answer = requests.post(f"http://127.0.0.1:8085{path}", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            predictions = answer.json()["predictions"]
            assert len(predictions) == 3
            assert all(p["class"] in NAMES and 0 <= p["label"] < 10 for p in predictions[:2])
            assert predictions[2]["code"] == 400 and "malformed base64" in predictions[2]["message"]
        metrics = requests.get("http://127.0.0.1:8082/metrics", timeout=10).text
        assert 'guard_requests_total{' in metrics and 'model_name="cifar"' in metrics
    finally:
        subprocess.run([torchserve, "--stop"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)


def _log_tail(tmp_path: Path) -> str:
    logs = sorted((tmp_path / "logs").glob("*.log"))
    return "\n".join(p.read_text()[-2000:] for p in logs)


# -- the manifests, against the KServe SDK's (and Kubernetes client's) generated schema of each resource ----------
_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}
_RESOURCES = {("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
              ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime"}


def _schema_class(name: str):
    kserve_models = pytest.importorskip("kserve.models")
    k8s_models = pytest.importorskip("kubernetes.client.models")
    cls = getattr(kserve_models, name, None) or getattr(k8s_models, name, None)
    assert cls is not None, f"no schema class {name}"
    return cls


def _check(value, type_name: str, path: str):
    """Build the SDK object for ``value`` of OpenAPI type ``type_name``: an unknown field, a wrong type or a
    missing required field (the generated constructors validate them) fails with the field's path."""
    if type_name.lower().startswith("list["):  # list[T] (KServe) or List[T] (Kubernetes)
        assert isinstance(value, list), f"{path}: expected a list, got {value!r}"
        return [_check(v, type_name[5:-1], f"{path}[{i}]") for i, v in enumerate(value)]
    if type_name.lower().startswith(("dict(", "dict[")):  # dict(str, T) or Dict[str, T]
        assert isinstance(value, dict), f"{path}: expected a mapping, got {value!r}"
        inner = type_name[5:-1].split(", ", 1)[1]
        return {k: _check(v, inner, f"{path}.{k}") for k, v in value.items()}
    if type_name in _PRIMITIVES:
        assert isinstance(value, _PRIMITIVES[type_name]) and not (type_name != "bool" and isinstance(value, bool)), \
            f"{path}: expected {type_name}, got {value!r}"
        return value
    if type_name == "object":
        return value
    cls = _schema_class(type_name)
    assert isinstance(value, dict), f"{path}: expected a {type_name} mapping, got {value!r}"
    fields = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(fields))
    assert not unknown, f"{path}: fields {unknown} are not in {type_name} (known: {sorted(fields)})"
    kwargs = {fields[k]: _check(v, cls.openapi_types[fields[k]], f"{path}.{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        pytest.fail(f"{path}: {type_name}: {exc}")


def _manifests():
    return sorted(DEPLOY.glob("*.yaml"))


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_the_manifests_fit_the_kserve_schema(path):
    for doc in yaml.safe_load_all(path.read_text()):
        kind = _RESOURCES.get((doc.get("apiVersion"), doc.get("kind")))
        assert kind is not None, f"{path.name}: unexpected resource {doc.get('apiVersion')} {doc.get('kind')}"
        _check(doc, kind, f"{path.name}:{doc['kind']}")


def test_the_manifests_serve_the_layout_guard_writes():
    """The runtime starts TorchServe on the layout at KServe's mount, the services run on it, Prometheus is
    pointed at the metrics port the layout opens."""
    from guard.serving.kserve import KSERVE_MOUNT, METRICS_PORT

    docs = {p.name: yaml.safe_load(p.read_text()) for p in _manifests()}
    runtime = docs["servingruntime.yaml"]
    args = runtime["spec"]["containers"][0]["args"]
    assert f"--ts-config={KSERVE_MOUNT}/config/config.properties" in args
    assert f"--model-store={KSERVE_MOUNT}/model-store" in args
    assert {"name": "TS_SERVICE_ENVELOPE", "value": "kserve"} in runtime["spec"]["containers"][0]["env"]
    services = [d for name, d in docs.items() if name.startswith("inferenceservice")]
    assert len(services) == 2
    for isvc in services:
        assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
        assert isvc["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
        assert isvc["spec"]["predictor"]["maxReplicas"] > isvc["spec"]["predictor"]["minReplicas"]
    gpus = [d for d in services if "nvidia.com/gpu" in d["spec"]["predictor"]["model"]["resources"]["limits"]]
    assert len(gpus) == 1


def test_the_schema_check_catches_a_wrong_manifest():
    good = yaml.safe_load((DEPLOY / "inferenceservice-cpu.yaml").read_text())
    typo = json.loads(json.dumps(good))
    typo["spec"]["predictor"]["maxReplica"] = 3
    wrong_type = json.loads(json.dumps(good))
    wrong_type["spec"]["predictor"]["minReplicas"] = "one"
    for bad, message in ((typo, "maxReplica"), (wrong_type, "minReplicas: expected int")):
        with pytest.raises(AssertionError, match=message):
            _check(bad, "V1beta1InferenceService", "isvc")
    runtime = yaml.safe_load((DEPLOY / "servingruntime.yaml").read_text())
    del runtime["spec"]["containers"][0]["name"]  # required by the Container schema
    with pytest.raises(pytest.fail.Exception, match="name"):
        _check(runtime, "V1alpha1ServingRuntime", "runtime")
