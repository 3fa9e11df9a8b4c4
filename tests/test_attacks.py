"""guard.attacks: the trigger primitives, the registry, and the promises of every backdoor's poisoned set."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch

from guard.attacks import (AttackConfig, BackdoorAttack, SupplyChainAttack, TargetedAttack, attack_from_record,
                           create_attack, describe_attacks, get_attack, list_attacks, load_record, parse_options,
                           register_attack, save_record)
from guard.attacks.primitives import (add_clip, blend, checkerboard, mask_blend, patch_box, quantize, stamp,
                                      to_uint8, warp)
from guard.data import ImageTensorDataset
from guard.models import create, save_weights
from guard.train import TrainConfig, train

N, K, SIZE = 200, 10, 16


def dataset(seed: int = 0, n: int = N) -> ImageTensorDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(30, 226, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    return ImageTensorDataset(images, torch.arange(n) % K, [f"c{i}" for i in range(K)])


@pytest.fixture(scope="module")
def clean() -> ImageTensorDataset:
    return dataset()


#: per attack: options for the tiny 10-class set (20 images per class)
OPTIONS = {
    "badnets": {"num_poisons": 10}, "c-badnets": {"num_poisons": 10}, "blend": {"num_poisons": 10},
    "sig": {"num_poisons": 10}, "wanet": {"num_poisons": 10}, "adaptive-blend": {"num_poisons": 10},
    "adaptive-patch": {"num_poisons": 10}, "refool": {"num_poisons": 10}, "instagram": {"num_poisons": 10},
    "dfst": {"num_poisons": 10}, "tsb": {"num_poisons": 10}, "xiang": {"per_source": 6, "num_sources": 3},
    "issba": {"num_poisons": 10, "steps": 20, "width": 8},
    "adv": {"num_poisons": 10, "surrogate": "tiny_resnet"},  # + the trained surrogate of adv_surrogate()
    "pcb": {"target": 1, "patch_size": 3, "batch_fraction": 0.2},
    "rescaler-aware": {"target": 1, "patch_size": 3, "batch_fraction": 0.2, "evade_weight": 1.0},
}
#: data-poisoning backdoors (PCB controls training instead: supply-chain)
BACKDOORS = list_attacks("backdoor")
SUPPLY_CHAIN = list_attacks("supply-chain")
TINY_TRAINING = TrainConfig(epochs=1, lr=0.05, batch_size=50, augment=False)
#: attacks whose training-time trigger equals the test-time trigger, with no per-image randomness
DETERMINISTIC = ["badnets", "c-badnets", "blend", "sig", "wanet", "refool", "instagram", "dfst", "xiang", "issba",
                 "adv"]


@pytest.fixture(scope="module", autouse=True)
def adv_surrogate(tmp_path_factory):
    """adv refuses an untrained independent model: a tiny ResNet fitted briefly on another tiny set."""
    model = create("tiny_resnet", generator=torch.Generator().manual_seed(0))
    train(model, dataset(seed=5), TrainConfig(epochs=3, lr=0.05, batch_size=50, augment=False),
          generator=torch.Generator().manual_seed(0), progress=False)
    path = save_weights(model, tmp_path_factory.mktemp("adv") / "surrogate.pt")
    OPTIONS["adv"]["surrogate_weights"] = str(path)
    return path


def make(name: str, **extra):
    attack = create_attack(name, **{**OPTIONS[name], **extra})
    if name == "issba":  # its trigger comes from an encoder fitted on the victim's training images
        attack.fit(dataset().images)
    return attack


def poison(name: str, clean: ImageTensorDataset, seed: int = 0, **extra):
    attack = make(name, **extra)
    return attack, attack.poison(clean, torch.Generator().manual_seed(seed))


def test_every_backdoor_has_test_options():
    assert set(BACKDOORS) <= set(OPTIONS), f"add options for {set(BACKDOORS) - set(OPTIONS)}"
    for name in ("badnets", "c-badnets", "blend", "sig", "wanet", "adaptive-blend", "adaptive-patch", "refool",
                 "instagram", "xiang", "tsb", "dfst"):
        assert name in BACKDOORS


# ----------------------------------------------------------------------------------------- primitives

def test_stamp_opaque_and_translucent():
    x = torch.full((2, 3, 8, 8), 0.5)
    patch = torch.ones(3, 2, 2)
    out = stamp(x, patch, 1, 5)
    assert torch.equal(out[:, :, 1:3, 5:7], torch.ones(2, 3, 2, 2))
    out[:, :, 1:3, 5:7] = 0.5
    assert torch.equal(out, x), "only the rectangle may change"
    half = stamp(x, patch, torch.tensor([0, 6]), torch.tensor([0, 6]), alpha=0.5)
    assert torch.allclose(half[0, :, :2, :2], torch.full((3, 2, 2), 0.75))
    assert torch.allclose(half[1, :, 6:, 6:], torch.full((3, 2, 2), 0.75))
    masked = stamp(x, patch, 0, 0, mask=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert masked[0, 0, 0, 0] == 1 and masked[0, 0, 0, 1] == 0.5
    assert torch.equal(x, torch.full((2, 3, 8, 8), 0.5)), "inputs are never modified"
    with pytest.raises(ValueError, match="does not fit"):
        stamp(x, torch.ones(3, 9, 9), 0, 0)
    with pytest.raises(ValueError, match="inside"):
        stamp(x, patch, 7, 0)


def test_blend_mask_blend_add_clip_warp_quantize():
    x = torch.rand(3, 3, 8, 8)
    key = torch.rand(3, 8, 8)
    assert torch.allclose(blend(x, key, 0.2), 0.8 * x + 0.2 * key)
    mask = torch.zeros(8, 8)
    mask[2:4, 2:4] = 1
    mb = mask_blend(x, mask, key)
    assert (torch.allclose(mb[:, :, 2:4, 2:4], key[:, 2:4, 2:4].expand(3, 3, 2, 2))
            and torch.equal(mb[:, :, 5:], x[:, :, 5:]))
    assert add_clip(torch.ones(1, 3, 2, 2), torch.ones(3, 2, 2)).max() == 1
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    assert torch.allclose(warp(x, torch.stack((xs, ys), -1)), x, atol=1e-5), "identity grid = identity warp"
    q = quantize(torch.tensor([0.0, 0.3, 1.2, -0.1]))
    assert torch.allclose(q * 255, (q * 255).round()) and q.min() == 0 and q.max() == 1
    assert to_uint8(torch.tensor([0.5 / 255 + 1e-4, 1.0])).tolist() == [1, 255]
    assert checkerboard(3, 1)[0].tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert patch_box((32, 32), (3, 3), "bottom-right") == (29, 29)
    with pytest.raises(ValueError, match="does not fit"):
        patch_box((4, 4), (5, 5), "top-left")


# ------------------------------------------------------------------------- invariants of every backdoor

@pytest.mark.parametrize("name", BACKDOORS)
def test_poisoned_set_keeps_its_promises(name, clean):
    attack, result = poison(name, clean)
    cfg = attack.config
    data = result.dataset
    m = OPTIONS[name].get("num_poisons") or cfg.per_source * len(cfg.sources)
    assert result.indices.numel() == m == len(set(result.indices.tolist()))
    assert torch.equal(result.indices, result.indices.sort().values)
    assert torch.equal(result.original_labels, clean.labels[result.indices])
    assert not set(result.indices.tolist()) & set(result.cover_indices.tolist())
    # labels: poison-label -> target on the poisons only; clean-label -> nothing changes, poisons are target class
    changed_labels = (data.labels != clean.labels).nonzero().flatten()
    if attack.clean_label:
        assert changed_labels.numel() == 0
        assert bool((result.original_labels == cfg.target).all())
    else:
        assert bool((data.labels[result.indices] == cfg.target).all())
        assert bool((result.original_labels != cfg.target).all())
        assert set(changed_labels.tolist()) == set(result.indices.tolist())
    # pixels: only poisons and covers differ from the clean set
    modified = (data.images != clean.images).flatten(1).any(1)
    touched = torch.zeros(len(clean), dtype=torch.bool)
    touched[result.indices] = True
    touched[result.cover_indices] = True
    assert not bool((modified & ~touched).any()), "an image outside the record changed"
    assert int(modified[result.indices].sum()) >= m - 1, "poisons must carry the trigger"
    assert data.images.dtype == torch.uint8 and clean.images is not data.images
    # the record is JSON and matches
    record = json.loads(json.dumps(result.record()))
    assert record["attack"] == name and record["indices"] == result.indices.tolist()
    assert record["original_labels"] == result.original_labels.tolist()
    assert record["poisoned_labels"] == data.labels[result.indices].tolist()
    assert record["num_poisons"] == m


@pytest.mark.parametrize("name", BACKDOORS)
def test_determinism_under_the_same_generator(name, clean):
    _, a = poison(name, clean, seed=3)
    _, b = poison(name, clean, seed=3)
    _, c = poison(name, clean, seed=4)
    assert torch.equal(a.dataset.images, b.dataset.images) and torch.equal(a.indices, b.indices)
    assert torch.equal(a.cover_indices, b.cover_indices)
    assert not torch.equal(a.indices, c.indices)


def test_every_attack_has_a_verb_and_a_record_test():
    assert set(BACKDOORS + SUPPLY_CHAIN + list_attacks("targeted")) == set(list_attacks())
    assert set(SUPPLY_CHAIN) <= set(OPTIONS), f"add options for {set(SUPPLY_CHAIN) - set(OPTIONS)}"
    assert all(issubclass(get_attack(n), BackdoorAttack) for n in BACKDOORS)
    assert all(issubclass(get_attack(n), SupplyChainAttack) for n in SUPPLY_CHAIN)


def run_and_record(name: str, clean: ImageTensorDataset, path):
    """What ``guard poison`` does: poison (a supply-chain attack: train a tiny model), then save the record."""
    attack = create_attack(name, **OPTIONS[name])
    generator = torch.Generator().manual_seed(0)
    if isinstance(attack, SupplyChainAttack):
        model = create("tiny_resnet", generator=torch.Generator().manual_seed(0))
        attack.train(model, clean, TINY_TRAINING, generator=generator, progress=False)
        record = attack.record()
    else:
        record = attack.poison(clean, generator).record()
    return attack, save_record(record, path, attack)


@pytest.mark.parametrize("name", BACKDOORS + SUPPLY_CHAIN)
def test_record_rebuilds_the_attack_exactly(name, clean, tmp_path):
    """The attack rebuilt from its record (as ``guard eval --attack-record`` does) triggers test images exactly
    as the attack that poisoned; whatever it holds beyond its config travels beside the record."""
    attack, path = run_and_record(name, clean, tmp_path / "run.pt.json")
    assert pickle.loads(pickle.dumps(attack.config)) == attack.config
    record = json.loads(path.read_text())
    assert ("state" in record) == bool(attack.state_dict()) == (name in ("issba", "adv"))
    rebuilt = load_record(path)
    assert type(rebuilt) is type(attack) and rebuilt.config == attack.config
    test = dataset(seed=1, n=40)
    x = test.images.float() / 255
    assert torch.equal(rebuilt.apply_trigger(x), attack.apply_trigger(x))
    assert torch.equal(rebuilt.triggered(test).images, attack.triggered(test).images)


def test_issba_record_carries_the_fitted_encoder_and_checks_it(clean, tmp_path):
    attack, path = run_and_record("issba", clean, tmp_path / "run.pt.json")
    record = json.loads(path.read_text())
    state = tmp_path / record["state"]["file"]
    assert state.name == "run.pt.attack.safetensors" and state.is_file()
    with pytest.raises(ValueError, match="before applying the trigger"):
        attack_from_record(record).apply_trigger(clean.images[:2].float() / 255)  # the config alone is not enough
    state.write_bytes(state.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="changed since the record was written"):
        load_record(path)
    state.unlink()
    with pytest.raises(FileNotFoundError, match="state file .* is missing"):
        load_record(path)


def test_adv_record_carries_its_surrogate(clean, tmp_path, adv_surrogate):
    weights = tmp_path / "gone.pt"
    weights.write_bytes(adv_surrogate.read_bytes())
    attack = create_attack("adv", **{**OPTIONS["adv"], "surrogate_weights": str(weights)})
    path = save_record(attack.poison(clean, torch.Generator().manual_seed(0)).record(), tmp_path / "r.json", attack)
    weights.unlink()
    x = clean.images[:6].float() / 255
    assert torch.equal(load_record(path).apply_trigger(x), attack.apply_trigger(x))


@pytest.mark.parametrize("name", [n for n in DETERMINISTIC if n in BACKDOORS])
def test_poisons_carry_the_test_trigger(name, clean):
    attack, result = poison(name, clean)
    expected = attack.triggered(clean.subset(result.indices))
    assert torch.equal(result.dataset.images[result.indices], expected.images)


@pytest.mark.parametrize("name", BACKDOORS)
def test_triggered_set_keeps_labels_and_is_batch_independent(name, clean):
    attack = make(name)
    small = clean.subset(range(40))
    a = attack.triggered(small, batch_size=7)
    b = attack.triggered(small)
    assert torch.equal(a.labels, small.labels)
    if name in DETERMINISTIC:
        assert torch.equal(a.images, b.images)
    assert (a.images != small.images).any()


# ------------------------------------------------------------------------ attack-specific geometry / bounds

def test_badnets_patch_location_and_l0(clean):
    attack, result = poison("badnets", clean, location="bottom-right", patch_size=3)
    diff = (result.dataset.images[result.indices].int() - clean.images[result.indices].int()).abs().amax(1)
    assert bool((diff[:, :SIZE - 3, :] == 0).all()) and bool((diff[:, :, :SIZE - 3] == 0).all())
    patch = result.dataset.images[result.indices][:, :, SIZE - 3:, SIZE - 3:]
    assert torch.equal(patch, (checkerboard(3) * 255).to(torch.uint8).expand_as(patch))
    _, top = poison("badnets", clean, location=(2, 5), patch_size=4)
    d = (top.dataset.images[top.indices] != clean.images[top.indices]).any(1)
    assert not d[:, :2].any() and not d[:, 6:].any() and not d[:, :, :5].any() and not d[:, :, 9:].any()


def test_c_badnets_poisons_only_the_target_class(clean):
    attack, result = poison("c-badnets", clean, target=4)
    assert set(clean.labels[result.indices].tolist()) == {4}


@pytest.mark.parametrize("name, bound", [("blend", 0.2), ("adaptive-blend", 0.2), ("sig", 20 / 255)])
def test_linf_bounds(name, bound, clean):
    _, result = poison(name, clean)
    idx = torch.cat([result.indices, result.cover_indices])
    diff = (result.dataset.images[idx].float() - clean.images[idx].float()).abs().max() / 255
    assert diff <= bound + 0.5 / 255 + 1e-6


def test_sig_signal_is_a_column_sinusoid(clean):
    attack = make("sig", delta=20.0, frequency=6.0)
    x = torch.full((1, 3, SIZE, SIZE), 0.5)
    v = (attack.apply_trigger(x) - x)[0] * 255
    expected = 20 * torch.sin(2 * torch.pi * torch.arange(SIZE) * 6 / SIZE)
    assert torch.allclose(v, expected.expand(3, SIZE, SIZE), atol=1e-4)


def test_adaptive_patch_occludes_at_poisoning_only(clean):
    attack, result = poison("adaptive-patch", clean, num_poisons=20, patch_size=4, grid=2)
    full = attack.triggered(clean.subset(result.indices)).images
    poisoned = result.dataset.images[result.indices]
    assert not torch.equal(poisoned, full), "some squares must be occluded at poisoning time"
    assert result.cover_indices.numel() == 20, "conservatism 0.5 -> as many cover samples as payload"
    assert torch.equal(result.dataset.labels[result.cover_indices], clean.labels[result.cover_indices])
    d = (torch.cat([poisoned, result.dataset.images[result.cover_indices]]).int()
         - clean.images[torch.cat([result.indices, result.cover_indices])].int()).abs().amax(1)
    assert not d[:, :SIZE - 4].any() and not d[:, :, :SIZE - 4].any(), "the patch stays in its corner"


def test_tsb_stamps_one_trigger_per_poison_and_all_at_test(clean):
    attack, result = poison("tsb", clean, num_triggers=4, patch_size=2)
    changed = (result.dataset.images[result.indices] != clean.images[result.indices]).any(1).flatten(1).sum(1)
    assert bool((changed <= 4).all()), "one 2x2 trigger per poison"
    test = (attack.triggered(clean.subset(range(20))).images != clean.images[:20]).any(1).flatten(1).sum(1)
    assert bool((test > 4).any()), "all k triggers at test time"


def test_wanet_noise_samples_keep_labels_and_differ(clean):
    attack, result = poison("wanet", clean, cross_ratio=2.0)
    assert result.cover_indices.numel() == 20
    assert torch.equal(result.dataset.labels[result.cover_indices], clean.labels[result.cover_indices])
    exact = attack.triggered(clean.subset(result.cover_indices)).images
    assert not torch.equal(exact, result.dataset.images[result.cover_indices])


@pytest.mark.parametrize("pattern, linf, l0_max", [("A", 2, None), ("B", 3, None), ("C", 70, 5), ("D", 80, 9),
                                                   ("E", 96, 4), ("F", 70, 4)])
def test_xiang_patterns(pattern, linf, l0_max, clean):
    attack = create_attack("xiang", pattern=pattern, num_sources=1, per_source=5)
    x = torch.full((1, 3, SIZE, SIZE), 0.5)
    v = (attack.apply_trigger(x) - x)[0] * 255
    assert v.abs().max().round() <= linf and v.abs().max().round() >= (80 if pattern == "E" else linf)
    if l0_max is not None:
        assert int((v.abs() > 0).any(0).sum()) <= l0_max
    if pattern == "A":
        assert int((v[0] > 0).sum()) == SIZE * SIZE // 2
    result = attack.poison(clean, torch.Generator().manual_seed(0))
    cfg = attack.config
    assert set(clean.labels[result.indices].tolist()) <= set(cfg.sources)


def test_xiang_defaults_follow_table_5():
    a = create_attack("xiang", pattern="D", num_sources=3).config
    assert (a.target, a.sources, a.per_source) == (3, (7, 8, 9), 200)
    nine = create_attack("xiang", pattern="A", num_sources=9).config
    assert nine.target == 9 and nine.sources == tuple(range(9)) and nine.per_source == 60
    with pytest.raises(ValueError, match="distinct classes other than target"):
        create_attack("xiang", target=2, sources=(2, 3))


def test_xiang_per_source_counts(clean):
    _, result = poison("xiang", clean, per_source=6, num_sources=3)
    counts = torch.bincount(result.original_labels, minlength=K)
    assert counts[[1, 4, 7]].tolist() == [6, 6, 6] and int(counts.sum()) == 18


def test_adv_needs_a_trained_surrogate():
    with pytest.raises(ValueError, match=r"adv needs surrogate_weights: .* trained independent model.*"
                                         r"surrogate_weights=PATH"):
        create_attack("adv")


def test_adv_trigger_is_a_bounded_targeted_perturbation_on_the_surrogate(clean, tmp_path):
    attack = make("adv", adv_class=3)
    x = clean.images[:12].float() / 255
    y = attack.apply_trigger(x)
    assert (y - x).abs().max() <= 8 / 255 + 1e-6 and (y - x).abs().amax(dim=(1, 2, 3)).min() > 0
    surrogate = attack.surrogate_model()
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(surrogate(x), torch.full((12,), 3), reduction="none")
        after = torch.nn.functional.cross_entropy(surrogate(y), torch.full((12,), 3), reduction="none")
    assert bool((after < before).all()), "every image moves toward adv_class on the surrogate"
    # the trigger is per image: the same perturbation is not added to every image
    delta = y - x
    assert not torch.allclose(delta[0], delta[1])
    # a surrogate from a weights file; a missing file and a class the surrogate lacks fail clearly
    weights = save_weights(create("tiny_resnet", generator=torch.Generator().manual_seed(1)), tmp_path / "other.pt")
    assert make("adv", surrogate_weights=str(weights)).apply_trigger(x[:2]).shape == x[:2].shape
    with pytest.raises(FileNotFoundError, match="surrogate_weights file not found"):
        make("adv", surrogate_weights=str(tmp_path / "none.pt")).apply_trigger(x[:2])
    with pytest.raises(ValueError, match=r"adv_class=12 is not a class of the surrogate 'tiny_resnet' \(10"):
        make("adv", adv_class=12).apply_trigger(x[:2])


def test_issba_residual_is_bounded_sample_specific_and_needs_fitting(clean):
    attack = create_attack("issba", steps=30, width=8)
    x = clean.images[:6].float() / 255
    with pytest.raises(ValueError, match="or loaded from a run's record .* before applying the trigger"):
        attack.apply_trigger(x)
    result = attack.poison(clean, torch.Generator().manual_seed(0))
    assert 0 <= result.record()["encoder_bit_accuracy"] <= 1
    r = attack.apply_trigger(x) - x
    assert float(r.abs().max()) <= 8 / 255 + 1e-6 and float(r.abs().max()) > 0
    assert not torch.allclose(r[0], r[1], atol=1e-4), "the residual depends on the image"
    with pytest.raises(ValueError, match="uint8 RGB images"):
        attack.fit(x)


def test_issba_loss_is_bce_plus_the_residual_energy():
    """ALGORITHMS.md A13: L = BCE(decoder(clip(x + r)), s) + λ·‖r‖², ‖r‖² summed over an image's pixels."""
    from guard.attacks.issba import _Decoder, _Encoder, _build, stega_loss

    g = torch.Generator().manual_seed(0)
    encoder, decoder = _build(lambda: _Encoder(8, 4, 8 / 255), g), _build(lambda: _Decoder(8, 4, (16, 16)), g)
    x, secret = torch.rand(5, 3, 16, 16, generator=g), torch.randint(0, 2, (5, 8), generator=g).float()
    with torch.no_grad():
        loss, logits, energy = stega_loss(encoder, decoder, x, secret, 0.0)
        r = encoder(x, secret)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(decoder((x + r).clamp(0, 1)), secret)
        weighted, _, _ = stega_loss(encoder, decoder, x, secret, 3.0)
    assert energy.item() == pytest.approx(float((r ** 2).sum()) / 5, rel=1e-5) and energy.item() > 0
    assert loss.item() == pytest.approx(bce.item(), rel=1e-5)
    assert weighted.item() == pytest.approx(loss.item() + 3.0 * energy.item(), rel=1e-5)


def test_issba_residual_shrinks_as_its_weight_grows():
    """Once the decoder reads the secret, the ‖r‖² term shrinks the residual (λ = 0: the ℓ∞ bound alone)."""
    images = dataset(seed=2).images
    x = images[:40].float() / 255
    energy = {}
    for weight in (0.0, 1.0):
        attack = create_attack("issba", bits=4, width=8, steps=200, lr=3e-3, residual_weight=weight)
        accuracy = attack.fit(images)
        assert accuracy >= 0.75 and attack.residual_from is not None, "the decoder must have learnt the code"
        energy[weight] = float(((attack.apply_trigger(x) - x) ** 2).flatten(1).sum(1).mean())
    # measured over 5 seeds: ‖r‖² ≈ 0.73 without the term, 0.22-0.23 with it (ratio <= 0.32); bits >= 0.90
    assert energy[1.0] < 0.5 * energy[0.0], energy


def test_filters_change_colour_not_geometry(clean):
    for name in ("instagram", "dfst"):
        attack = make(name)
        x = clean.images[:4].float() / 255
        y = attack.apply_trigger(x)
        assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
        assert (y - x).abs().mean() > 0.02
    for f in ("gotham", "nashville", "kelvin", "lomo", "toaster"):
        y = create_attack("instagram", filter=f).apply_trigger(torch.rand(2, 3, 8, 8))
        assert torch.isfinite(y).all()


# --------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("name, options, error, match", [
    ("badnets", {"budget": 1.5}, ValueError, r"budget must be in \(0.0, 1.0\], got 1.5"),
    ("badnets", {"budget": 0.0}, ValueError, r"budget must be in \(0.0, 1.0\], got 0.0"),
    ("badnets", {"budget": "0.1"}, TypeError, "budget must be a finite number"),
    ("badnets", {"target": -1}, ValueError, "target must be an int"),
    ("badnets", {"num_poisons": 0}, ValueError, "num_poisons"),
    ("badnets", {"pattern": "apple"}, ValueError, "pattern must be one of"),
    ("badnets", {"location": "middle"}, ValueError, "location must be one of"),
    ("blend", {"alpha": 0.0}, ValueError, r"alpha must be in \(0.0"),
    ("adaptive-patch", {"grid": 5, "patch_size": 3}, ValueError, "grid=5 must not exceed patch_size=3"),
    ("adaptive-blend", {"conservatism": 1.0}, ValueError, "conservatism must be < 1"),
    ("wanet", {"k": 1}, ValueError, "k must be an int"),
    ("instagram", {"filter": "sepia"}, ValueError, "filter must be one of"),
    ("xiang", {"pattern": "G"}, ValueError, "pattern must be one of"),
    ("xiang", {"num_sources": 2}, ValueError, "num_sources must be one of"),
    ("badnets", {"bogus": 1}, TypeError, "bogus"),
    ("adv", {"surrogate": "resnet7"}, ValueError, "unknown model 'resnet7'"),
    ("adv", {"steps": 0}, ValueError, "steps must be an int"),
    # options an attack would ignore are refused, naming the attack, the option and why
    ("pcb", {"budget": 0.1}, ValueError, "attack 'pcb' refuses option budget=0.1: pcb never modifies the training"),
    ("pcb", {"num_poisons": 5}, ValueError, "attack 'pcb' refuses option num_poisons=5"),
    ("xiang", {"budget": 0.1}, ValueError, "attack 'xiang' refuses option budget=0.1: .* set per_source instead"),
    ("sig", {"seed": 3}, ValueError, "attack 'sig' refuses option seed=3: .* nothing is drawn at random"),
    ("instagram", {"seed": 1}, ValueError, "attack 'instagram' refuses option seed=1"),
    ("dfst", {"seed": 1}, ValueError, "attack 'dfst' refuses option seed=1"),
    ("clbd", {"layers": ("layer1",)}, ValueError, r"attack 'clbd' refuses option layers=\('layer1',\): .* PGD"),
    ("htbd", {"layers": ("layer1",)}, ValueError, "attack 'htbd' refuses option layers=.*penultimate features only"),
    ("fc", {"seed": 2}, ValueError, "attack 'fc' refuses option seed=2: fc has no trigger"),
    ("cp", {"seed": 2}, ValueError, "attack 'cp' refuses option seed=2"),
    ("bp", {"seed": 2}, ValueError, "attack 'bp' refuses option seed=2"),
    ("fc", {"adapted_aim": 1.5}, ValueError, r"adapted_aim must be in \[0.0, 1.0\], got 1.5"),
    ("bp", {"rescaler_eps": 0.0}, ValueError, r"rescaler_eps must be in \(0.0, 1.0\], got 0.0"),
    ("cp", {"rescaler_alpha": -1.0}, ValueError, r"rescaler_alpha must be > 0.0, got -1.0"),
    ("clbd", {"adapted_aim": 1.0}, TypeError, "adapted_aim"),
])
def test_bad_configs_fail_clearly(name, options, error, match):
    with pytest.raises(error, match=match):
        create_attack(name, **options)


def test_bad_poisoning_calls_fail_clearly(clean):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"target=12 is not a class of this dataset: expected 0..9"):
        create_attack("badnets", target=12).poison(clean, g)
    with pytest.raises(ValueError, match=r"patch of size 17x17 does not fit in a 16x16 image"):
        create_attack("badnets", patch_size=17).poison(clean, g)
    with pytest.raises(ValueError, match="only 20 target-class images"):
        create_attack("sig", num_poisons=21).poison(clean, g)
    with pytest.raises(ValueError, match=r"exceeds the 200 training images"):
        create_attack("badnets", num_poisons=201).poison(clean, g)
    with pytest.raises(TypeError, match="ImageTensorDataset"):
        create_attack("badnets").poison(clean.images, g)
    with pytest.raises(TypeError, match="torch.Generator"):
        create_attack("badnets").poison(clean, 0)
    with pytest.raises(ValueError, match="sources \\[11\\] are not classes"):
        create_attack("xiang", target=0, sources=(11,), per_source=2).poison(clean, g)
    with pytest.raises(TypeError, match="pass either a config or keyword options"):
        get_attack("badnets")(create_attack("badnets").config, target=1)
    with pytest.raises(TypeError, match="needs a BadNetsConfig"):
        get_attack("badnets")(AttackConfig())
    with pytest.raises(ValueError, match="pixel values in \\[0, 1\\]"):
        create_attack("badnets").apply_trigger(torch.full((1, 3, 8, 8), 2.0))


# ----------------------------------------------------------------------------------- registry / options

def test_registry_refuses_duplicates_and_unknown_names():
    class Dup(BackdoorAttack):
        name = "badnets"

        def apply(self, x, params, generator):
            return x

    with pytest.raises(ValueError, match="already registered"):
        register_attack(Dup)
    with pytest.raises(ValueError, match="unknown attack 'nope'; expected one of"):
        get_attack("nope")
    assert "badnets" in list_attacks("backdoor") and "badnets" not in list_attacks("targeted")


class _Goal(TargetedAttack):
    def target_input(self, target_image):
        return target_image


@pytest.mark.parametrize("base, verbs", [(BackdoorAttack, ["apply"]), (SupplyChainAttack, ["train"]),
                                         (TargetedAttack, ["poison", "target_input"]), (_Goal, ["poison"])])
def test_base_classes_declare_their_verbs(base, verbs):
    """A subclass that leaves out its base's verb fails at instantiation, and the registry refuses it."""
    incomplete = type("Incomplete", (base,), {"name": "incomplete"})
    assert sorted(incomplete.__abstractmethods__) == verbs
    with pytest.raises(TypeError, match="abstract method"):
        incomplete()
    with pytest.raises(TypeError, match=f"attack 'incomplete' \\(Incomplete\\) does not implement {verbs[0]}"):
        register_attack(incomplete)
    assert "incomplete" not in list_attacks()


def test_refused_options_fail_on_every_path():
    with pytest.raises(ValueError, match="attack 'pcb' refuses option 'budget': pcb never modifies"):
        parse_options("pcb", ["budget=0.1"])
    with pytest.raises(ValueError, match="attack 'sig' refuses option seed=4"):
        parse_options("sig", ["seed=4"])
    assert parse_options("sig", ["seed=0"]).seed == 0, "a shared field at its default is no option set"
    record = {"attack": "xiang", "config": {"pattern": "A", "budget": 0.2}}
    with pytest.raises(ValueError, match="attack 'xiang' refuses option budget=0.2"):
        attack_from_record(record)
    with pytest.raises(ValueError, match="attack 'htbd' refuses option layers"):
        get_attack("htbd")(layers=())
    with pytest.raises(ValueError, match=r"has options \['colour'\] it does not know"):
        attack_from_record({"attack": "badnets", "config": {"colour": "red"}})
    for name, described in describe_attacks().items():  # guard info shows only what an attack uses
        assert not set(described["options"]) & set(get_attack(name).refused_options), name


def test_parse_options_types_and_errors():
    cfg = parse_options("badnets", ["target=3", "budget=1", "location=top-left", "patch_size=4"])
    assert (cfg.target, cfg.budget, cfg.location, cfg.patch_size) == (3, 1.0, "top-left", 4)
    assert isinstance(cfg.budget, float)
    assert parse_options("badnets", ["location=(2, 3)"]).location == (2, 3)
    assert parse_options("xiang", ["sources=2,5", "target=0"]).sources == (2, 5)
    assert parse_options("xiang", ["sources=4", "target=0"]).sources == (4,)
    assert parse_options("sig", ["test_delta=none"]).test_delta is None
    with pytest.raises(ValueError, match="has no option 'colour'"):
        parse_options("badnets", ["colour=red"])
    with pytest.raises(ValueError, match="expected key=value"):
        parse_options("badnets", ["target"])
    with pytest.raises(ValueError, match="given twice"):
        parse_options("badnets", ["target=1", "target=2"])
    with pytest.raises(ValueError, match="budget must be"):
        parse_options("badnets", ["budget=2"])


def test_config_is_frozen():
    cfg = create_attack("badnets").config
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.target = 3
