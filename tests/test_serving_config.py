"""Guard config and archive manifest validation, the revert monitor, and the server configuration files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from guard import ReScalerConfig
from guard.serving import (METRICS, METRICS_FILE, TS_CONFIG_FILE, ArchiveManifest, GuardConfig, RevertMonitor,
                           ServerSettings, TorchServe)
from guard.serving.server import read_properties

SHA = "ab" * 32


def test_guard_config_round_trips_through_json_and_pickle(tmp_path):
    config = GuardConfig(rescaler=ReScalerConfig(eps=0.1, alpha=0.5, steps=2), enabled=False, top_k=5,
                         class_names=("a", "b"), resize="stretch", max_image_pixels=1000, asr_window=50,
                         memory_limit_mb=512)
    path = tmp_path / "guard.json"
    path.write_text(json.dumps(config.to_dict()))
    assert GuardConfig.load(path) == config
    assert pickle.loads(pickle.dumps(config)) == config
    assert GuardConfig.from_dict({"rescaler": {"eps": 0.05}}).rescaler == ReScalerConfig(eps=0.05)


@pytest.mark.parametrize("data, error, words", [
    ({"top_k": 0}, ValueError, "top_k must be an int >= 1, got 0"),
    ({"resize": "crop"}, ValueError, "resize must be one of"),
    ({"enabled": "yes"}, TypeError, "enabled must be true or false"),
    ({"class_names": ["a", "a"]}, ValueError, "distinct"),
    ({"class_names": "ab"}, TypeError, "list of non-empty strings"),
    ({"max_image_pixels": -1}, ValueError, "max_image_pixels"),
    ({"memory_limit_mb": 0}, ValueError, "memory_limit_mb must be an int >= 1, got 0"),
    ({"memory_limit_mb": 1.5}, ValueError, "memory_limit_mb must be an int >= 1, got 1.5"),
    ({"rescaler": {"eps": 2.0}}, ValueError, "eps must be a number in (0, 1]"),
    ({"rescaler": {"epsilon": 0.1}}, ValueError, "unknown keys ['epsilon']"),
    ({"topk": 3}, ValueError, "unknown keys ['topk']"),
])
def test_guard_config_rejects_bad_values(data, error, words):
    with pytest.raises(error) as info:
        GuardConfig.from_dict(data)
    assert words in str(info.value)


def test_guard_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        GuardConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{eps: 1")
    with pytest.raises(ValueError, match="not valid JSON"):
        GuardConfig.load(bad)


def test_manifest_checks_its_fields(tmp_path):
    manifest = ArchiveManifest("resnet20", 10, "w.th", SHA, GuardConfig(class_names=tuple("abcdefghij")))
    assert ArchiveManifest.load(manifest.save(tmp_path / "m.json")) == manifest
    with pytest.raises(ValueError, match="64 lowercase hex"):
        ArchiveManifest("resnet20", 10, "w.th", "abc")
    with pytest.raises(ValueError, match="bare file name"):
        ArchiveManifest("resnet20", 10, "../w.th", SHA)
    with pytest.raises(ValueError, match="class_names lists 3 names but the model has 10 classes"):
        ArchiveManifest("resnet20", 10, "w.th", SHA, GuardConfig(class_names=("a", "b", "c")))
    with pytest.raises(ValueError, match="unsupported archive manifest version 7"):
        ArchiveManifest.from_dict({**manifest.to_dict(), "version": 7})
    assert GuardConfig().names_for(3) == ("0", "1", "2")


def test_revert_monitor_slides_its_window():
    monitor = RevertMonitor(num_classes=3, window=4)
    monitor.update(torch.tensor([0, 0, 1, 2]), torch.tensor([True, False, False, True]))
    assert monitor.estimated_asr() == [0.5, 0.0, 1.0]
    monitor.update(torch.tensor([1, 1]), torch.tensor([True, True]))  # pushes out the two class-0 entries
    assert len(monitor) == 4
    assert monitor.estimated_asr() == [0.0, 2 / 3, 1.0]
    with pytest.raises(ValueError, match="out of range"):
        monitor.update(torch.tensor([3]), torch.tensor([False]))
    with pytest.raises(ValueError, match="two \\(B,\\) tensors"):
        monitor.update(torch.tensor([0, 1]), torch.tensor([True]))
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        RevertMonitor(3, 0)


def test_metrics_file_declares_exactly_the_guard_metrics():
    yaml = pytest.importorskip("yaml")
    declared = yaml.safe_load(METRICS_FILE.read_text())["model_metrics"]
    guard_metrics = {(m["name"], kind, tuple(m["dimensions"]))
                     for kind, entries in declared.items() for m in entries if m["name"].startswith("guard_")}
    assert guard_metrics == {(m.name, m.kind, m.labels) for m in METRICS}


def test_the_prometheus_client_exporter_declares_the_same_metrics():
    """Outside TorchServe the guard metrics go out through prometheus-client: same names, kinds, labels
    (TorchServe's Hostname included), one sample per emit with the handler's semantics."""
    import re

    from guard.serving.metrics import PrometheusExporter

    exporter = PrometheusExporter()
    for spec in METRICS:
        labels = [f"v{i}" for i in range(len(spec.labels))]
        exporter.emit(spec, 2.0, *labels)
        exporter.emit(spec, 3.0, *labels)
    text = exporter.text()
    assert dict(re.findall(r"^# TYPE (guard_\w+) (\w+)$", text, re.M)) == {m.name: m.kind for m in METRICS}
    for spec in METRICS:
        sample = spec.name + ("_count" if spec.kind == "histogram" else "")
        (labels, value), = re.findall(rf"^{sample}\{{(.*)\}} (\S+)$", text, re.M)
        assert sorted(re.findall(r'(\w+)="', labels)) == sorted([*spec.labels, "Hostname"])
        assert float(value) == {"counter": 5.0, "gauge": 3.0, "histogram": 2.0}[spec.kind]
    with pytest.raises(ValueError, match="expected labels"):
        exporter.emit(METRICS[0], 1.0, "only-one")


@pytest.mark.parametrize("workers, threads, expected", [(None, None, None), (1, None, "cores"), (2, None, "half"),
                                                      (64, None, 1), (2, 3, 3)])
def test_workers_divide_the_cores_unless_threads_are_given(tmp_path, workers, threads, expected):
    import os

    cores = len(os.sched_getaffinity(0))
    server = TorchServe(tmp_path, tmp_path, {"m": "m.mar"}, ServerSettings(workers=workers, threads=threads))
    want = {"cores": cores, "half": max(1, cores // 2)}.get(expected, expected)
    assert server.worker_threads == want
    if want is not None:  # what each worker process starts with
        assert server._env()["OMP_NUM_THREADS"] == str(want)


def test_config_properties_is_loopback_prometheus_and_batches_the_demo():
    props = read_properties(TS_CONFIG_FILE)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["metrics_mode"] == "prometheus"
    assert TS_CONFIG_FILE.parent / props["metrics_config"] == METRICS_FILE
    assert props.get("disable_token_authorization", "false") == "false"
    demo = json.loads(props["models"])["resnet20"]["1.0"]
    assert demo["batchSize"] > 1 and demo["maxBatchDelay"] > 0


def test_server_config_overrides_ports_batching_and_tokens(tmp_path):
    server = TorchServe(tmp_path / "run", tmp_path, {"m": "m.mar"},
                        ServerSettings(9101, 9102, 9103, 9104, 9105, token_auth=False, batch_size=4,
                                       max_batch_delay_ms=7))
    props = read_properties(server.write_config())
    assert props["inference_address"] == "http://127.0.0.1:9101"
    assert props["metrics_address"] == "http://127.0.0.1:9103"
    assert (props["grpc_inference_port"], props["grpc_management_port"]) == ("9104", "9105")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert server.inference_url("m") == "http://127.0.0.1:9101/predictions/m"
    assert Path(props["metrics_config"]).is_absolute() and Path(props["metrics_config"]).is_file()
    assert props["disable_token_authorization"] == "true"
    models = json.loads(props["models"])
    assert models["m"]["1.0"] == {"defaultVersion": True, "marName": "m.mar", "batchSize": 4, "maxBatchDelay": 7}
    assert models["resnet20"]["1.0"]["batchSize"] == 16  # entries of the base file are kept


def test_server_refuses_non_loopback_addresses_and_bad_settings(tmp_path):
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://0.0.0.0:8080\nmanagement_address=http://127.0.0.1:8081\n"
                      "metrics_address=http://127.0.0.1:8082\n")
    with pytest.raises(ValueError, match="not a loopback address"):
        TorchServe(tmp_path / "run", tmp_path, {"m": "m.mar"}, config=config).write_config()
    with pytest.raises(ValueError, match="TCP port"):
        ServerSettings(inference_port=70000)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        ServerSettings(batch_size=0)


def test_own_server_config_gets_guards_metrics_file_unless_it_names_one(tmp_path):
    config = tmp_path / "mine.properties"
    config.write_text("inference_address=http://127.0.0.1:8080\nmanagement_address=http://127.0.0.1:8081\n"
                      "metrics_address=http://127.0.0.1:8082\n")
    props = read_properties(TorchServe(tmp_path / "run", tmp_path, {"m": "m.mar"}, config=config).write_config())
    assert props["metrics_config"] == str(METRICS_FILE)
    config.write_text(config.read_text() + "metrics_config=mine.yaml\n")
    with pytest.raises(FileNotFoundError, match=f"metrics config not found: {tmp_path / 'mine.yaml'}"):
        TorchServe(tmp_path / "run", tmp_path, {"m": "m.mar"}, config=config).write_config()
