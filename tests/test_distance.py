"""Class distance (guard.detect.ClassDistance, ALGORITHMS.md M12): the planted backdoor is the shortest pair,
seeds and enlargement by hand, bad input refused, and ``guard distance``."""

from __future__ import annotations

import functools
import json
import math
import pickle

import pytest
import torch

from guard.detect import ClassDistance, ClassDistanceConfig, DistanceResult
from guard.models import save_weights
from outcomes import SEED, check
from test_repair import TARGET, planted

#: enough passes on the tiny model for the planted pairs to converge to the 3×3 patch (27 = 9 pixels × 3 channels)
TINY_DISTANCE = ClassDistanceConfig(steps=150, images_per_class=40, batch_size=40)


@functools.lru_cache(maxsize=None)
def distances(which: str) -> DistanceResult:
    p = planted()
    return ClassDistance(TINY_DISTANCE).measure(getattr(p, which), p.test_set,
                                                generator=torch.Generator().manual_seed(SEED))


@pytest.mark.outcome
def test_the_planted_backdoor_is_the_shortest_pair():
    """Margins over seeds 0-4 (OMP_WAIT_POLICY PASSIVE and ACTIVE alike): min other / max planted >= 1.68,
    clean / backdoored planted mean >= 3.42."""
    backdoored, clean = distances("backdoored"), distances("clean")
    assert backdoored.smallest[1] == TARGET
    planted_pairs = backdoored.matrix[[s for s in range(4) if s != TARGET], TARGET]
    others = backdoored.matrix[backdoored.found & (torch.arange(4)[None, :] != TARGET)]
    check("min other pair / max planted pair", others.min() / planted_pairs.max(), low=1.3)
    check("max planted pair", planted_pairs.max(), high=40)  # near the true trigger's 27, far below 768
    check("clean / backdoored planted mean", clean.matrix[[1, 2, 3], TARGET].mean() / planted_pairs.mean(), low=2)


def test_distance_result_records_every_pair_and_seed():
    result = distances("backdoored")
    assert result.matrix.shape == (4, 4) and result.per_seed.shape == (1, 4, 4)
    assert torch.isnan(result.matrix.diagonal()).all() and int(result.measured.sum()) == 12
    summary = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert summary["pairs_measured"] == 12 and summary["matrix"][0][0] is None
    assert summary["smallest"] == list(result.smallest)
    assert summary["mean"] == pytest.approx(result.matrix[result.found].mean().item())


def test_min_over_seeds_and_enlargement_by_hand():
    p = planted()
    config = ClassDistanceConfig(steps=4, images_per_class=10, seeds=2, pairs=((1, 0), (0, 2)))
    result = ClassDistance(config).measure(p.backdoored, p.test_set, generator=torch.Generator().manual_seed(3))
    assert result.per_seed.shape == (2, 4, 4)
    for s, t in config.pairs:
        assert result.matrix[s, t] == result.per_seed[:, s, t].min()
    assert int(result.measured.sum()) == 2 and bool(torch.isnan(result.matrix[2, 3]))

    def made(values):
        m = torch.full((3, 3), math.nan, dtype=torch.float64)
        for (s, t), v in values.items():
            m[s, t] = v
        return DistanceResult(m, m[None], ClassDistanceConfig(), 0.0)

    before = made({(0, 1): 10.0, (1, 0): 20.0, (2, 0): math.inf})
    after = made({(0, 1): 15.0, (1, 0): 30.0, (2, 0): 50.0})
    assert after.enlargement(before) == pytest.approx(0.5)  # (0.5 + 0.5) / 2, the unfound pair left out
    assert before.mean == 15.0 and before.smallest == (0, 1)
    with pytest.raises(ValueError, match="DistanceResult"):
        after.enlargement(result)


def test_bad_input_is_refused_clearly():
    p = planted()
    with pytest.raises(ValueError, match=r"no images of classes \[3\]"):
        ClassDistance(steps=1).measure(p.clean, p.test_set.subset(torch.nonzero(p.test_set.labels != 3).flatten()))
    with pytest.raises(ValueError, match=r"pairs \[\(5, 0\)\] name classes outside \[0, 3\]"):
        ClassDistance(steps=1, pairs=((5, 0),)).measure(p.clean, p.test_set)
    with pytest.raises(ValueError, match="dataset is empty"):
        ClassDistance(steps=1).measure(p.clean, p.test_set.subset(torch.arange(0)))
    with pytest.raises(TypeError, match="GuardModel"):
        ClassDistance(steps=1).measure(torch.nn.Linear(2, 2), p.test_set)
    with pytest.raises(TypeError, match="generator must be a CPU torch.Generator, got 0"):
        ClassDistance(steps=1).measure(p.clean, p.test_set, generator=0)
    for bad, match in [({"steps": 0}, "steps"), ({"images_per_class": 0}, "images_per_class"),
                       ({"attack_threshold": 1.5}, "attack_threshold"), ({"pairs": ((1, 1),)}, "pairs"),
                       ({"multiplier": 1.0}, "multiplier"), ({"seeds": 0}, "seeds")]:
        with pytest.raises(ValueError, match=match):
            ClassDistanceConfig(**bad)
    assert pickle.loads(pickle.dumps(TINY_DISTANCE)) == TINY_DISTANCE
    assert ClassDistanceConfig.reference().steps == 1000 and ClassDistanceConfig.reference().seeds == 3


def test_guard_distance_cli_prints_the_matrix_and_writes_json_and_heatmap(data_root, tmp_path, capsys):
    from guard.cli import main
    from guard.models import create

    weights = save_weights(create("tiny_resnet", num_classes=10, generator=torch.Generator().manual_seed(0)),
                           tmp_path / "m.pt")
    out = tmp_path / "d" / "distance.json"
    args = ["distance", "--model", "tiny_resnet", "--weights", str(weights), "--dataset", "cifar10", "--data-dir",
            str(data_root), "--limit", "200", "--out", str(out), "--device", "cpu"]
    assert main(args + ["--opt", "steps=2", "--opt", "images_per_class=4", "--opt", "pairs=((1, 0), (2, 0))"]) == 0
    printed = capsys.readouterr().out
    assert "mean distance" in printed and printed.splitlines()[0].startswith("s\\t")
    summary = json.loads(out.read_text())
    assert summary["pairs_measured"] == 2 and len(summary["matrix"]) == 10
    assert (tmp_path / "d" / "distance.png").stat().st_size > 1000
    assert main(args + ["--opt", "steps=0"]) == 2
    assert "steps must be an int >= 1" in capsys.readouterr().err
