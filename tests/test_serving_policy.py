"""The endpoint policy: guard's calibrated trigger detector (guard.detect.TriggerDetector, ``guard calibrate``),
carried in the archive with its SHA-256, scoring the features of the served pass; the guard config's ``answer``
and ``on_trigger``; the estimated-ASR monitor corrected for the detector's false-positive rate. The served policy
behind a real TorchServe is in ``test_serving_policy_server.py``."""

from __future__ import annotations

import copy
import json
import zipfile

import pytest
import torch

from guard import models
from guard.cli import main
from guard.detect import (PENULTIMATE, RequestScorer, TriggerDetector, create_input_detector, feature_layers,
                          layer_features)
from guard.serving import (DETECTOR_NAME, REFUSED_STATUS, ArchiveManifest, BadRequest, GuardConfig, GuardedClassifier,
                           RevertMonitor, WeightsMismatchError, build_archive, read_manifest, sha256_file)
from outcomes import SEED, check
from test_repair import TARGET, planted

pytest.importorskip("model_archiver", reason="archives need torch-model-archiver (the serve extra)")


def images(dataset) -> torch.Tensor:
    return dataset.images.float() / 255


def suspect() -> models.GuardModel:
    """A copy of the planted backdoored model to serve (ReScaler's hooks stay on the model it wraps, and the
    planted model is shared by the test session)."""
    return copy.deepcopy(planted().backdoored)


@pytest.fixture(scope="module")
def detector() -> TriggerDetector:
    """Calibrated on the first half of the planted model's clean test images."""
    p = planted()
    return TriggerDetector.calibrate(p.backdoored, images(p.test_set)[:200], false_positive_rate=0.05,
                                     generator=torch.Generator().manual_seed(SEED))


@pytest.fixture(scope="module")
def files(tmp_path_factory, detector):
    tmp = tmp_path_factory.mktemp("policy")
    p = planted()
    return {"weights": models.save_weights(p.backdoored, tmp / "suspect.pt"),
            "repaired": models.save_weights(p.clean, tmp / "repaired.pt"),
            "detector": detector.save(tmp / "detector.safetensors"), "tmp": tmp}


def _unpack(archive, into):
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(into)
    return into


# -- the detector ------------------------------------------------------------------------------------------
def test_the_served_detector_is_the_rescaler_input_detector(detector):
    """Same Gaussians as the ``rescaler`` input detector fitted on the same images with the same folds, same scores
    from the served pass's features; one forward of the plain model gives the features ReScaler's first forward
    computes."""
    p = planted()
    clean = images(p.test_set)[:200]
    reference = create_input_detector("rescaler").fit(p.backdoored, clean,
                                                      generator=torch.Generator().manual_seed(SEED))
    assert detector.layers == feature_layers(p.backdoored) == ("net.layer1", "net.layer2", PENULTIMATE)
    for name, g in zip(detector.layers, detector.gaussians):
        ref = reference.gaussians[name]
        assert torch.allclose(g.means, ref.means, atol=1e-6)
        assert torch.allclose(g.precision, ref.precision, rtol=1e-4, atol=1e-6)
        assert g.log_mean == pytest.approx(ref.log_mean, abs=1e-6) and g.log_std == pytest.approx(ref.log_std, abs=1e-6)
    classifier = GuardedClassifier(suspect(), GuardConfig(), detector=detector)
    x = torch.cat([images(p.test_set)[200:210], images(p.triggered)[:10]])
    result, features = classifier.observe(x)
    with torch.no_grad(), layer_features(p.backdoored, detector.layers) as plain:
        p.backdoored(x)
    assert not any(m._forward_hooks for m in p.backdoored.modules()), "a feature hook was left behind"
    assert set(features) == set(detector.layers)
    assert all(torch.allclose(features[n], plain[n][0], atol=1e-5) for n in detector.layers)
    trigger = classifier.detect(result, features, x)
    assert torch.allclose(trigger.score, reference.score(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(trigger.flagged, trigger.score > detector.threshold)
    # batched == one by one
    single = torch.cat([classifier.detect(*classifier.observe(x[i:i + 1]), x[i:i + 1]).score for i in range(len(x))])
    assert torch.allclose(single, trigger.score, rtol=1e-5, atol=1e-6)


def test_an_amplified_detector_serves_the_amplified_rescaler_score(detector, tmp_path):
    """``amplified=1``: the served score equals the ``rescaler`` input detector's with ``amplified=1`` (one more
    forward pass per copy), survives a save and load, is the same batched and one by one, and needs the copies'
    consistency; the served model is left as it was."""
    p = planted()
    clean = images(p.test_set)[:200]
    joined = TriggerDetector.calibrate(p.backdoored, clean, false_positive_rate=0.05, amplified=1,
                                       generator=torch.Generator().manual_seed(SEED))
    assert all(torch.equal(a.means, b.means) for a, b in zip(joined.gaussians, detector.gaussians))
    assert joined.amplification is not None and len(joined.amplification.depths) == 1
    loaded = TriggerDetector.load(joined.save(tmp_path / "joined.safetensors"))
    assert loaded.amplification == joined.amplification and loaded.threshold == joined.threshold
    reference = create_input_detector("rescaler", amplified=1).fit(p.backdoored, clean,
                                                                   generator=torch.Generator().manual_seed(SEED))
    served = suspect()
    before = {k: v.clone() for k, v in served.state_dict().items()}
    classifier = GuardedClassifier(served, GuardConfig(), detector=loaded)
    x = torch.cat([images(p.test_set)[200:210], images(p.triggered)[:10]])
    trigger = classifier.detect(*classifier.observe(x), x)
    assert torch.allclose(trigger.score, reference.score(x), rtol=1e-5, atol=1e-5)
    single = torch.cat([classifier.detect(*classifier.observe(x[i:i + 1]), x[i:i + 1]).score for i in range(len(x))])
    assert torch.allclose(single, trigger.score, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in served.state_dict().items())
    result, features = classifier.observe(x)
    with pytest.raises(ValueError, match=r"joins the amplified copies' consistency: expected a \(20,\) tensor"):
        loaded.score(features, result.original_labels)
    with pytest.raises(ValueError, match="amplified must be an int >= 0, got -1"):
        TriggerDetector.calibrate(p.backdoored, clean, amplified=-1)


def test_calibration_is_deterministic_and_the_threshold_falls_with_the_rate(detector):
    p = planted()
    clean = images(p.test_set)[:200]
    again = TriggerDetector.calibrate(p.backdoored, clean, false_positive_rate=0.05,
                                      generator=torch.Generator().manual_seed(SEED))
    assert again.threshold == detector.threshold and again.calibration_images == 200
    strict = TriggerDetector.calibrate(p.backdoored, clean, false_positive_rate=0.01,
                                       generator=torch.Generator().manual_seed(SEED))
    loose = TriggerDetector.calibrate(p.backdoored, clean, false_positive_rate=0.2,
                                      generator=torch.Generator().manual_seed(SEED))
    assert loose.threshold < detector.threshold < strict.threshold
    assert not any(m._forward_hooks for m in p.backdoored.modules()), "calibration left a hook behind"
    # the served Gaussians use every image, whatever the rate
    assert all(torch.equal(a.means, b.means) for a, b in zip(strict.gaussians, detector.gaussians))
    alone = TriggerDetector.calibrate(p.backdoored, clean, feature="penultimate")
    assert alone.layers == (PENULTIMATE,) and alone.feature_dims == {PENULTIMATE: p.backdoored.classifier.in_features}


def test_the_feature_hooks_go_after_an_injected_failure():
    model = suspect()
    layers = feature_layers(model)
    with pytest.raises(RuntimeError, match="injected"):
        with layer_features(model, layers) as captured:
            model(torch.rand(2, 3, 16, 16))
            raise RuntimeError("injected")
    assert captured[PENULTIMATE][0].shape == (2, model.classifier.in_features)
    assert all(captured[n][0].dtype == torch.float64 and captured[n][0].shape[0] == 2 for n in layers)
    # a stage contributes the mean and the standard deviation of each of its channels
    assert captured["net.layer1"][0].shape[1] == 2 * model.get_submodule("net.layer1")[-1].conv2.out_channels
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(AttributeError):
        with layer_features(model, ("net.layer1", "net.nowhere")):
            pass
    assert not any(m._forward_hooks for m in model.modules()), "a hook stayed after a failed registration"


def test_calibration_refuses_too_few_images_of_a_class_and_bad_input():
    p = planted()
    few = images(p.test_set)[:12]
    with pytest.raises(ValueError, match=r"at least 5 clean images predicted as each class"):
        TriggerDetector.calibrate(p.backdoored, few)
    with pytest.raises(ValueError, match="folds must be an int >= 2"):
        TriggerDetector.calibrate(p.backdoored, images(p.test_set), folds=1)
    with pytest.raises(TypeError, match="floating-point"):
        TriggerDetector.calibrate(p.backdoored, p.test_set.images)
    with pytest.raises(TypeError, match="GuardModel"):
        TriggerDetector.calibrate(torch.nn.Linear(2, 2), images(p.test_set))


def test_detector_file_round_trips_and_foreign_files_are_refused(detector, tmp_path):
    loaded = TriggerDetector.load(detector.save(tmp_path / "d.safetensors"))
    assert all(torch.equal(a.means, b.means) and torch.equal(a.precision, b.precision)
               for a, b in zip(loaded.gaussians, detector.gaussians))
    assert loaded.metadata() == detector.metadata()
    weights = models.save_weights(models.create("tiny_resnet", num_classes=4), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="is not a guard trigger detector"):
        TriggerDetector.load(weights)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        TriggerDetector.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="trigger detector file not found"):
        TriggerDetector.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="calibrated for 4 classes"):
        detector.check_model(models.create("tiny_resnet", num_classes=10))
    labels = torch.zeros(3, dtype=torch.long)
    wrong = {n: torch.zeros(3, d + (n == PENULTIMATE)) for n, d in detector.feature_dims.items()}
    with pytest.raises(ValueError, match=r"features\['penultimate'\] must be \(3, "):
        detector.score(wrong, labels)
    with pytest.raises(ValueError, match="features must be a dict of layers"):
        detector.score({PENULTIMATE: wrong[PENULTIMATE]}, labels)
    with pytest.raises(ValueError, match="false_positive_rate must be in"):
        TriggerDetector(detector.layers, detector.gaussians, 1.0, 1.5, 10)


# -- the policy --------------------------------------------------------------------------------------------
def test_policy_values_and_what_each_needs_are_checked(detector):
    with pytest.raises(ValueError, match=r"on_trigger must be one of \('flag', 'refuse'\), got 'drop'"):
        GuardConfig(on_trigger="drop")
    with pytest.raises(ValueError, match=r"answer must be one of"):
        GuardConfig.from_dict({"answer": "plain"})
    with pytest.raises(ValueError, match="on_trigger='refuse' needs a trigger detector"):
        GuardedClassifier(suspect(), GuardConfig(on_trigger="refuse"))
    with pytest.raises(ValueError, match="answer='repaired' needs a repaired model"):
        GuardedClassifier(suspect(), GuardConfig(answer="repaired"), detector=detector)
    base = {"model": "tiny_resnet", "num_classes": 4, "weights_file": "w.pt", "weights_sha256": "0" * 64}
    with pytest.raises(ValueError, match="the archive has no trigger detector"):
        ArchiveManifest.from_dict({**base, "guard": {"on_trigger": "refuse"}})
    with pytest.raises(ValueError, match="the archive has no repaired model"):
        ArchiveManifest.from_dict({**base, "guard": {"answer": "repaired"}})
    with pytest.raises(ValueError, match="detector_file and detector_sha256 go together"):
        ArchiveManifest.from_dict({**base, "detector_file": DETECTOR_NAME})


@pytest.mark.outcome
def test_refuse_answers_flagged_inputs_with_a_422_and_leaves_batch_mates_alone(detector):
    p = planted()
    x = torch.cat([images(p.test_set)[200:216], images(p.triggered)[p.triggered.labels != TARGET][:16]])
    flagging = GuardedClassifier(suspect(), GuardConfig(), detector=detector)
    refusing = GuardedClassifier(suspect(), GuardConfig(on_trigger="refuse"), detector=detector)
    result, features = flagging.observe(x)
    trigger = flagging.detect(result, features, x)
    flagged = flagging.describe(result, trigger=trigger)
    refused = refusing.describe(result, trigger=trigger)
    check("triggered inputs flagged", int(trigger.flagged[16:].sum()), low=12)
    check("clean inputs flagged", int(trigger.flagged[:16].sum()), high=5)
    for i, (answer, other) in enumerate(zip(flagged, refused)):
        assert answer["flagged"] == bool(trigger.flagged[i])
        assert answer["trigger_score"] == pytest.approx(float(trigger.score[i]))
        if answer["flagged"]:
            assert isinstance(other, BadRequest) and other.status == REFUSED_STATUS == 422
            body = other.to_dict()
            assert body["type"] == "TriggerDetected" and body["threshold"] == detector.threshold
            assert body["trigger_score"] == answer["trigger_score"] and "above its threshold" in body["message"]
        else:
            assert other == answer
    # no detector: no trigger fields
    assert "flagged" not in GuardedClassifier(suspect(), GuardConfig()).describe(result)[0]


def test_answer_repaired_serves_the_repaired_models_label():
    p = planted()
    scorer = RequestScorer(p.clean)
    classifier = GuardedClassifier(suspect(), GuardConfig(answer="repaired", top_k=2), scorer)
    x = images(p.triggered)[:12]
    result = classifier.classify(x)
    answers = classifier.describe(result, classifier.score(x, result))
    with torch.no_grad():
        repaired = p.clean(x).softmax(1)
    for i, answer in enumerate(answers):
        assert answer["label"] == answer["repaired_label"] == int(repaired[i].argmax())
        assert list(answer["probabilities"].values())[0] == pytest.approx(float(repaired[i].max()), abs=1e-6)
        assert answer["reverted"] == (answer["label"] != answer["original_label"])
    with pytest.raises(ValueError, match="needs the repaired model's scores"):
        classifier.describe(result)


def test_the_monitor_corrects_flags_for_the_false_positive_rate():
    monitor = RevertMonitor(num_classes=2, window=100, base_rate=0.2)
    labels = torch.tensor([0] * 10 + [1] * 10)
    flags = torch.tensor([True] * 2 + [False] * 8 + [True] * 6 + [False] * 4)
    monitor.update(labels, flags)
    # class 0 flagged at the base rate: no attack; class 1 at 0.6: (0.6 - 0.2) / 0.8 = 0.5
    assert monitor.estimated_asr() == pytest.approx([0.0, 0.5])
    monitor.update(torch.tensor([0]), torch.tensor([False]))  # below the base rate clips at 0
    assert monitor.estimated_asr()[0] == 0.0
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="base_rate must be a number in"):
            RevertMonitor(2, 10, bad)


# -- the archive and the command ---------------------------------------------------------------------------
def test_archive_carries_the_detector_and_refuses_a_tampered_one(files, detector, tmp_path):
    archive = build_archive("tiny_resnet", files["weights"], tmp_path / "s.mar", GuardConfig(on_trigger="refuse"),
                            num_classes=4, detector=files["detector"])
    manifest = read_manifest(archive)
    assert (manifest.detector_file, manifest.detector_sha256) == (DETECTOR_NAME, sha256_file(files["detector"]))
    assert manifest.version == 3 and manifest.guard.on_trigger == "refuse"
    model_dir = _unpack(archive, tmp_path / "unpacked")
    classifier = GuardedClassifier.from_archive_dir(model_dir)
    assert classifier.detector.threshold == detector.threshold
    (model_dir / DETECTOR_NAME).write_bytes((model_dir / DETECTOR_NAME).read_bytes() + b"\0")
    with pytest.raises(WeightsMismatchError, match=f"trigger detector {DETECTOR_NAME} has SHA-256"):
        GuardedClassifier.from_archive_dir(model_dir)
    with pytest.raises(ValueError, match="the archive has no trigger detector"):
        build_archive("tiny_resnet", files["weights"], tmp_path / "t.mar", GuardConfig(on_trigger="refuse"),
                      num_classes=4)
    other = models.save_weights(models.create("tiny_resnet"), tmp_path / "ten.pt")
    with pytest.raises(ValueError, match="calibrated for 4 classes"):
        build_archive("tiny_resnet", other, tmp_path / "u.mar", detector=files["detector"])


def test_guard_calibrate_writes_a_detector_the_archive_takes(data_root, resnet20_weights, tmp_path, capsys):
    out = tmp_path / "detector.safetensors"
    assert main(["calibrate", "--model", "resnet20", "--weights", str(resnet20_weights), "--data-dir",
                 str(data_root), "--limit", "300", "--false-positive-rate", "0.1", "--out", str(out),
                 "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    loaded = TriggerDetector.load(out)
    assert summary["threshold"] == loaded.threshold and summary["calibration_images"] == 300
    assert (loaded.num_classes, loaded.feature_dims["penultimate"], loaded.false_positive_rate) == (10, 64, 0.1)
    assert summary["layers"] == ["net.layer1", "net.layer2", "net.layer3", "penultimate"]
    assert summary["amplification"] is None and loaded.amplification is None
    joined = tmp_path / "joined.safetensors"
    assert main(["calibrate", "--model", "resnet20", "--weights", str(resnet20_weights), "--data-dir",
                 str(data_root), "--limit", "300", "--amplified", "2", "--out", str(joined), "--device", "cpu",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["amplification"]["depths"]) == 2
    assert TriggerDetector.load(joined).amplification.depths == tuple(summary["amplification"]["depths"])
    assert main(["calibrate", "--model", "resnet20", "--weights", str(resnet20_weights), "--data-dir",
                 str(data_root), "--out", str(tmp_path / "d.pt")]) == 2
    assert "--out must end in .safetensors" in capsys.readouterr().err
    assert main(["calibrate", "--model", "resnet20", "--weights", str(resnet20_weights), "--data-dir",
                 str(data_root), "--amplified", "-1", "--out", str(joined)]) == 2
    assert "--amplified must be >= 0, got -1" in capsys.readouterr().err
