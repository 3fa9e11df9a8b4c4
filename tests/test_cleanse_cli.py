"""``guard cleanse`` end to end on a user's ImageFolder: ``guard poison`` builds the suspect set and its record,
``guard cleanse`` rebuilds it from the record, scores the removal and retrains; ``guard archive --scan`` packs the
cleansing verdict and the handler exports it as gauges."""

from __future__ import annotations

import json
import logging
import re
import zipfile

import pytest
import torch
from PIL import Image

from guard.cleanse import CleanseResult
from guard.cli import main
from guard.data import load_dataset
from guard.metrics import cleansing_rates
from guard.models import create
from outcomes import SEED, check
from test_cleanse import templates

TARGET = 0


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory):
    """A 1000-image ImageFolder of tiny templates, poisoned and trained on by ``guard poison``."""
    tmp = tmp_path_factory.mktemp("cleanse_cli")
    data = templates(1000, 0)
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        folder = tmp / "data" / data.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    weights = tmp / "poisoned.pt"
    assert main(["poison", "--attack", "badnets", "--attack-opt", f"target={TARGET}", "--attack-opt", "budget=0.08",
                 "--attack-opt", "patch_size=5", "--model", "tiny_resnet", "--dataset", "imagefolder",
                 "--data-dir", str(tmp / "data"), "--eval-split", "train", "--epochs", "5", "--lr", "0.05",
                 "--batch-size", "64", "--no-augment", "--out", str(weights), "--no-progress"]) == 0
    return {"tmp": tmp, "data": tmp / "data", "weights": weights, "record": tmp / "poisoned.pt.json"}


def _cleanse(run, *extra, method="ac"):
    return ["cleanse", "--method", method, "--model", "tiny_resnet", "--weights", str(run["weights"]),
            "--dataset", "imagefolder", "--data-dir", str(run["data"]), "--no-progress", *extra]


def test_cleanse_rebuilds_the_record_scores_the_removal_and_retrains(poisoned_run, capsys):
    run = poisoned_run
    out = run["tmp"] / "ac.json"
    clean_model = run["tmp"] / "clean.pt"
    assert main(_cleanse(run, "--threshold", "0.5", "--attack-record", str(run["record"]), "--out", str(out),
                         "--retrain", "--epochs", "1", "--lr", "0.05", "--eval-split", "train",
                         "--out-model", str(clean_model))) == 0
    printed = capsys.readouterr().out
    assert "against the record (badnets, target 0): TPR" in printed and "retrained on" in printed
    report = json.loads(out.read_text())
    record = json.loads(run["record"].read_text())
    suspect = load_dataset("imagefolder", run["data"], image_size=16)
    labels = suspect.labels.clone()
    labels[record["indices"]] = TARGET
    tpr, fpr = cleansing_rates(torch.tensor(report["removed"]), torch.tensor(record["indices"]), labels, TARGET)
    assert report["attack"]["tpr"] == tpr and report["attack"]["fpr"] == fpr
    assert report["attack"]["num_poisons"] == 80 and report["images"] == 1000
    retrained = report["retrained"]
    assert retrained["train_images"] == 1000 - report["num_removed"] and retrained["epochs"] == 1
    assert {"cda", "asr", "asr_nontarget"} <= set(retrained)
    create("tiny_resnet", num_classes=5, weights=clean_model)  # the retrained weights load
    assert CleanseResult.load(out).method == "ac"


def test_cleanse_refuses_bad_flags_and_records(poisoned_run, capsys):
    run = poisoned_run
    out = str(run["tmp"] / "bad.json")
    record = json.loads(run["record"].read_text())
    cases = [
        (_cleanse(run, "--eps", "0.1", "--out", out), "--eps applies to --method ss, not ac"),
        (_cleanse(run, "--retrain", "--out", out), "--retrain needs --epochs N and --out-model PATH"),
        (_cleanse(run, "--epochs", "2", "--out", out), "apply with --retrain only"),
        (_cleanse(run, "--threshold", "2", "--out", out), "silhouette_threshold must be a number in [-1, 1)"),
        (_cleanse(run, "--attack-record", str(run["record"]), "--limit", "10", "--out", out),
         "made on 1000 images, got --limit 10"),
    ]
    tampered = run["tmp"] / "tampered.json"
    tampered.write_text(json.dumps({**record, "indices": sorted(record["indices"][1:] + [record["indices"][0] + 1])}))
    cases.append((_cleanse(run, "--attack-record", str(tampered), "--out", out),
                  "poisons other images than the record"))
    other = run["tmp"] / "other.json"
    other.write_text(json.dumps({**record, "dataset": "cifar10"}))
    cases.append((_cleanse(run, "--attack-record", str(other), "--out", out),
                  "made on --dataset cifar10, got --dataset imagefolder"))
    no_weights = [a for a in _cleanse(run, "--out", out) if a not in ("--weights", str(run["weights"]))]
    cases.append((no_weights, "--weights (a model trained on the suspect set) is required"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, message


def test_archive_serves_a_cleansing_verdict_and_refuses_one_without(poisoned_run, capsys, caplog):
    pytest.importorskip("model_archiver", reason="archives need torch-model-archiver (the serve extra)")
    pytest.importorskip("ts")
    from test_handler import GuardHandler, _context, _metric_lines

    from guard.serving import GuardedClassifier

    run = poisoned_run
    report = run["tmp"] / "verdict.json"
    assert main(_cleanse(run, "--threshold", "0.5", "--attack-record", str(run["record"]), "--out", str(report))) == 0
    result = CleanseResult.load(report)
    archive = run["tmp"] / "store" / "suspect.mar"
    base = ["archive", "--model", "tiny_resnet", "--weights", str(run["weights"]), "--num-classes", "5"]
    assert main([*base, "--scan", str(report), "--out", str(archive)]) == 0
    assert "with scan report" in capsys.readouterr().out
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(run["tmp"] / "model")
    classifier = GuardedClassifier.from_archive_dir(run["tmp"] / "model")
    served = classifier.scorer.report
    assert (served.method, served.backdoored, served.flagged_class) == ("ac", True, TARGET)
    assert classifier.scorer.class_gauges() == pytest.approx(result.class_scores)

    handler, context = GuardHandler(), _context(run["tmp"] / "model")
    with caplog.at_level(logging.INFO):
        handler.initialize(context)
    lines = _metric_lines(caplog)
    names = classifier.class_names
    gauges = {re.search(r"class:(\w+)", line).group(1): float(re.search(r":([0-9.]+)\|", line).group(1))
              for line in lines if line.startswith("[METRICS]guard_scan_score") and "method:ac" in line}
    assert gauges == pytest.approx({names[c]: s for c, s in result.class_scores.items()}, abs=1e-6)
    assert any(line.startswith("[METRICS]guard_scan_backdoored.verdict:1.0|") and "method:ac" in line
               and f"flagged_class:{names[TARGET]}" in line for line in lines)

    ss_report = run["tmp"] / "ss.json"
    assert main(_cleanse(run, "--out", str(ss_report), method="ss")) == 0
    capsys.readouterr()
    assert main([*base, "--scan", str(ss_report), "--out", str(run["tmp"] / "store" / "ss.mar")]) == 2
    assert "ss makes no verdict" in capsys.readouterr().err


def test_info_lists_the_cleansers(capsys):
    from guard.cleanse import list_cleansers

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["cleansers"]) == set(list_cleansers())
    assert info["cleansers"]["ac"]["options"]["silhouette_threshold"] == 0.29
    assert main(["info"]) == 0
    assert "training-set cleansing (guard cleanse --method):" in capsys.readouterr().out


@pytest.fixture(scope="module")
def xiang_run(tmp_path_factory):
    """Xiang's pattern C planted by ``guard poison`` in an ImageFolder of six template classes (seeds offset by
    ``GUARD_TEST_SEED``). Trained 16 epochs, as test_cleanse's Step 0 is: after 8, RE's p-value missed θ = 1e-3 on
    seven of seeds 0–7 (0.005 on seed 1)."""
    tmp = tmp_path_factory.mktemp("cleanse_re")
    data = templates(1200, SEED, 6)
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        folder = tmp / "data" / data.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    weights = tmp / "xiang.pt"
    assert main(["poison", "--attack", "xiang", "--attack-opt", "pattern=C", "--attack-opt", f"target={TARGET}",
                 "--attack-opt", "sources=(1,)", "--attack-opt", "per_source=80", "--model", "tiny_resnet",
                 "--dataset", "imagefolder", "--data-dir", str(tmp / "data"), "--eval-split", "train",
                 "--epochs", "16", "--lr", "0.05", "--batch-size", "64", "--no-augment", "--seed", str(SEED),
                 "--out", str(weights), "--no-progress"]) == 0
    return {"tmp": tmp, "data": tmp / "data", "weights": weights, "record": tmp / "xiang.pt.json"}


@pytest.mark.outcome
def test_re_command_writes_the_pattern_beside_the_true_one(xiang_run, capsys):
    run = xiang_run
    out = run["tmp"] / "re.json"
    assert main(["cleanse", "--method", "re", "--model", "tiny_resnet", "--weights", str(run["weights"]),
                 "--dataset", "imagefolder", "--data-dir", str(run["data"]), "--attack-record", str(run["record"]),
                 "--threshold", "0.001", "--step-size", "0.1", "--refine-step-size", "0.05", "--pair-batch-size", "16",
                 "--seed", str(SEED), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    # the source classes printed are the report's (RE names the planted source 1 on seven of seeds 0–7; on seed 5
    # the pair 2 → 0 is shorter: which source RE finds is test_cleanse's outcome test, on the same tiny set)
    sources = report["details"]["source_classes"]
    assert f"POISONED, target class 0 (source classes {', '.join(map(str, sources))});" in printed
    assert report["details"]["source_class"] in sources and report["config"]["removal_to"] == "any"
    # the default removal, the margin rule, says which rule removed the images
    rule = report["details"]["removal_rule"]
    assert report["config"]["removal"] == "margin" and rule in ("margin", "flip")
    assert {"margin": "(the margin rule:", "flip": "(eq. 12: their label changed"}[rule] in printed
    assert report["attack"]["target_detected"]
    check("guard cleanse RE TPR", report["attack"]["tpr"], low=0.9)
    check("guard cleanse RE FPR", report["attack"]["fpr"], high=0.1)
    assert len(report["pattern"]) == 3
    # eq. 12's multiple of the estimate is set by removal_pi unless --subtract-scale fixes it
    assert (report["config"]["removal_pi"], report["config"]["subtract_scale"]) == (0.995, None)
    assert report["details"]["subtract_scale"] >= 1 and report["details"]["removal_source_rate"] >= 0.995
    png = Image.open(report["pattern_png"])
    assert png.size == (4 * (16 + 2 + 16), 4 * 16)  # estimated | gap | true, 4× enlarged
    assert main(["cleanse", "--method", "ac", "--pair-batch-size", "8", "--model", "tiny_resnet", "--weights",
                 str(run["weights"]), "--dataset", "imagefolder", "--data-dir", str(run["data"]), "--out",
                 str(out)]) == 2
    assert "--pair-batch-size applies to --method re, not ac" in capsys.readouterr().err
    assert main(["cleanse", "--method", "re", "--subtract-scale", "0", "--model", "tiny_resnet", "--weights",
                 str(run["weights"]), "--dataset", "imagefolder", "--data-dir", str(run["data"]), "--out",
                 str(out)]) == 2
    assert "subtract_scale must be None (the multiple of v̂ set by removal_pi) or a number > 0" in \
        capsys.readouterr().err
    assert main(["cleanse", "--method", "re", "--removal-pi", "1.5", "--model", "tiny_resnet", "--weights",
                 str(run["weights"]), "--dataset", "imagefolder", "--data-dir", str(run["data"]), "--out",
                 str(out)]) == 2
    assert "removal_pi must be a number in (0, 1], got 1.5" in capsys.readouterr().err
    # --removal flip --removal-to sources: only the target images that move to a source class
    to_sources = run["tmp"] / "re_sources.json"
    assert main(["cleanse", "--method", "re", "--model", "tiny_resnet", "--weights", str(run["weights"]),
                 "--dataset", "imagefolder", "--data-dir", str(run["data"]), "--attack-record", str(run["record"]),
                 "--threshold", "0.001", "--step-size", "0.1", "--refine-step-size", "0.05", "--pair-batch-size", "16",
                 "--removal", "flip", "--removal-to", "sources", "--seed", str(SEED), "--out", str(to_sources),
                 "--no-progress"]) == 0
    narrowed = json.loads(to_sources.read_text())
    assert narrowed["config"]["removal_to"] == "sources" and narrowed["details"]["removal_rule"] == "flip"
    assert narrowed["details"]["source_classes"] == sources  # the rule's outcome: test_cleanse, over seeds
    # the default margin rule refuses the label rule's --removal-to sources, and says how to ask for eq. 12
    assert main(["cleanse", "--method", "re", "--removal-to", "sources", "--model",
                 "tiny_resnet", "--weights", str(run["weights"]), "--dataset", "imagefolder", "--data-dir",
                 str(run["data"]), "--out", str(out)]) == 2
    assert "pass removal='flip' with it); removal='margin' needs removal_to='any', got 'sources'" in \
        capsys.readouterr().err
    assert main(["cleanse", "--method", "re", "--removal-posterior", "0", "--model", "tiny_resnet", "--weights",
                 str(run["weights"]), "--dataset", "imagefolder", "--data-dir", str(run["data"]), "--out",
                 str(out)]) == 2
    assert "removal_posterior must be a number in (0, 1), got 0" in capsys.readouterr().err
