"""The storage layout KServe's TorchServe runtime serves (``storageUri`` -> ``/mnt/models``)::

    DIR/config/config.properties     # what the runtime starts TorchServe with (--ts-config)
    DIR/config/metrics.yaml          # guard's metrics, declared for TorchServe's Prometheus exporter
    DIR/model-store/NAME.mar         # guard archives (+ NAME.mar.sha256), loaded at start from model_snapshot

The runtime runs ``torchserve --start --model-store=/mnt/models/model-store
--ts-config=/mnt/models/config/config.properties`` with ``TS_SERVICE_ENVELOPE=kserve`` behind KServe's model
server on port 8080, which forwards ``/v1/models/NAME:predict`` to TorchServe's inference API on 127.0.0.1:8085.
Under that envelope a server batch is the ``instances`` of one request (TorchServe's envelope reads the first
request of a batch only), so ``batchSize`` is 1 and the batch a client sends is the batch ReScaler adapts.
The metrics API is the one address open to the pod network: Prometheus scrapes it on port 8082.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .archive import ARCHIVE_VERSION, checksum_path, verify_archive
from .predictor import WeightsMismatchError
from .resources import METRICS_FILE, TS_CONFIG_FILE
from .server import read_properties

#: where KServe's storage initializer puts the layout inside the predictor container
KSERVE_MOUNT = "/mnt/models"
#: the ports KServe's TorchServe wrapper expects (it forwards to 8085) and Prometheus scrapes (8082)
INFERENCE_PORT, METRICS_PORT = 8085, 8082
_CONFIG_KEYS = ("max_request_size", "max_response_size")


def build_kserve_layout(out_dir: str | Path, archive: str | Path, *, name: str | None = None, workers: int = 1,
                        mount: str = KSERVE_MOUNT, response_timeout_s: int = 120) -> Path:
    """Add ``archive`` (a ``guard archive`` .mar, checked against its checksum) to the KServe layout at
    ``out_dir`` as model ``name`` (default: the archive's stem), writing or updating its config.

    ``mount`` is where the layout will be mounted (``/mnt/models`` under KServe): the config names its files
    there. Returns the config path. Raises ``FileNotFoundError`` for a missing archive and ``ValueError`` for
    an archive that does not match its checksum, a bad name or worker count.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist (build it with guard archive)")
    try:
        verified = verify_archive(archive)
    except WeightsMismatchError as exc:  # changed since guard archive wrote its checksum
        raise ValueError(str(exc)) from None
    if not verified:
        raise ValueError(f"archive {archive} has no checksum file {checksum_path(archive).name}; build it with "
                         f"guard archive")
    name = archive.stem if name is None else name
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"model name: expected letters, digits, '-' or '_', got {name!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected an integer >= 1, got {workers!r}")
    out_dir = Path(out_dir)
    config_dir, store = out_dir / "config", out_dir / "model-store"
    config_dir.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    shutil.copy2(archive, store / f"{name}.mar")
    shutil.copy2(checksum_path(archive), checksum_path(store / f"{name}.mar"))
    shutil.copy2(METRICS_FILE, config_dir / "metrics.yaml")

    config = config_dir / "config.properties"
    models = json.loads(read_properties(config)["model_snapshot"])["models"] if config.is_file() else {}
    models[name] = {ARCHIVE_VERSION: {"defaultVersion": True, "marName": f"{name}.mar", "minWorkers": workers,
                                      "maxWorkers": workers, "batchSize": 1, "maxBatchDelay": 0,
                                      "responseTimeout": response_timeout_s}}
    snapshot = {"name": "startup.cfg", "modelCount": len(models), "models": models}
    base = read_properties(TS_CONFIG_FILE)
    mount = mount.rstrip("/")
    lines = [
        "# KServe TorchServe runtime configuration written by guard archive --kserve (guard.serving.kserve).",
        "# TorchServe's APIs stay on loopback: KServe's model server in the same container forwards to 8085.",
        f"inference_address=http://127.0.0.1:{INFERENCE_PORT}",
        f"management_address=http://127.0.0.1:{INFERENCE_PORT}",
        "grpc_inference_address=127.0.0.1",
        "grpc_inference_port=7070",
        "grpc_management_address=127.0.0.1",
        "grpc_management_port=7071",
        "# Prometheus scrapes the guard metrics from the pod (prometheus.io/port: 8082 on the InferenceService).",
        f"metrics_address=http://0.0.0.0:{METRICS_PORT}",
        "metrics_mode=prometheus",
        "enable_metrics_api=true",
        f"metrics_config={mount}/config/metrics.yaml",
        f"model_store={mount}/model-store",
        "# The runtime passes TS_SERVICE_ENVELOPE=kserve (or kservev2) through the environment.",
        "enable_envvars_config=true",
        "# Authorization is the cluster's (ingress, mesh); KServe's model server calls TorchServe without a token.",
        "disable_token_authorization=true",
        "enable_model_api=false",
        "install_py_dep_per_model=false",
        *(f"{key}={base[key]}" for key in _CONFIG_KEYS if key in base),
        f"model_snapshot={json.dumps(snapshot)}",
    ]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config
