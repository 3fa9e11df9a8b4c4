"""Training-set cleansing (guard.cleanse) on tiny models: a planted BadNets backdoor and its clean twin for
SS/AC/CI, the shared invariants of every registered cleanser, results as JSON, and bad input.

The data are tiny 16×16 "template" images: every class is a fixed smooth colour field plus pixel noise, so
a clean class is one compact cluster of features and a poison cluster is the only structure to find. The
planted trigger is a 5×5 one-pixel checkerboard, which a 3×3 blur destroys (Cluster Impurity's premise).
"""

from __future__ import annotations

import copy
import functools
import json
import pickle
from dataclasses import dataclass

import pytest
import torch

from guard.attacks import create_attack
from guard.cleanse import (ActivationClusteringConfig, CleanseResult, Cleanser, ClusterImpurityConfig,
                           SpectralSignaturesConfig, box_blur, cleanser_from_dict, create_cleanser, describe_cleansers,
                           extract_features, get_cleanser, list_cleansers, register_cleanser, suspect_from_record)
from guard.data import ImageTensorDataset
from guard.metrics import cleansing_rates
from guard.models import GuardModel, create
from guard.train import TrainConfig, train

CLASSES = 5
TARGET = 0


def templates(n: int, seed: int, classes: int = CLASSES, noise: float = 0.1, size: int = 16) -> ImageTensorDataset:
    """Class c = a fixed smooth random colour field (the same for every seed) + Gaussian pixel noise."""
    coarse = torch.rand(classes, 3, 4, 4, generator=torch.Generator().manual_seed(1234))
    fields = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.arange(n) % classes
    x = fields[labels] + noise * torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return ImageTensorDataset((x.clamp(0, 1) * 255).round().to(torch.uint8), labels,
                              tuple(f"c{i}" for i in range(classes)))


def trained(data: ImageTensorDataset, seed: int, epochs: int = 5) -> GuardModel:
    """A tiny ResNet trained without augmentation (RE's Step 0, and what the other methods inspect)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create("tiny_resnet", num_classes=data.num_classes)
    train(model, data, TrainConfig.scratch(epochs=epochs, lr=0.05, batch_size=64, augment=False),
          generator=torch.Generator().manual_seed(seed), progress=False)
    return model


@dataclass(frozen=True)
class Suspects:
    poisoned_model: GuardModel
    poisoned: ImageTensorDataset
    poison_indices: torch.Tensor
    record: dict
    clean_set: ImageTensorDataset
    clean_model: GuardModel


@functools.lru_cache(maxsize=2)
def badnets_suspects(seed: int = 0) -> Suspects:
    """8 % of a 1000-image set poisoned with a 5×5 checkerboard → class 0, and the clean twin."""
    clean_set = templates(1000, seed)
    attack = create_attack("badnets", target=TARGET, budget=0.08, patch_size=5)
    result = attack.poison(clean_set, torch.Generator().manual_seed(seed))
    record = {**result.record(), "seed": seed, "train_images": len(clean_set)}
    return Suspects(trained(result.dataset, seed), result.dataset, result.indices, record, clean_set,
                    trained(clean_set, seed))


#: settings at tiny scale. AC's silhouette threshold is chosen per architecture (Xiang: 0.29–0.52 for zero
#: false detections); the tiny model's clean classes reach 0.42 and the poisoned target class 0.64–0.70
#: (5 seeds), so 0.5 sits between them. SS is given the target and the poison count (Xiang's comparison).
TINY = {
    "ac": {"silhouette_threshold": 0.5},
    "ci": {"max_components": 3, "n_init": 1},
    "ss": {"target": TARGET, "eps": 80 / (1.5 * 280)},
}


def tiny_cleanser(name: str) -> Cleanser:
    return create_cleanser(name, **TINY.get(name, {}))


# ------------------------------------------------------------------------------------------ registry, configs

def test_registry_lists_every_method_and_refuses_duplicates():
    assert {"ac", "ci", "ss"} <= set(list_cleansers())
    described = describe_cleansers()
    assert set(described) == set(list_cleansers())
    assert described["ac"]["options"]["dims"] == 10 and described["ci"]["options"]["blur_size"] == 3
    with pytest.raises(ValueError, match="already registered"):
        register_cleanser(type("Again", (Cleanser,), {"name": "ac"}))
    with pytest.raises(ValueError, match="unknown cleanser 'nope'"):
        get_cleanser("nope")


@pytest.mark.parametrize("name", list_cleansers())
def test_config_pickles_and_the_cleanser_takes_config_or_fields(name):
    cls = get_cleanser(name)
    config = tiny_cleanser(name).config
    assert pickle.loads(pickle.dumps(config)) == config
    assert cls(config).config == config
    with pytest.raises(TypeError, match="either a config or keyword options"):
        cls(config, batch_size=3)
    with pytest.raises(TypeError, match=f"needs a {cls.config_class.__name__}"):
        cls(object())


BAD_OPTIONS = [
    ("ss", {"eps": 0.0}, "eps"), ("ss", {"eps": 1.5}, "eps"), ("ss", {"target": -1}, "target"),
    ("ac", {"dims": 0}, "dims"), ("ac", {"reduction": "tsne"}, "reduction"),
    ("ac", {"silhouette_threshold": 1.0}, "silhouette_threshold"), ("ac", {"size_threshold": 1.0}, "size_threshold"),
    ("ac", {"n_init": True}, "n_init"), ("ci", {"impurity_threshold": 0}, "impurity_threshold"),
    ("ci", {"max_components": 1}, "max_components"), ("ci", {"blur_size": 4}, "blur_size"),
    ("ci", {"reg_covar": -1.0}, "reg_covar"), ("ac", {"batch_size": 0}, "batch_size"),
]


@pytest.mark.parametrize("name, options, match", BAD_OPTIONS, ids=[f"{n}-{next(iter(o))}" for n, o, _ in BAD_OPTIONS])
def test_bad_options_are_refused_clearly(name, options, match):
    with pytest.raises(ValueError, match=match):
        create_cleanser(name, **options)


# ------------------------------------------------------------------------------------ outcomes on tiny models

def test_ac_flags_the_target_and_removes_only_poisons():
    s = badnets_suspects()
    result = tiny_cleanser("ac").cleanse(s.poisoned_model, s.poisoned, generator=torch.Generator().manual_seed(0))
    assert result.detected and result.target_class == TARGET
    assert result.statistic["value"] > 0.6 > 0.5  # 0.64–0.70 over 5 seeds
    poisons = torch.isin(result.removed, s.poison_indices)
    assert result.removed.numel() >= 20 and poisons.double().mean() >= 0.9
    assert result.class_statistics[TARGET]["smaller_cluster_fraction"] < 0.35


def test_ci_removes_the_blur_impure_poison_component():
    s = badnets_suspects()
    result = tiny_cleanser("ci").cleanse(s.poisoned_model, s.poisoned, generator=torch.Generator().manual_seed(0))
    assert result.detected and result.target_class == TARGET
    assert result.class_scores[TARGET] > 0.9   # the poison component changes label under blur (1.0, 5 seeds)
    tpr, fpr = cleansing_rates(result.removed, s.poison_indices, s.poisoned.labels, TARGET)
    assert tpr >= 0.4 and fpr <= 0.02
    assert result.class_statistics[TARGET]["components"] >= 2


def test_ss_removes_mostly_poisons_from_the_known_target():
    s = badnets_suspects()
    result = tiny_cleanser("ss").cleanse(s.poisoned_model, s.poisoned, generator=torch.Generator().manual_seed(0))
    assert result.detected is None and result.target_class is None  # SS makes no verdict
    assert result.removed.numel() == 80
    assert torch.isin(result.removed, s.poison_indices).double().mean() >= 0.6  # 0.69–0.76 over 5 seeds
    assert (s.poisoned.labels[result.removed] == TARGET).all()


@pytest.mark.parametrize("name", ["ac", "ci"])
def test_nothing_alarming_on_the_clean_twin(name):
    s = badnets_suspects()
    result = tiny_cleanser(name).cleanse(s.clean_model, s.clean_set, generator=torch.Generator().manual_seed(0))
    assert not result.detected and result.target_class is None and result.removed.numel() == 0
    assert result.statistic["value"] < result.statistic["threshold"] - 0.05


def test_ss_removes_its_quota_of_every_class_without_a_target():
    s = badnets_suspects()
    result = create_cleanser("ss", eps=0.1).cleanse(s.clean_model, s.clean_set)
    counts = torch.bincount(s.clean_set.labels[result.removed], minlength=CLASSES)
    assert counts.tolist() == [30] * CLASSES  # ⌈1.5 · 0.1 · 200⌉ per class


# ------------------------------------------------------------------------------------- shared invariants

@pytest.mark.parametrize("name", list_cleansers())
def test_model_untouched_and_deterministic_under_a_generator(name):
    s = badnets_suspects()
    model = s.poisoned_model
    before = copy.deepcopy(model.state_dict())
    runs = [tiny_cleanser(name).cleanse(model, s.poisoned, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert torch.equal(runs[0].removed, runs[1].removed)
    assert runs[0].class_scores == runs[1].class_scores and runs[0].detected == runs[1].detected


@pytest.mark.parametrize("name", list_cleansers())
def test_result_round_trips_as_json_and_cleanses_the_set(name, tmp_path):
    s = badnets_suspects()
    result = tiny_cleanser(name).cleanse(s.poisoned_model, s.poisoned, generator=torch.Generator().manual_seed(0))
    path = result.save(tmp_path / "report.json", model="tiny_resnet")
    data = json.loads(path.read_text())
    assert data["kind"] == "cleanse" and data["method"] == name and data["model"] == "tiny_resnet"
    assert data["num_removed"] == result.removed.numel() == len(data["removed"])
    loaded = CleanseResult.load(path)
    assert torch.equal(loaded.removed, result.removed) and loaded.detected == result.detected
    assert loaded.class_scores == pytest.approx(result.class_scores)
    kept = result.cleansed(s.poisoned)
    assert len(kept) == len(s.poisoned) - result.removed.numel()
    assert cleanser_from_dict(data["config"]).config == tiny_cleanser(name).config


def test_scan_report_view_carries_the_verdict_and_ss_has_none():
    s = badnets_suspects()
    result = tiny_cleanser("ac").cleanse(s.poisoned_model, s.poisoned, generator=torch.Generator().manual_seed(0))
    report = result.scan_report()
    assert report.method == "ac" and report.backdoored and report.flagged_class == TARGET
    assert report.scores == result.class_scores and report.threshold == 0.5
    ss = tiny_cleanser("ss").cleanse(s.poisoned_model, s.poisoned)
    with pytest.raises(ValueError, match="makes no verdict"):
        ss.scan_report()


# ------------------------------------------------------------------------------------------------ bad input

class _NoFeatures(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 16 * 16, CLASSES)

    def forward(self, x):
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("name", list_cleansers())
def test_bad_inputs_fail_clearly(name):
    s = badnets_suspects()
    cleanser = tiny_cleanser(name)
    relabelled = ImageTensorDataset(s.poisoned.images, s.poisoned.labels % 3, ("a", "b", "c"))
    with pytest.raises(ValueError, match="labelled with 3 classes .* but the model predicts 5"):
        cleanser.cleanse(s.poisoned_model, relabelled)
    empty_class = s.poisoned.subset((s.poisoned.labels != 2).nonzero().flatten())
    with pytest.raises(ValueError, match=r"at least \d+ training image\(s\); got 2 \('c2'\): 0"):
        cleanser.cleanse(s.poisoned_model, empty_class)
    with pytest.raises(TypeError, match=r"\.features\(x\) method .* _NoFeatures"):
        cleanser.cleanse(_NoFeatures(), s.poisoned)
    broken = copy.deepcopy(s.poisoned_model)
    with torch.no_grad():
        broken.classifier.weight.zero_()
        next(broken.net.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN/Inf for 1000 of 1000 images"):
        cleanser.cleanse(broken, s.poisoned)
    with pytest.raises(TypeError, match="ImageTensorDataset"):
        cleanser.cleanse(s.poisoned_model, [(torch.zeros(3, 16, 16), 0)])
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        cleanser.cleanse(s.poisoned_model, s.poisoned, generator=3)


def test_known_target_outside_the_classes_is_refused():
    s = badnets_suspects()
    for name in ("ss", "ac"):
        with pytest.raises(ValueError, match="target=7 is not a class"):
            create_cleanser(name, target=7).cleanse(s.poisoned_model, s.poisoned)


def test_suspect_set_is_rebuilt_from_a_poison_record_or_refused():
    s = badnets_suspects()
    rebuilt = suspect_from_record(s.record, s.clean_set)
    assert torch.equal(rebuilt.dataset.images, s.poisoned.images) and torch.equal(rebuilt.indices, s.poison_indices)
    with pytest.raises(ValueError, match="made on 1000 training images, got a set of 999"):
        suspect_from_record(s.record, s.clean_set.subset(range(999)))
    with pytest.raises(ValueError, match="poisons other images than the record"):
        suspect_from_record({**s.record, "seed": 1}, s.clean_set)
    with pytest.raises(ValueError, match="outside the 1000 training images"):
        suspect_from_record({**s.record, "indices": [5, 4000]}, s.clean_set)
    with pytest.raises(ValueError, match=r"lacks \['seed'\]"):
        suspect_from_record({k: v for k, v in s.record.items() if k != "seed"}, s.clean_set)


def test_features_are_batched_and_blur_is_a_box_filter():
    s = badnets_suspects()
    whole = extract_features(s.poisoned_model, s.poisoned, batch_size=1000)
    pieces = extract_features(s.poisoned_model, s.poisoned, batch_size=7)
    assert torch.allclose(whole.features, pieces.features, atol=1e-5)
    assert torch.equal(whole.predictions, s.poisoned_model(s.poisoned.images.float() / 255).argmax(1))
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 9.0
    blurred = box_blur(x)
    assert blurred[0, 0, 1:4, 1:4].eq(1.0).all() and blurred[0, 0, 0, 0] == 0
    assert box_blur(torch.ones(1, 3, 4, 4)).eq(1).all()  # borders average only the pixels they cover


def test_configs_document_the_seed_settings():
    assert ActivationClusteringConfig().dims == 10 and ActivationClusteringConfig().size_threshold == 0.35
    assert ClusterImpurityConfig().max_components == 10 and ClusterImpurityConfig().impurity_threshold == 0.65
    assert SpectralSignaturesConfig().eps == 0.1
