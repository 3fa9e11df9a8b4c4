"""Archives: built with torch-model-archiver, loaded with a SHA-256 check, classifying like ReScaler itself."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from guard import ReScaler, ReScalerConfig, data, models
from guard.cli import main
from guard.serving import (MANIFEST_NAME, GuardConfig, GuardedClassifier, WeightsMismatchError, build_archive,
                           read_manifest, sha256_file)
from guard.serving.demo import build_demo_archive

pytest.importorskip("model_archiver", reason="archives need torch-model-archiver (the serve extra)")

NAMES = tuple("abcdefghij")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    model = models.create("tiny_resnet")
    return models.save_weights(model, tmp_path_factory.mktemp("weights") / "tiny.pt")


def _unpack(archive, into):
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(into)
    return into


def test_archive_carries_manifest_weights_and_handler(tiny_weights, tmp_path):
    config = GuardConfig(rescaler=ReScalerConfig(eps=0.1), class_names=NAMES, top_k=2)
    archive = build_archive("tiny_resnet", tiny_weights, tmp_path / "store" / "tiny.mar", config)
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        mar_manifest = zf.read("MAR-INF/MANIFEST.json").decode()
    assert {MANIFEST_NAME, "tiny.pt", "guard_handler.py"} <= names
    assert '"modelName": "tiny"' in mar_manifest and '"handler": "guard_handler.py"' in mar_manifest
    manifest = read_manifest(archive)
    assert manifest.model == "tiny_resnet" and manifest.guard == config
    assert manifest.weights_sha256 == sha256_file(tiny_weights)
    with pytest.raises(FileExistsError, match="--force"):
        build_archive("tiny_resnet", tiny_weights, archive, config)
    assert build_archive("tiny_resnet", tiny_weights, archive, config, force=True) == archive


def test_archive_refuses_weights_that_do_not_fit(tiny_weights, tmp_path):
    with pytest.raises(ValueError, match="does not fit model 'resnet20'"):
        build_archive("resnet20", tiny_weights, tmp_path / "r.mar")
    with pytest.raises(ValueError, match="unknown model 'resnet7'"):
        build_archive("resnet7", tiny_weights, tmp_path / "r.mar")
    with pytest.raises(ValueError, match="DIR/NAME.mar"):
        build_archive("tiny_resnet", tiny_weights, tmp_path / "r.zip")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_archive("tiny_resnet", tmp_path / "none.pt", tmp_path / "r.mar")
    assert not list(tmp_path.glob("*.mar"))


def test_loaded_classifier_checks_sha256(tiny_weights, tmp_path):
    archive = build_archive("tiny_resnet", tiny_weights, tmp_path / "tiny.mar", GuardConfig(class_names=NAMES))
    model_dir = _unpack(archive, tmp_path / "unpacked")
    assert GuardedClassifier.from_archive_dir(model_dir).class_names == NAMES
    state = torch.load(model_dir / "tiny.pt", weights_only=True)
    state["state_dict"]["linear.bias"] += 1.0  # a tampered checkpoint that still loads fine
    torch.save(state, model_dir / "tiny.pt")
    with pytest.raises(WeightsMismatchError, match="refusing to load") as info:
        GuardedClassifier.from_archive_dir(model_dir)
    assert read_manifest(archive).weights_sha256 in str(info.value)


def test_classify_is_rescaler_adapt_and_describe_reports_it(tiny_weights):
    model = models.create("tiny_resnet", weights=tiny_weights)
    config = GuardConfig(rescaler=ReScalerConfig(eps=0.3, alpha=5.0), class_names=NAMES, top_k=3)
    classifier = GuardedClassifier(model, config)
    x = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    result = classifier.classify(x)
    expected = ReScaler(models.create("tiny_resnet", weights=tiny_weights), eps=0.3, alpha=5.0).adapt(x)
    assert torch.allclose(result.logits, expected.logits, atol=1e-5)
    assert torch.equal(result.original_labels, expected.original_labels)
    answers = classifier.describe(result)
    probs, original_probs = result.logits.softmax(1), result.original_logits.softmax(1)
    for i, answer in enumerate(answers):
        assert set(answer) == {"label", "class", "probabilities", "original_label", "reverted", "anomaly_score"}
        assert answer["label"] == int(result.labels[i]) and answer["class"] == NAMES[answer["label"]]
        assert answer["original_label"] == int(result.original_labels[i])
        assert answer["reverted"] == (answer["label"] != answer["original_label"])
        top = list(answer["probabilities"].items())
        assert len(top) == 3 and top[0][0] == answer["class"]
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
        y0 = answer["original_label"]
        assert answer["anomaly_score"] == pytest.approx(float(original_probs[i, y0] - probs[i, y0]), abs=1e-6)


def test_disabled_guard_is_the_plain_model(tiny_weights):
    model = models.create("tiny_resnet", weights=tiny_weights)
    classifier = GuardedClassifier(model, GuardConfig(enabled=False))
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    result = classifier.classify(x)
    with torch.no_grad():
        assert torch.allclose(result.logits, model(x))
    assert not result.reverted.any() and result.scalars.shape == (5, 0)
    assert all(a["anomaly_score"] == 0.0 for a in classifier.describe(result))
    with pytest.raises(TypeError, match="GuardModel"):
        GuardedClassifier(torch.nn.Linear(2, 2), GuardConfig())


def test_demo_archive_packs_the_pretrained_resnet20(data_root, resnet20_weights, tmp_path):
    archive = build_demo_archive(tmp_path, data_root)
    manifest = read_manifest(archive)
    assert archive == tmp_path / "resnet20.mar" and manifest.model == "resnet20"
    assert manifest.weights_sha256 == sha256_file(resnet20_weights)
    assert manifest.guard.class_names == data.CIFAR10_CLASSES and manifest.guard.enabled
    built = archive.stat().st_mtime_ns
    assert build_demo_archive(tmp_path, data_root) == archive and archive.stat().st_mtime_ns == built


def test_guard_archive_command(tiny_weights, tmp_path, capsys):
    config = tmp_path / "guard.json"
    config.write_text(json.dumps({"rescaler": {"eps": 0.05}, "top_k": 5, "class_names": list(NAMES)}))
    out = tmp_path / "store" / "tiny.mar"
    args = ["archive", "--model", "tiny_resnet", "--weights", str(tiny_weights), "--out", str(out)]
    assert main([*args, "--guard-config", str(config), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["archive"] == str(out) and printed["guard"]["rescaler"]["eps"] == 0.05
    assert read_manifest(out).guard.top_k == 5
    assert main(args) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    config.write_text(json.dumps({"rescaler": {"eps": 5}}))
    assert main([*args, "--force", "--guard-config", str(config)]) == 2
    assert "eps must be a number in (0, 1], got 5" in capsys.readouterr().err


# ------------------------------------------------------------------ scan report and repaired model inside
def _report(tmp_path, scores=None, flagged=0):
    from guard.detect import ScanReport

    scores = {c: 0.1 * c for c in range(10)} if scores is None else scores
    return ScanReport("cnc", flagged is not None, flagged, scores, 0.5).save(tmp_path / "report.json")


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    model = models.create("tiny_resnet", generator=torch.Generator().manual_seed(7))
    return models.save_weights(model, tmp_path_factory.mktemp("repaired") / "repaired.pt")


def test_archive_carries_scan_and_repaired_model_and_checks_them(tiny_weights, other_weights, tmp_path):
    report = _report(tmp_path)
    archive = build_archive("tiny_resnet", tiny_weights, tmp_path / "s.mar", GuardConfig(class_names=NAMES),
                            scan=report, repaired=other_weights, repaired_method="pivotal")
    manifest = read_manifest(archive)
    assert (manifest.scan_file, manifest.repaired_file) == ("guard-scan.json", "guard-repaired.pt")
    assert (manifest.scan_method, manifest.repaired_method, manifest.weights_method) == ("cnc", "pivotal", None)
    assert manifest.scan_sha256 == sha256_file(report) and manifest.repaired_sha256 == sha256_file(other_weights)
    model_dir = _unpack(archive, tmp_path / "unpacked")
    classifier = GuardedClassifier.from_archive_dir(model_dir)
    assert classifier.scorer.class_gauges() == pytest.approx({c: 0.1 * c for c in range(10)})

    # the per-request score is the repaired model's verdict on the served model's undefended logits
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    result = classifier.classify(x)
    scores = classifier.score(x, result)
    repaired = models.create("tiny_resnet", weights=other_weights).eval()
    with torch.no_grad():
        want = 0.5 * (result.original_logits.softmax(1) - repaired(x).softmax(1)).abs().sum(1)
        assert torch.equal(scores.repaired_label, repaired(x).argmax(1))
    assert torch.allclose(scores.score, want, atol=1e-5)
    answers = classifier.describe(result, scores)
    assert all({"backdoor_score", "repaired_label", "disagree"} <= set(a) for a in answers)
    assert [a["disagree"] for a in answers] == (scores.repaired_label != result.original_labels).tolist()

    (model_dir / "guard-repaired.pt").write_bytes((model_dir / "guard-repaired.pt").read_bytes() + b"\0")
    with pytest.raises(WeightsMismatchError, match="repaired weights guard-repaired.pt has SHA-256"):
        GuardedClassifier.from_archive_dir(model_dir)


def test_archive_without_repaired_model_scores_nothing(tiny_weights, tmp_path):
    archive = build_archive("tiny_resnet", tiny_weights, tmp_path / "s.mar", scan=_report(tmp_path, flagged=None))
    classifier = GuardedClassifier.from_archive_dir(_unpack(archive, tmp_path / "unpacked"))
    assert classifier.scorer.report.backdoored is False and classifier.scorer.repaired is None
    x = torch.rand(2, 3, 16, 16)
    assert classifier.score(x, classifier.classify(x)) is None


def test_archive_refuses_a_scan_or_repair_that_does_not_fit(tiny_weights, other_weights, tmp_path):
    with pytest.raises(ValueError, match=r"scores classes \[10, 11\], but the model has 10 classes"):
        build_archive("tiny_resnet", tiny_weights, tmp_path / "s.mar", scan=_report(tmp_path, {0: 0.1, 10: 1.0,
                                                                                             11: 0.0}))
    resnet20 = models.save_weights(models.create("tiny_preact_resnet"), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="repaired weights .*other.pt: .*does not fit model 'tiny_resnet'"):
        build_archive("tiny_resnet", tiny_weights, tmp_path / "s.mar", repaired=resnet20)
    with pytest.raises(FileNotFoundError, match="scan report file not found"):
        build_archive("tiny_resnet", tiny_weights, tmp_path / "s.mar", scan=tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"scores": {}}')
    with pytest.raises(ValueError, match="scan report lacks the keys"):
        build_archive("tiny_resnet", tiny_weights, tmp_path / "s.mar", scan=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="repaired_method must be a registered defense"):
        build_archive("tiny_resnet", tiny_weights, tmp_path / "s.mar", repaired=other_weights,
                      repaired_method="no-such-defense")
    with pytest.raises(ValueError, match="given without repaired weights"):
        build_archive("tiny_resnet", tiny_weights, tmp_path / "s.mar", repaired_method="pivotal")
    assert not list(tmp_path.glob("*.mar"))


def test_guard_archive_command_with_scan_and_repaired(tiny_weights, other_weights, tmp_path, capsys):
    out = tmp_path / "s.mar"
    args = ["archive", "--model", "tiny_resnet", "--weights", str(tiny_weights), "--out", str(out)]
    # the method comes from the summary `guard repair` writes next to its weights
    repaired = tmp_path / "repaired.pt"
    repaired.write_bytes(other_weights.read_bytes())
    repaired.with_name("repaired.pt.json").write_text(json.dumps({"method": "nc"}))
    assert main([*args, "--scan", str(_report(tmp_path)), "--repaired", str(repaired)]) == 0
    assert "with scan report, with repaired model" in capsys.readouterr().out
    assert read_manifest(out).repaired_method == "nc"
    assert main([*args, "--force", "--scan", str(tmp_path / "missing.json")]) == 2
    assert "scan report file not found" in capsys.readouterr().err
