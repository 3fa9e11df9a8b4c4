"""guard.metrics: every metric of ALGORITHMS.md §3 against hand-computed values, and its input checks."""

from __future__ import annotations

import math

import pytest
import torch

from guard.metrics import (Rate, accuracy, attack_success_rate, cleansing_rates, data_efficiency, defended_asr,
                           goal_confidences, goal_success, nontarget_asr, overlap_similarity, put_back_rate,
                           roc_auc, source_asr)

T = torch.tensor


def test_accuracy():
    assert accuracy(T([0, 1, 2, 2]), T([0, 1, 1, 2])) == 0.75
    with pytest.raises(ValueError, match="equal length"):
        accuracy(T([0, 1]), T([0]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        accuracy(T([0.5]), T([0]))
    with pytest.raises(ValueError, match="at least one"):
        accuracy(T([], dtype=torch.int64), T([], dtype=torch.int64))


def test_asr_pyp_form_subtracts_the_free_base_rate():
    labels = T([0, 0, 1, 2, 3, 4, 5, 6, 7, 8])   # two images already of target 0
    preds = T([0, 0, 0, 0, 0, 0, 0, 0, 3, 4])    # 8 predicted as target
    assert attack_success_rate(preds, labels, 0) == pytest.approx((8 - 2) / 10)
    assert nontarget_asr(preds, labels, 0) == pytest.approx(6 / 8)
    assert attack_success_rate(labels, labels, 0) == 0.0, "the ground-truth labeller has ASR 0"
    with pytest.raises(ValueError, match="non-target ASR is undefined"):
        nontarget_asr(T([0]), T([0]), 0)


def test_source_asr_counts_source_classes_only():
    labels = T([1, 1, 2, 3, 3])
    preds = T([9, 1, 9, 9, 9])
    assert source_asr(preds, labels, 9, [1]) == 0.5
    assert source_asr(preds, labels, 9, [1, 3]) == 0.75
    with pytest.raises(ValueError, match="no test image belongs"):
        source_asr(preds, labels, 9, [5])


def test_goal_metrics_match_rescaler_table_1_clbd_row():
    # CLBD / ResNet-34: SA = 4, 1 still poison (25 %), 2 of the other 3 put back (66.67 %)
    poison = T([5, 5, 5, 5])
    truth = T([1, 2, 3, 4])
    assert goal_success(T([5, 5, 5, 5]), poison).sum() == 4
    defended = T([5, 2, 3, 7])
    d = defended_asr(defended, poison)
    assert (d.value, d.n) == (0.25, 4) and d.stderr == pytest.approx(0.2165, abs=1e-4)
    p = put_back_rate(defended, truth, poison)
    assert p.value == pytest.approx(2 / 3) and p.n == 3 and p.stderr == pytest.approx(0.2722, abs=1e-4)
    none = put_back_rate(T([5]), T([1]), T([5]))
    assert none.n == 0 and math.isnan(none.value) and math.isnan(none.stderr)


def test_goal_confidences():
    probs = T([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    target_conf, poison_conf = goal_confidences(probs, T([0, 2]), T([1, 0]))
    assert target_conf == pytest.approx(0.75) and poison_conf == pytest.approx(0.15)
    with pytest.raises(ValueError, match="apply softmax"):
        goal_confidences(T([[2.0, -1.0]]), T([0]), T([1]))


def test_overlap_similarity():
    w = T([0.1, 0.0, 0.2])
    assert overlap_similarity(w, w) == pytest.approx(1.0)
    assert overlap_similarity(T([1.0, 0.0]), T([0.0, 1.0])) == 0.0
    with pytest.raises(ValueError, match="all-zero"):
        overlap_similarity(torch.zeros(2), torch.zeros(2))


def test_cleansing_rates():
    labels = T([0, 0, 0, 0, 1, 1, 0, 0])          # target 0; poisons 6, 7 (labelled 0)
    tpr, fpr = cleansing_rates(T([6, 0, 4]), T([6, 7]), labels, target=0)
    assert tpr == 0.5 and fpr == pytest.approx(1 / 4), "clean target-class images: 0, 1, 2, 3"
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 7\]"):
        cleansing_rates(T([8]), T([6]), labels, 0)
    with pytest.raises(ValueError, match="TPR is undefined"):
        cleansing_rates(T([0]), T([], dtype=torch.int64), labels, 0)


def test_roc_auc_with_ties_and_orientation():
    assert roc_auc(T([0.9, 0.8, 0.1, 0.2]), T([1, 1, 0, 0])) == 1.0
    assert roc_auc(T([0.1, 0.2, 0.9, 0.8]), T([1, 1, 0, 0])) == 0.0
    assert roc_auc(T([0.5, 0.5]), T([True, False])) == 0.5
    assert roc_auc(T([3.0, 1.0, 2.0, 2.0]), T([1, 0, 1, 0])) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    with pytest.raises(ValueError, match="needs both classes"):
        roc_auc(T([1.0, 2.0]), T([1, 1]))


def test_data_efficiency_respects_the_cda_budget():
    curve = [(0.95, 1.0), (0.94, 0.4), (0.932, 0.1), (0.92, 0.0)]
    assert data_efficiency(curve, cda0=0.95) == 0.1, "the 0.92 point leaves the 2-point budget"
    assert data_efficiency(curve, cda0=0.95, delta=0.05) == 0.0
    with pytest.raises(ValueError, match="no point keeps CDA"):
        data_efficiency([(0.5, 0.1)], cda0=0.95)
    with pytest.raises(ValueError, match="curve is empty"):
        data_efficiency([], cda0=0.9)


def test_rate_stderr():
    assert Rate(0.5, 4).stderr == pytest.approx(0.25)


def test_rate_interval_is_clopper_pearson():
    # k = 0 and k = n have closed forms: the bound is (α/2)^(1/n) away from the observed end
    assert Rate(0.0, 89).interval() == (0.0, pytest.approx(1 - 0.025 ** (1 / 89)))
    assert Rate(1.0, 20).interval(0.9) == (pytest.approx(0.05 ** (1 / 20)), 1.0)
    low, high = Rate(5 / 89, 89).interval()
    assert low < 5 / 89 < high and (round(low, 3), round(high, 3)) == (0.018, 0.126)
    assert Rate(5 / 89, 89).interval(0.5)[1] < high, "a lower level gives a narrower interval"
    assert all(math.isnan(v) for v in Rate(math.nan, 0).interval())
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\), got 1.5"):
        Rate(0.5, 4).interval(1.5)
