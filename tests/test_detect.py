"""Backdoor detection (guard.detect): CNC and Neural Cleanse on a tiny model with a planted BadNets backdoor
and on its clean twin, the MAD test on hand-made norms, the detector registry, the scan report, and the
per-request serving score."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guard.detect import (CNCConfig, CalibratedTriggerInversion, Detector, NeuralCleanse, NeuralCleanseConfig,
                          RequestScorer, ScanReport, ScanResult, apply_mask_pattern, calibrate_threshold,
                          create_detector, describe_detectors, get_detector, list_detectors, mad_anomaly_index,
                          register_detector, save_trigger_png, tanh_bounded)
from guard.models import save_weights
from guard.repair import PivotalTuningConfig
from outcomes import SEED, check
from test_repair import TARGET, TINY_REPAIR, planted

#: CNC at tiny scale: 10 inversion steps per class (the calibrated default is 5) — the planted trigger is found
#: within a few steps, while the natural triggers between stripe orientations need more (at 40 steps other
#: classes reach scores of 0.5–0.85 on some seeds)
TINY_CNC = CNCConfig(steps_per_class=10, batch_size=64, repair=TINY_REPAIR)
TINY_NC = NeuralCleanseConfig(steps=25, samples_per_step=64, batch_size=32)
#: every registered detector at tiny scale (a new detector is tested by adding it here)
TINY = {"cnc": TINY_CNC, "nc": TINY_NC}


@pytest.fixture(scope="module")
def cnc_scans():
    p = planted()
    scans = {name: CalibratedTriggerInversion(TINY_CNC).scan(model, p.trusted, p.test_set,
                                                             generator=torch.Generator().manual_seed(SEED))
             for name, model in (("backdoored", p.backdoored), ("clean", p.clean))}
    return scans


@pytest.fixture(scope="module")
def nc_scans():
    p = planted()
    return {name: NeuralCleanse(TINY_NC).scan(model, p.trusted, p.test_set,
                                              generator=torch.Generator().manual_seed(SEED))
            for name, model in (("backdoored", p.backdoored), ("clean", p.clean))}


# -------------------------------------------------------------------------------------------- CNC
@pytest.mark.outcome
def test_cnc_scores_the_planted_target_above_every_other_class(cnc_scans):
    report = cnc_scans["backdoored"].report
    others = [s for c, s in report.scores.items() if c != TARGET]
    check("target score - best other class", report.scores[TARGET] - max(others), low=0.2)
    assert report.backdoored and report.details["top_class"] == TARGET
    # flagged when it stands out of the other scores (MAD index > 2); with 4 classes a natural trigger of one
    # other class can hide that on some seeds, and then no class is named — never a wrong one
    assert report.flagged_class in (TARGET, None)
    assert (report.flagged_class == TARGET) == (report.separation > 2)
    # the reversed trigger flips the pivot to the target and not the repaired model
    check("pivot success of the target's trigger", report.details["pivot_success"][str(TARGET)], low=0.9)
    check("repaired success of the target's trigger", report.details["repaired_success"][str(TARGET)], high=0.2)
    assert set(report.scores) == {0, 1, 2, 3}
    repair = report.details["repair"]
    assert repair["method"] == "pivotal" and repair["chosen"]["cda"] >= repair["cda0"] - 0.02
    assert isinstance(cnc_scans["backdoored"], ScanResult) and cnc_scans["backdoored"].reference is not None


@pytest.mark.outcome
def test_cnc_scores_the_clean_twin_lower(cnc_scans):
    check("backdoored - clean max score",
          cnc_scans["backdoored"].report.max_score - cnc_scans["clean"].report.max_score, low=1e-6)
    threshold = calibrate_threshold([cnc_scans["clean"].report.max_score], 0.0)
    assert threshold == pytest.approx(cnc_scans["clean"].report.max_score)


def test_cnc_is_deterministic_under_a_generator_and_reuses_a_repaired_model(cnc_scans):
    p = planted()
    first = cnc_scans["backdoored"]
    config = CNCConfig(steps_per_class=10, batch_size=64, classes=(0, 1), repair=TINY_REPAIR)
    runs = [CalibratedTriggerInversion(config).scan(p.backdoored, p.trusted, p.test_set, reference=first.reference,
                                                    generator=torch.Generator().manual_seed(5))
            for _ in range(2)]
    assert "repair" not in runs[0].report.details and runs[0].reference is first.reference
    assert runs[0].report.scores == runs[1].report.scores
    assert torch.equal(runs[0].triggers[0]["delta"], runs[1].triggers[0]["delta"])
    assert set(runs[0].report.scores) == {0, 1}


def test_cnc_report_round_trips_and_triggers_save_as_png(cnc_scans, tmp_path):
    result = cnc_scans["backdoored"]
    path = result.report.save(tmp_path / "report.json")
    data = json.loads(path.read_text())
    assert data["backdoored"] is True and data["flagged_class"] == TARGET and data["method"] == "cnc"
    assert set(data["scores"]) == {"0", "1", "2", "3"}
    loaded = ScanReport.load(path)
    assert loaded.scores == result.report.scores and loaded.flagged_class == TARGET
    png = save_trigger_png(result.trigger_image(TARGET), tmp_path / "trigger.png", scale=2)
    image = Image.open(png)
    assert image.size == (32, 32) and image.mode == "RGB"
    pixels = torch.from_numpy(np.array(image))
    assert pixels.min() == 0 and pixels.max() == 255  # min–max stretched


@pytest.mark.parametrize("kwargs, match", [
    ({"steps_per_class": 0}, "steps_per_class"),
    ({"lr": 0.0}, "lr"),
    ({"betas": (0.5,)}, "betas"),
    ({"score_variant": "mean"}, "score_variant"),
    ({"threshold": 3.0}, "threshold"),
    ({"threshold_source": ""}, "threshold_source"),
    ({"classes": (1, 1)}, "classes"),
    ({"repaired_weight": -1.0}, "repaired_weight"),
])
def test_bad_cnc_config_fails_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CNCConfig(**kwargs)


def test_cnc_rejects_bad_inputs():
    p = planted()
    cnc = CalibratedTriggerInversion(CNCConfig(classes=(7,), repair=TINY_REPAIR))
    with pytest.raises(ValueError, match=r"classes must be at least 1 labels in \[0, 3\]"):
        cnc.scan(p.backdoored, p.trusted, p.test_set, reference=p.clean)
    with pytest.raises(TypeError, match="ImageTensorDataset"):
        cnc.scan(p.backdoored, [(torch.zeros(3, 16, 16), 0)], p.test_set)
    with pytest.raises(ValueError, match="trusted is empty"):
        cnc.scan(p.backdoored, p.trusted.subset(torch.arange(0)), p.test_set)
    with pytest.raises(TypeError, match="needs a CNCConfig"):
        CalibratedTriggerInversion(TINY_REPAIR)
    assert pickle.loads(pickle.dumps(TINY_CNC)) == TINY_CNC


# ---------------------------------------------------------------------------------- Neural Cleanse
def test_mad_anomaly_index_on_hand_made_norms():
    result = mad_anomaly_index([10.0, 11.0, 9.0, 10.0, 12.0, 8.0, 1.0])
    # median 10; |L − 10| = 0,1,1,0,2,2,9 -> median 1 -> MAD 1.4826
    assert result.median == 10.0 and result.mad == pytest.approx(1.4826)
    assert result.indices[6] == pytest.approx(9 / 1.4826)
    assert result.flagged == (6,)
    assert result.model_index == pytest.approx(9 / 1.4826)
    # a large norm is never flagged (only the small side is suspicious)
    assert mad_anomaly_index([10.0, 11.0, 9.0, 10.0, 40.0]).flagged == ()
    with pytest.raises(ValueError, match="at least 3"):
        mad_anomaly_index([1.0, 2.0])


def test_tanh_reparameterisation_and_mask_blend():
    raw = torch.tensor([-50.0, 0.0, 50.0])
    bounded = tanh_bounded(raw)
    assert 0 <= bounded[0] < 1e-6 and bounded[1] == 0.5 and 1 - 1e-6 < bounded[2] <= 1
    assert 0 < tanh_bounded(torch.tensor([-5.0])).item() < tanh_bounded(torch.tensor([-4.0])).item()
    x = torch.zeros(1, 3, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    out = apply_mask_pattern(x, mask, torch.ones(3, 2, 2))
    assert out[0, :, 0, 0].tolist() == [1.0] * 3 and out[0, :, 0, 1].tolist() == [0.0] * 3
    assert out[0, :, 1, 1].tolist() == [0.5] * 3


@pytest.mark.outcome
def test_neural_cleanse_mad_flags_the_planted_backdoor(nc_scans):
    result = nc_scans["backdoored"]
    finite = {int(c): n for c, n in result.report.details["l1_norms"].items() if n is not None}
    assert min(finite, key=finite.get) == TARGET
    others = sorted(n for c, n in finite.items() if c != TARGET)
    check("smallest other L1 norm / target's", others[0] / finite[TARGET], low=2)
    # flagged by the MAD test (index > 2); its median and MAD of 4 labels can hide a 2.5x smaller norm on some
    # seeds, and then no label is named — never a wrong one
    assert result.report.flagged_class in (TARGET, None)
    assert result.report.backdoored == (result.report.flagged_class == TARGET) == (result.report.separation > 2)
    assert result.report.separation == result.report.details["model_anomaly_index"]
    assert result.report.scores[TARGET] == max(result.report.scores.values())
    mask, pattern = result.triggers[TARGET]["mask"], result.triggers[TARGET]["pattern"]
    assert mask.shape == (16, 16) and pattern.shape == (3, 16, 16)
    # the reversed trigger really works on the backdoored model, as the held-out rate in the report says
    p = planted()
    x = p.test_set.images[p.test_set.labels != TARGET].float() / 255
    stamped = apply_mask_pattern(x, mask, pattern)
    rate = (p.backdoored(stamped).argmax(1) == TARGET).double().mean().item()
    check("reversed trigger's ASR", rate, low=0.9)
    assert rate == pytest.approx(result.report.details["heldout_success"][str(TARGET)])
    assert torch.equal(result.stamp(x, TARGET), stamped)


@pytest.mark.outcome
def test_neural_cleanse_does_not_flag_the_clean_twin(nc_scans):
    check("clean twin's MAD anomaly index", nc_scans["clean"].report.separation, high=2)
    assert not nc_scans["clean"].report.backdoored
    assert nc_scans["clean"].report.flagged_class is None


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"),
    ({"cost_multiplier": 1.0}, "cost_multiplier"),
    ({"attack_threshold": 0.0}, "attack_threshold"),
    ({"early_stop_patience": 0}, "early_stop_patience"),
    ({"classes": (1, 2, 2)}, "classes"),
])
def test_bad_neural_cleanse_config_fails_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuralCleanseConfig(**kwargs)


# --------------------------------------------------------------------------------------- serving
@pytest.mark.outcome
def test_request_scorer_flags_triggered_inputs_with_one_batched_forward(cnc_scans, tmp_path):
    p = planted()
    repaired = cnc_scans["backdoored"].reference
    weights = save_weights(repaired, tmp_path / "repaired.pt")
    report = cnc_scans["backdoored"].report.save(tmp_path / "report.json")
    scorer = RequestScorer.from_files(weights, "tiny_resnet", report=report, num_classes=4)
    assert scorer.class_gauges() == cnc_scans["backdoored"].report.scores

    calls = []
    handle = scorer.repaired.register_forward_hook(lambda *a: calls.append(1))
    try:
        keep = p.test_set.labels != TARGET
        clean_x = p.test_set.images[keep][:64].float() / 255
        triggered_x = p.triggered.images[keep][:64].float() / 255
        with torch.no_grad():
            clean = scorer.score(clean_x, p.backdoored(clean_x))
            triggered = scorer.score(triggered_x, p.backdoored(triggered_x))
    finally:
        handle.remove()
    assert len(calls) == 2  # one forward per batch, whatever its size
    assert clean.score.shape == (64,) and clean.disagree.dtype == torch.bool
    check("triggered - clean mean score", triggered.score.mean() - clean.score.mean(), low=0.5)
    check("triggered disagreement", triggered.disagree.double().mean(), low=0.8)
    check("clean disagreement", clean.disagree.double().mean(), high=0.1)
    assert ((0 <= triggered.score) & (triggered.score <= 1)).all()
    rows = triggered.to_list()
    assert len(rows) == 64 and set(rows[0]) == {"backdoor_score", "disagree", "repaired_label"}
    json.dumps(rows)
    with pytest.raises(ValueError, match="pivot_logits"):
        scorer.score(clean_x, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="pixel values"):
        scorer.score(clean_x * 3, torch.zeros(64, 4))
    with pytest.raises(ValueError, match="no repaired model"):
        RequestScorer(None).score(clean_x, torch.zeros(64, 4))


def test_scan_report_rejects_inconsistent_or_malformed_input(tmp_path):
    with pytest.raises(ValueError, match="contradicts"):
        ScanReport("cnc", False, 0, {0: 0.9}, 0.5)
    with pytest.raises(ValueError, match="registered detector"):
        ScanReport("strip", False, None, {0: 0.1}, 0.5)
    # above the threshold without a class that stands out: a verdict without a class, said in words
    unsure = ScanReport("cnc", True, None, {0: 0.9, 1: 0.88, 2: 0.91}, 0.5, separation=0.7)
    assert "no class stands out" in unsure.summary and unsure.to_dict()["summary"] == unsure.summary
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"backdoored": False}))
    with pytest.raises(ValueError, match="lacks the keys"):
        ScanReport.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ScanReport.load(bad)
    with pytest.raises(FileNotFoundError):
        ScanReport.load(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------- CLI
def _tiny_weights(tmp_path):
    from guard.models import create

    return save_weights(create("tiny_resnet", num_classes=10, generator=torch.Generator().manual_seed(0)),
                        tmp_path / "suspect.pt")


def test_guard_scan_cli_writes_report_triggers_and_repaired_model(data_root, tmp_path, capsys):
    from guard.cli import main
    from guard.models import create

    weights = _tiny_weights(tmp_path)
    common = ["scan", "--model", "tiny_resnet", "--weights", str(weights), "--dataset", "cifar10",
              "--data-dir", str(data_root), "--limit", "1000", "--trusted-fraction", "0.1",
              "--eval-split", "test-lossless", "--eval-limit", "200", "--device", "cpu"]
    out = tmp_path / "scan" / "report.json"
    assert main(common + ["--out", str(out), "--opt", "steps_per_class=2", "--opt", "repair.steps=20",
                          "--opt", "repair.eval_every=10", "--repaired-out", str(tmp_path / "repaired.pt")]) == 0
    report = json.loads(out.read_text())
    assert {"backdoored", "flagged_class", "scores", "method"} <= set(report)
    assert report["method"] == "cnc" and set(report["scores"]) == {str(c) for c in range(10)}
    assert 90 <= report["trusted_images"] <= 110 and report["heldout_images"] == 200
    assert sorted(Path(p).name for p in report["triggers"].values()) == sorted(f"class_{c}.png" for c in range(10))
    assert all(Path(p).is_file() for p in report["triggers"].values())
    create("tiny_resnet", weights=tmp_path / "repaired.pt")
    assert ScanReport.load(out).scores == {int(c): s for c, s in report["scores"].items()}

    nc_out = tmp_path / "nc.json"
    assert main(common + ["--method", "nc", "--out", str(nc_out), "--opt", "steps=2",
                          "--opt", "samples_per_step=32"]) == 0
    nc_report = json.loads(nc_out.read_text())
    assert nc_report["method"] == "nc" and "l1_norms" in nc_report["details"]
    capsys.readouterr()
    assert main(common + ["--method", "nc", "--out", str(nc_out), "--opt", "repair.steps=20"]) == 2
    assert "detector 'nc' has no option 'repair'" in capsys.readouterr().err
    assert main(common + ["--out", str(out), "--opt", "repair.steps=15", "--opt", "repair.eval_every=10"]) == 2
    assert "multiple of eval_every" in capsys.readouterr().err
    assert main(common + ["--method", "nc", "--out", str(nc_out), "--repaired-out", str(tmp_path / "r.pt"),
                          "--opt", "steps=1", "--opt", "samples_per_step=32"]) == 2
    assert "nc compares against no reference model" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- registry
def test_registry_lists_every_detector_and_refuses_duplicates():
    assert list_detectors() == sorted(TINY), "add new detectors to TINY so the shared invariants cover them"
    info = describe_detectors()
    json.dumps(info)
    assert set(info) == set(TINY) and all(info[n]["description"] for n in info)
    assert info["cnc"]["options"]["threshold"] == pytest.approx(0.2809, abs=1e-4)

    class Again(Detector):
        name = "cnc"
        config_class = CNCConfig

        def scan(self, *args, **kwargs):  # pragma: no cover - never registered
            raise AssertionError

    with pytest.raises(ValueError, match="already registered"):
        register_detector(Again)
    with pytest.raises(TypeError, match="Detector subclass"):
        register_detector(dict)
    assert get_detector("cnc") is CalibratedTriggerInversion
    with pytest.raises(ValueError, match="unknown detector 'strip'; expected one of cnc, nc"):
        create_detector("strip")


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_detector_scans_through_one_signature_and_leaves_the_model_alone(name, tmp_path):
    p = planted()
    model = copy.deepcopy(p.backdoored).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = create_detector(name, config=TINY[name]).scan(model, p.trusted, p.test_set,
                                                           generator=torch.Generator().manual_seed(0))
    assert isinstance(result, ScanResult) and result.report.method == name
    assert set(result.report.scores) == {0, 1, 2, 3} and result.seconds > 0
    assert ScanReport.load(result.report.save(tmp_path / "r.json")).scores == result.report.scores
    for c in result.triggers:
        assert result.trigger_image(c).shape == (3, 16, 16)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert pickle.loads(pickle.dumps(TINY[name])) == TINY[name]
    with pytest.raises(TypeError, match="unexpected keyword"):
        create_detector(name, no_such_option=1)


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_failed_scan_leaves_no_hooks_and_restores_the_model(name):
    p = planted()
    model = copy.deepcopy(p.backdoored).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def explode(module, inputs):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("injected failure")

    handle = model.register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            create_detector(name, config=TINY[name]).scan(model, p.trusted, p.test_set,
                                                          generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cnc_says_when_its_repair_changed_nothing():
    p = planted()
    harsh = PivotalTuningConfig(steps=20, eval_every=10, batch_size=64, lr=5.0, param_lambda=0.0, augment=False)
    scan = create_detector("cnc", steps_per_class=2, repair=harsh).scan(p.backdoored, p.trusted, p.test_set,
                                                                          generator=torch.Generator().manual_seed(0))
    assert scan.report.details["repair"]["chosen"]["step"] == 0
    assert scan.report.caveat is not None and "kept the original model" in scan.report.summary
    assert all(s == 0 for s in scan.report.scores.values())  # the model compared with itself
    assert ScanReport.from_dict(scan.report.to_dict()).caveat == scan.report.caveat
