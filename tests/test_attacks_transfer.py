"""guard.attacks.transfer: clean-label transfer attacks keep their promises on a tiny surrogate."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from guard.attacks import AttackGoal, create_attack, list_attacks, load_record, make_goals, save_record
from guard.attacks.transfer import _greedy_match, _polytope_coefficients, _simplex_projection
from guard.data import ImageTensorDataset
from guard.models import create
from guard.rescaler import ReScaler
from outcomes import SEED, check

K, SIZE = 4, 16
FAST = {"fc": {"iterations": 8}, "cp": {"iterations": 8, "lr": 0.04}, "bp": {"iterations": 8, "lr": 0.04},
        "clbd": {"iterations": 5}, "htbd": {"iterations": 8, "lr": 0.05, "loss_stop": 0.0}}


def dataset(n: int, seed: int) -> ImageTensorDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(20, 236, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    return ImageTensorDataset(images, torch.arange(n) % K, [f"c{i}" for i in range(K)])


@pytest.fixture(scope="module")
def data():
    return dataset(80, SEED), dataset(20, SEED + 1000)


@pytest.fixture(scope="module")
def surrogate():
    return create("tiny_resnet", num_classes=K, generator=torch.Generator().manual_seed(SEED)).eval()


@pytest.fixture(scope="module")
def goal(data):
    train, test = data
    return make_goals(train, test, 1, 5, torch.Generator().manual_seed(SEED))[0]


def run(name, data, goal, surrogate, seed=0, **extra):
    train, test = data
    attack = create_attack(name, **{**FAST[name], **extra})
    target = test.images[goal.target_index].float() / 255
    return attack, attack.poison(train, goal, target, surrogate, torch.Generator().manual_seed(seed))


def test_registry_lists_the_transfer_attacks():
    assert set(list_attacks("targeted")) == {"fc", "cp", "bp", "clbd", "htbd"}


def test_make_goals_is_reproducible_and_consistent(data):
    train, test = data
    a = make_goals(train, test, 6, 5, torch.Generator().manual_seed(3))
    b = make_goals(train, test, 6, 5, torch.Generator().manual_seed(3))
    assert a == b
    for g in a:
        assert g.poison_class != g.target_class == int(test.labels[g.target_index])
        assert set(train.labels[list(g.base_indices)].tolist()) == {g.poison_class}
    with pytest.raises(ValueError, match="fewer than num_poisons=30"):
        make_goals(train, test, 1, 30, torch.Generator())
    with pytest.raises(ValueError, match="poison_class must differ"):
        AttackGoal(0, 1, 1, (1, 2))


@pytest.mark.parametrize("name", ["fc", "cp", "bp", "clbd", "htbd"])
def test_poisons_are_clean_label_and_within_eps(name, data, goal, surrogate):
    train, _ = data
    attack, result = run(name, data, goal, surrogate)
    idx = torch.tensor(sorted(goal.base_indices))
    assert torch.equal(result.indices, idx)
    assert torch.equal(result.dataset.labels, train.labels), "clean-label: no label changes"
    others = torch.ones(len(train), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(result.dataset.images[others], train.images[others])
    diff = (result.dataset.images[idx].int() - train.images[idx].int()).abs()
    eps = round(attack.config.eps * 255)
    if name == "clbd":  # the trigger patch at the bottom-right is exempt from the bound
        s = attack.config.patch_size
        patch, r, c = attack.trigger_patch((3, SIZE, SIZE))
        assert (r, c) == (SIZE - s, SIZE - s)
        stamped = result.dataset.images[idx][:, :, r:, c:]
        assert torch.equal(stamped, (patch * 255).round().to(torch.uint8).expand_as(stamped))
        diff[:, :, r:, c:] = 0
    assert int(diff.max()) <= eps and int(diff.max()) > 0
    assert result.record()["goal"]["poison_class"] == goal.poison_class
    assert pickle.loads(pickle.dumps(attack.config)) == attack.config


@pytest.mark.parametrize("name", ["fc", "bp", "clbd"])
def test_determinism_and_surrogate_left_untouched(name, data, goal, surrogate):
    before = {k: v.clone() for k, v in surrogate.state_dict().items()}
    _, a = run(name, data, goal, surrogate, seed=1)
    _, b = run(name, data, goal, surrogate, seed=1)
    assert torch.equal(a.dataset.images, b.dataset.images)
    after = surrogate.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in surrogate.parameters()) and not surrogate.training


@pytest.mark.parametrize("name", list_attacks("targeted"))
def test_record_rebuilds_the_attack_and_its_goal(name, data, goal, surrogate, tmp_path):
    """A transfer attack's record (config + goal) rebuilds the attack: the same query for the target image and,
    crafted again with the same generator, the same poisons."""
    train, test = data
    attack, result = run(name, data, goal, surrogate, seed=2)
    path = save_record(result.record(), tmp_path / "goal.json", attack)
    rebuilt = load_record(path)
    record = json.loads(path.read_text())
    again = AttackGoal(**record["goal"])
    assert type(rebuilt) is type(attack) and rebuilt.config == attack.config and again == goal
    target = test.images[goal.target_index].float() / 255
    assert torch.equal(rebuilt.target_input(target), attack.target_input(target))
    redone = rebuilt.poison(train, again, target, surrogate, torch.Generator().manual_seed(2))
    assert torch.equal(redone.dataset.images, result.dataset.images)


def test_hooks_and_grad_flags_restored_after_an_error(data, goal, surrogate):
    with pytest.raises(AttributeError):
        run("bp", data, goal, surrogate, layers=("no_such_layer",))
    assert all(p.requires_grad for p in surrogate.parameters())
    assert not any(m._forward_hooks for m in surrogate.modules()), "a hook was left behind"


def _feature_distance(surrogate, x, target):
    with torch.no_grad():
        return (surrogate.features(x).mean(0) - surrogate.features(target[None])[0]).norm().item()


@pytest.mark.outcome
@pytest.mark.parametrize("name", ["fc", "bp"])
def test_crafting_moves_poison_features_toward_the_target(name, data, goal, surrogate):
    train, test = data
    _, result = run(name, data, goal, surrogate, iterations=20)
    target = test.images[goal.target_index].float() / 255
    idx = result.indices
    before = _feature_distance(surrogate, train.images[idx].float() / 255, target)
    after = _feature_distance(surrogate, result.dataset.images[idx].float() / 255, target)
    check("feature distance to the target, before - after crafting", before - after, low=1e-6)


def test_adapted_aim_is_the_targets_features_under_the_scalars_learned_from_its_true_class(data, surrogate):
    """adapted_aim a: the aim is (1 - a)·φ(x_t) + a·φ_w(x_t), w = ReScaler's eq. 3 ascent from the target's true
    class at the configured ε, α; a = 0 is the plain attack; ReScaler's hooks are gone afterwards."""
    train, test = data
    goals = make_goals(train, test, 3, 5, torch.Generator().manual_seed(SEED + 3))
    targets = torch.stack([test.images[g.target_index].float() / 255 for g in goals])
    rescaler = ReScaler(surrogate, eps=0.5, alpha=2.0)
    try:
        w = rescaler.adapt_scalars(targets, predicted=torch.tensor([g.target_class for g in goals]))
        with torch.no_grad(), rescaler.scaled(w):
            adapted = surrogate.features(targets)
    finally:
        rescaler.detach()
    with torch.no_grad():
        plain = surrogate.features(targets)
    assert (w > 0).any() and (adapted - plain).abs().max() > 1e-4
    for a in (0.0, 0.5, 1.0):
        attack = create_attack("fc", adapted_aim=a, rescaler_eps=0.5, rescaler_alpha=2.0)
        aim, = attack._aims(surrogate, targets, goals, ())
        assert torch.allclose(aim, (1 - a) * plain + a * adapted, atol=1e-5)
    assert not any(m._forward_hooks for m in surrogate.modules()), "a hook was left behind"
    assert all(p.requires_grad for p in surrogate.parameters()) and not surrogate.training


@pytest.mark.outcome
@pytest.mark.parametrize("name", ["fc", "bp"])
def test_adapted_crafting_collides_with_the_adapted_target(name, data, goal, surrogate):
    """Poisons crafted through the adaptation end nearer the target's adapted features than the plain attack's
    poisons do (the victim trains on the poisons' plain features). As for a pretrained surrogate, the goal's
    target class is the one the surrogate predicts (the random tiny surrogate's ascent from another class
    often leaves every scalar at 0)."""
    train, test = data
    target = test.images[goal.target_index].float() / 255
    with torch.no_grad():
        predicted = int(surrogate.eval()(target[None]).argmax())
    poison = goal.poison_class if goal.poison_class != predicted else (predicted + 1) % K
    bases = (train.labels == poison).nonzero().flatten()[:5].tolist()
    goal = AttackGoal(goal.target_index, predicted, poison, tuple(bases))
    options = {"iterations": 30, "rescaler_eps": 0.5, "rescaler_alpha": 2.0}
    aim, = create_attack(name, **{**FAST[name], **options, "adapted_aim": 1.0})._aims(
        surrogate.eval(), target[None], [goal], ())
    distance = {}
    for a in (0.0, 1.0):
        _, result = run(name, data, goal, surrogate, **options, adapted_aim=a)
        with torch.no_grad():
            feats = surrogate.features(result.dataset.images[result.indices].float() / 255)
        distance[a] = (feats.mean(0) - aim[0]).norm().item()
    check("share of the plain poisons' distance to the adapted aim that adapted crafting removes",
          1 - distance[1.0] / distance[0.0], low=0.1)


def test_htbd_targets_the_triggered_target_and_keeps_the_trigger_out_of_training(data, goal, surrogate):
    train, test = data
    attack, result = run("htbd", data, goal, surrogate)
    target = test.images[goal.target_index].float() / 255
    queried = attack.target_input(target)
    patch, r, c = attack.trigger_patch(tuple(target.shape))
    s = attack.config.patch_size
    assert (r, c) == (SIZE - s - 5, SIZE - s - 5)
    assert torch.allclose(queried[:, r:r + s, c:c + s], patch)
    assert torch.equal(queried[:, :r], target[:, :r])
    assert torch.equal(create_attack("fc").target_input(target), target), "triggerless: the image itself"


def test_bad_goals_fail_clearly(data, goal, surrogate):
    train, test = data
    target = test.images[goal.target_index].float() / 255
    fc = create_attack("fc", iterations=1)
    g = torch.Generator()
    wrong = AttackGoal(goal.target_index, goal.target_class, goal.poison_class,
                       (goal.base_indices[0] + 1,) + goal.base_indices[1:])
    with pytest.raises(ValueError, match="must belong to the poison class"):
        fc.poison(train, wrong, target, surrogate, g)
    with pytest.raises(ValueError, match="not a class of this dataset"):
        fc.poison(train, AttackGoal(0, 0, 7, (1,)), target, surrogate, g)
    with pytest.raises(ValueError, match="beyond the 80 training images"):
        fc.poison(train, AttackGoal(0, 0, 1, (81,)), target, surrogate, g)
    with pytest.raises(ValueError, match="target_image: expected a float tensor"):
        fc.poison(train, goal, target[0], surrogate, g)
    with pytest.raises(TypeError, match="AttackGoal"):
        fc.poison(train, {"target_index": 0}, target, surrogate, g)
    with pytest.raises(ValueError, match=r"eps must be in \(0.0, 1.0\]"):
        create_attack("cp", eps=2.0)


def test_simplex_projection_and_coefficients():
    p = _simplex_projection(torch.tensor([[0.5, 2.0, -1.0], [0.2, 0.2, 0.2]]))
    assert torch.allclose(p.sum(1), torch.ones(2)) and bool((p >= 0).all())
    assert torch.allclose(p[0], torch.tensor([0.0, 1.0, 0.0]))
    feats = torch.eye(3) + 0.1
    target = 0.3 * feats[0] + 0.7 * feats[2]
    c = _polytope_coefficients(feats[None], target[None], torch.full((1, 3), 1 / 3))
    assert torch.allclose(c, torch.tensor([[0.3, 0.0, 0.7]]), atol=1e-3)


def test_accelerated_coefficients_reach_the_projected_gradient_minimum_goal_by_goal():
    """FISTA stops at JHT's minimiser on ill-conditioned features, and goals solved together get the
    coefficients they get alone."""
    g = torch.Generator().manual_seed(SEED)
    common = torch.randn(3, 1, 512, generator=g, dtype=torch.float64)
    feats = common + 0.3 * torch.randn(3, 5, 512, generator=g, dtype=torch.float64)
    target = common[:, 0] + 0.2 * torch.randn(3, 512, generator=g, dtype=torch.float64)
    start = torch.full((3, 5), 0.2, dtype=torch.float64)
    together = _polytope_coefficients(feats, target, start)

    def objective(c, i):
        return 0.5 * ((target[i] - c @ feats[i]) ** 2).sum()

    for i in range(3):
        alone = _polytope_coefficients(feats[i:i + 1], target[i:i + 1], start[i:i + 1])[0]
        assert torch.allclose(together[i], alone, atol=1e-12)
        c = start[i]  # plain projected gradient with step 1/L, run to convergence
        gram, b = feats[i] @ feats[i].T, feats[i] @ target[i]
        step = 1 / torch.linalg.eigvalsh(gram)[-1]
        for _ in range(100000):
            new = _simplex_projection(c - step * (gram @ c - b))
            if (new - c).abs().max() < 1e-12:
                break
            c = new
        assert objective(alone, i) <= objective(c, i) * (1 + 1e-6)
        assert torch.allclose(alone, c, atol=1e-3)
        assert alone.sum().item() == pytest.approx(1.0) and bool((alone >= 0).all())


def test_greedy_match_takes_global_minima_first():
    dist = torch.tensor([[0.0, 5.0, 9.0], [1.0, 2.0, 9.0], [9.0, 9.0, 3.0]])
    assert _greedy_match(dist).tolist() == [0, 1, 2]
    swapped = torch.tensor([[4.0, 0.5], [0.1, 3.0]])
    assert _greedy_match(swapped).tolist() == [1, 0]


@pytest.mark.parametrize("name, extra", [("fc", {}), ("cp", {}), ("bp", {}), ("clbd", {}), ("htbd", {}),
                                         ("fc", {"adapted_aim": 1.0}), ("bp", {"adapted_aim": 0.5})],
                         ids=["fc", "cp", "bp", "clbd", "htbd", "fc-adapted", "bp-adapted"])
def test_goals_crafted_together_equal_goals_crafted_one_by_one(name, extra, data, surrogate):
    """craft_goals batches many goals into one pass; each goal gets the poisons it gets alone (same generator
    draws in the same order) — also when the aims go through ReScaler's per-input adaptation."""
    train, test = data
    goals = make_goals(train, test, 3, 5, torch.Generator().manual_seed(SEED + 7))
    targets = torch.stack([test.images[g.target_index].float() / 255 for g in goals])
    attack = create_attack(name, **FAST[name], **extra)
    double = surrogate.double()
    try:
        together = attack.craft_goals(train, goals, targets.double(), double, torch.Generator().manual_seed(1))
        gen = torch.Generator().manual_seed(1)
        alone = torch.cat([attack.craft_goals(train, [g], t[None].double(), double, gen)
                           for g, t in zip(goals, targets)])
        own = attack.craft_goals(train, goals, targets.double(), double, [torch.Generator().manual_seed(9 + i)
                                                                          for i in range(3)])
        own_alone = torch.cat([attack.craft_goals(train, [g], t[None].double(), double,
                                                  torch.Generator().manual_seed(9 + i))
                               for i, (g, t) in enumerate(zip(goals, targets))])
    finally:
        surrogate.float()
    assert together.shape == (3, 5, 3, SIZE, SIZE)
    assert torch.allclose(together, alone, atol=1e-9)
    assert torch.allclose(own, own_alone, atol=1e-9)  # one generator per goal: chunking does not matter
    single = attack.poison(train, goals[0], targets[0], surrogate, torch.Generator().manual_seed(1))
    assert torch.equal(single.dataset.images[list(goals[0].base_indices)],
                       (attack.craft_goals(train, goals[:1], targets[:1], surrogate,
                                           torch.Generator().manual_seed(1))[0]
                        * 255).round().to(torch.uint8))


def test_goals_crafted_together_must_match(data, surrogate):
    train, test = data
    a, b = make_goals(train, test, 2, 5, torch.Generator().manual_seed(SEED))
    short = AttackGoal(b.target_index, b.target_class, b.poison_class, b.base_indices[:3])
    targets = torch.zeros(2, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"the same number of bases, got \[3, 5\]"):
        create_attack("fc").craft_goals(train, [a, short], targets, surrogate, torch.Generator())
    with pytest.raises(ValueError, match=r"target_images: expected a float tensor of shape \(2, 3, 16, 16\)"):
        create_attack("fc").craft_goals(train, [a, b], targets[:1], surrogate, torch.Generator())
    with pytest.raises(ValueError, match=r"one generator or one per goal \(2\), got 3"):
        create_attack("fc").craft_goals(train, [a, b], targets, surrogate, [torch.Generator()] * 3)
    with pytest.raises(TypeError, match="non-empty sequence of AttackGoal"):
        create_attack("fc").craft_goals(train, [], targets, surrogate, torch.Generator())
