"""Tampered archives: every file an archive carries changed after ``guard archive`` wrote it — the weights, the
guard config in the manifest, the scan report, the repaired model, the trigger detector — and two archives an
attacker made consistent by hand (a pickled object as the weights, a manifest naming a file outside the archive).
Each is refused at load naming the file. Behind a real TorchServe (one server, the untouched archive beside all
seven tampered ones) each refusal is logged, the server reports the model as not ready, its
endpoint answers an error instead of a prediction, and the untouched model serves. A changed archive whose
checksum file (``NAME.mar.sha256``) no longer matches is not served at all."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import zipfile

import pytest
import torch
from PIL import Image

from guard.detect import ScanReport, TriggerDetector
from guard.models import save_weights
from guard.serving import (MANIFEST_NAME, ArchiveManifest, GuardConfig, GuardedClassifier, ServerError,
                           ServerSettings, TorchServe, WeightsMismatchError, build_archive, checksum_path, free_ports,
                           verify_archive)
from outcomes import SEED
from test_repair import planted

requests = pytest.importorskip("requests")
pytestmark = pytest.mark.serve

#: tampered archive -> what the refusal must name
REFUSALS = {"weights": "suspect.pt has SHA-256", "config": f"{MANIFEST_NAME} was changed after archiving",
            "scan": "guard-scan.json has SHA-256", "repaired": "guard-repaired.pt has SHA-256",
            "detector": "guard-detector.safetensors has SHA-256", "pickle": "weights_only",
            "outside": "must be a bare file name inside the archive"}


def _rewrite(source, target, change) -> None:
    """Copy the archive ``source`` to ``target`` with ``change(name, payload) -> payload`` applied to each file."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, change(item.filename, zin.read(item)))


def _manifest_edit(edit):
    """A change that applies ``edit`` to the manifest's dict."""
    def change(name, payload):
        if name != MANIFEST_NAME:
            return payload
        data = json.loads(payload)
        edit(data)
        return json.dumps(data).encode()
    return change


def _append(file_name):
    return lambda name, payload: payload + b"\0" if name == file_name else payload


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tamper")
    p = planted()
    detector = TriggerDetector.calibrate(p.backdoored, p.test_set.images[:200].float() / 255,
                                         generator=torch.Generator().manual_seed(SEED))
    report = ScanReport("cnc", True, 0, {c: 0.1 * c for c in range(4)}, 0.5).save(tmp / "report.json")
    store = tmp / "store"
    good = build_archive("tiny_resnet", save_weights(p.backdoored, tmp / "suspect.pt"), store / "good.mar",
                         GuardConfig(), num_classes=4, scan=report, repaired=save_weights(p.clean, tmp / "rep.pt"),
                         detector=detector.save(tmp / "detector.safetensors"))
    _rewrite(good, store / "weights.mar", _append("suspect.pt"))
    _rewrite(good, store / "config.mar", _manifest_edit(lambda d: d["guard"]["rescaler"].update(eps=0.5)))
    _rewrite(good, store / "scan.mar", _append("guard-scan.json"))
    _rewrite(good, store / "repaired.mar", _append("guard-repaired.pt"))
    _rewrite(good, store / "detector.mar", _append("guard-detector.safetensors"))

    # forgeries made consistent: the file changed and every checksum in the manifest recomputed
    pickled = io.BytesIO()
    torch.save({"conv1.weight": argparse.Namespace(payload="not a tensor")}, pickled)

    def resign(data, **changes):
        data.update(changes)
        manifest = ArchiveManifest.from_dict({k: v for k, v in data.items() if k != "manifest_sha256"})
        data["manifest_sha256"] = manifest.digest()

    sha = hashlib.sha256(pickled.getvalue()).hexdigest()

    def forge_pickle(name, payload):
        if name == "suspect.pt":
            return pickled.getvalue()
        return _manifest_edit(lambda d: resign(d, weights_sha256=sha))(name, payload)
    _rewrite(good, store / "pickle.mar", forge_pickle)

    def point_outside(data):
        data["weights_file"] = "../suspect.pt"
        data["manifest_sha256"] = "0" * 64  # the manifest does not even parse, whatever its digest
    _rewrite(good, store / "outside.mar", _manifest_edit(point_outside))
    return store


def test_a_changed_archive_is_not_served_when_its_checksum_file_disagrees(store, tmp_path):
    assert verify_archive(store / "good.mar") is True
    assert verify_archive(store / "weights.mar") is False  # no checksum file: served with a warning
    bad_store = tmp_path / "store"
    bad_store.mkdir()
    shutil.copy(store / "config.mar", bad_store / "good.mar")
    shutil.copy(checksum_path(store / "good.mar"), checksum_path(bad_store / "good.mar"))
    with pytest.raises(WeightsMismatchError, match=r"good.mar has SHA-256 \w+, but good.mar.sha256 records"):
        verify_archive(bad_store / "good.mar")
    server = TorchServe(tmp_path / "run", bad_store, {"good": "good.mar"}, ServerSettings(*free_ports(5)))
    with pytest.raises(ServerError, match="model good: archive .*good.mar has SHA-256"):
        server.start(timeout=30)
    assert not (tmp_path / "run" / "server.json").exists()  # refused before TorchServe was started


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_a_tampered_archive_is_refused_at_load_naming_the_file(store, name, tmp_path):
    for archive in ("good", name):
        with zipfile.ZipFile(store / f"{archive}.mar") as zf:
            zf.extractall(tmp_path / archive)
    assert GuardedClassifier.from_archive_dir(tmp_path / "good").detector is not None
    with pytest.raises((WeightsMismatchError, ValueError), match=REFUSALS[name]):
        GuardedClassifier.from_archive_dir(tmp_path / name)


#: the tampered archives the server test loads: every one
SERVED = tuple(sorted(REFUSALS))


def test_tampered_archives_are_refused_by_the_server_and_not_served(store, tmp_path):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs a Java runtime")
    models = {name: f"{name}.mar" for name in ["good", *SERVED]}
    settings = ServerSettings(*free_ports(5), token_auth=False, batch_size=1, threads=1)
    server = TorchServe(tmp_path / "run", store, models, settings)
    server.start(timeout=240, allow_refused=True)
    try:
        assert set(server.refused) == set(SERVED)
        for name in SERVED:
            assert REFUSALS[name] in server.refused[name], (name, server.refused[name])

        image = io.BytesIO()
        Image.fromarray(planted().test_set.images[0].permute(1, 2, 0).numpy()).save(image, "PNG")
        post = lambda name: requests.post(server.inference_url(name), data=image.getvalue(),  # noqa: E731
                                          headers={"Content-Type": "image/png"}, timeout=60)
        assert post("good").status_code == 200 and "label" in post("good").json()
        for name in SERVED:
            reply = post(name)
            assert reply.status_code == 503 and "label" not in reply.text, (name, reply.status_code, reply.text)
            workers = [w for d in server.model_status(name) for w in d["workers"]]
            assert not any(w.get("status") == "READY" for w in workers), (name, workers)
    finally:
        server.stop()
