"""MOTH hardening (guard.repair.Moth, ALGORITHMS.md D9) on the tiny planted backdoor: the planted pairs'
distances grow and the backdoor goes; its bookkeeping, bad input, the training hook it rides on, and
``guard harden`` end to end (hardened weights, distances before/after, heat maps, archive)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch

from guard.detect import ClassDistance
from guard.models import create, save_weights
from guard.repair import MothConfig, create_defense
from guard.repair.moth import loss_decrease
from guard.train import TrainConfig, train
from test_defenses import TINY_MOTH
from test_distance import TINY_DISTANCE, distances
from outcomes import SEED, check
from test_repair import TARGET, attack_success_rate, planted

PLANTED = ((1, TARGET), (2, TARGET), (3, TARGET))


@pytest.fixture(scope="module")
def hardened():
    p = planted()
    return create_defense("moth", config=TINY_MOTH).defend(p.backdoored, p.train_set, eval_set=p.test_set,
                                                           asr=lambda m: attack_success_rate(m, p.triggered),
                                                           generator=torch.Generator().manual_seed(SEED))


@pytest.mark.outcome
def test_moth_enlarges_the_planted_pairs_and_removes_the_backdoor(hardened):
    """Over MOTH seeds 0-4, OMP_WAIT_POLICY PASSIVE and ACTIVE (tests/audit_outcomes.py): smallest planted
    distance after / largest before >= 1.84 (asserted > 1.3), mean enlargement of the planted pairs >= 1.52
    (asserted > 0.8), ASR 0.75 -> 0.00, CDA 1.00 -> 1.00."""
    p = planted()
    before = distances("backdoored")
    after = ClassDistance(dataclasses.replace(TINY_DISTANCE, pairs=PLANTED)).measure(
        hardened.model, p.test_set, generator=torch.Generator().manual_seed(SEED))
    planted_before = torch.stack([before.matrix[pair] for pair in PLANTED])
    planted_after = torch.stack([after.matrix[pair] for pair in PLANTED])
    check("min planted pair after / max before", planted_after.min() / planted_before.max(), low=1.3)
    check("mean enlargement of the planted pairs", after.enlargement(before), low=0.8)
    check("ASR before MOTH", hardened.history[0].asr, low=0.6)
    check("ASR after MOTH", hardened.chosen.asr, high=0.1)
    assert hardened.chosen.cda >= hardened.cda0 - 0.02
    assert hardened.chosen == hardened.history[-1]  # a hardening keeps its final model


def test_moth_bookkeeping_is_json_and_symmetric(hardened):
    details = json.loads(json.dumps(hardened.to_dict(), allow_nan=False))["details"]
    counts = torch.tensor(details["pair_counts"])
    assert torch.equal(counts, counts.T) and counts.sum() > 0 and counts.diagonal().sum() == 0
    steps = 4 + 3 * 13  # one warm-up step per class, then 3 epochs of 800 images in batches of 64
    assert details["hardening_steps"] >= steps and details["stamped_images"] > 0
    assert len(details["trigger_size"]) == 4 and all(p["pair"][0] != p["pair"][1] for p in details["periods"])
    assert hardened.method == "moth" and hardened.details["warmup_loss_decrease"][1][TARGET] > 0


def test_warmup_loss_decrease_is_bounded_where_the_random_start_already_succeeds():
    first = torch.tensor([2.0, 1e-7, 0.0, 0.5, float("nan")], dtype=torch.float64)
    best = torch.tensor([0.5, 0.05, 0.0, 0.5, 0.1], dtype=torch.float64)
    decrease = loss_decrease(first, best)
    assert decrease[:4].tolist() == [0.75, 1.0, 1.0, 1.0]  # not (1e-7 - 0.05) / 1e-7 = -5e5
    assert decrease[4].isnan()


def test_moth_refuses_missing_classes_and_bad_options():
    p = planted()
    three = p.train_set.subset(torch.nonzero(p.train_set.labels != 2).flatten())
    with pytest.raises(ValueError, match=r"moth needs trusted images of every class; classes \[2\] have none"):
        create_defense("moth", config=TINY_MOTH).defend(p.backdoored, three, eval_set=p.test_set)
    for bad, match in [({"portion": 0.0}, "portion"), ({"warm_ratio": 1.5}, "warm_ratio"),
                       ({"random_pair": -0.1}, "random_pair"), ({"multiplier": 1.0}, "multiplier"),
                       ({"max_cda_drop": 1.0}, "max_cda_drop"), ({"period": 0}, "period"), ({"lr": 0}, "lr")]:
        with pytest.raises(ValueError, match=match):
            MothConfig(**bad)
    with pytest.raises(TypeError, match="augment"):
        MothConfig(augment="yes")
    reference = MothConfig.reference()
    assert (reference.lr, reference.warmup_steps, reference.pair_steps, reference.quick_steps) == (1e-4, 500, 200, 50)
    assert pickle.loads(pickle.dumps(TINY_MOTH)) == TINY_MOTH


def test_train_applies_the_transform_to_every_batch():
    p = planted()
    model = create("tiny_resnet", num_classes=4)
    seen = []

    def transform(x, y):
        seen.append((x.dtype, float(x.min()), float(x.max()), y.shape[0]))
        return torch.zeros_like(x)

    train(model, p.trusted, TrainConfig(epochs=2, lr=0.01, batch_size=50, augment=False, steps_per_epoch=3),
          generator=torch.Generator().manual_seed(0), progress=False, transform=transform)
    assert len(seen) == 6 and all(d == torch.float32 and 0 <= lo and hi <= 1 and n == 50 for d, lo, hi, n in seen)
    with pytest.raises(TypeError, match="transform must be a callable"):
        train(model, p.trusted, TrainConfig(epochs=1, lr=0.01), transform="stamp", progress=False)


def test_guard_harden_writes_weights_distances_heatmaps_and_archives(data_root, tmp_path, capsys):
    from guard.cli import main
    from guard.serving import read_manifest

    weights = save_weights(create("tiny_resnet", num_classes=10, generator=torch.Generator().manual_seed(0)),
                           tmp_path / "model.pt")
    out = tmp_path / "hardened.pt"
    args = ["harden", "--model", "tiny_resnet", "--weights", str(weights), "--dataset", "cifar10", "--data-dir",
            str(data_root), "--limit", "400", "--trusted-fraction", "0.5", "--eval-split", "test-lossless",
            "--eval-limit", "200", "--device", "cpu", "--out", str(out),
            "--opt", "epochs=1", "--opt", "batch_size=50", "--opt", "eval_every=5", "--opt", "warmup_steps=2",
            "--opt", "pair_steps=2", "--opt", "quick_steps=1", "--opt", "samples_per_class=2",
            "--distance-opt", "steps=2", "--distance-opt", "images_per_class=3",
            "--distance-opt", "pairs=((1, 0), (0, 1), (2, 3))"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "moth hardening of tiny_resnet" in printed and "class distance before:" in printed
    summary = json.loads(out.with_name("hardened.pt.json").read_text())
    assert summary["method"] == "moth" and summary["kind"] == "hardening"
    assert summary["distance"]["before"]["pairs_measured"] == 3 == summary["distance"]["after"]["pairs_measured"]
    assert (tmp_path / "hardened.distance.png").stat().st_size > 1000
    create("tiny_resnet", weights=out)
    archive = tmp_path / "hardened.mar"
    assert main(["archive", "--model", "tiny_resnet", "--weights", str(out), "--out", str(archive)]) == 0
    assert read_manifest(archive).weights_method == "moth"
    assert main(args[:-6] + ["--no-distance", "--opt", "portion=2"]) == 2
    assert "portion must be a number in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # pivotal is a repair, not a hardening: not among --method's choices
        main(["harden", "--method", "pivotal"] + args[1:])
    assert "invalid choice: 'pivotal'" in capsys.readouterr().err
