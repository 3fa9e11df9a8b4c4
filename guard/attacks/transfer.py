"""Clean-label targeted poisoning in the transfer setting (ALGORITHMS.md S1, S5; A7–A11).

The attacker knows the victim's pretrained feature extractor (``surrogate``, a :class:`~guard.models.GuardModel`)
and one *attack goal*: a target test image, its true class, and a poison class. It perturbs the goal's base
images (training images of the poison class) within an ℓ∞ ball of radius ε, labels untouched, so that a victim
fine-tuning only its last layer on the poisoned set (:meth:`~guard.train.TrainConfig.last_layer`) classifies the
target image — with the trigger for CLBD/HTBD — as the poison class (success, M3).

Every crafting loop optimises all poisons of one goal — or of many goals, :meth:`TransferAttack.craft_goals` — as
one batch on the surrogate's device. The goals do not interact (eval-mode surrogate, per-goal losses summed,
element-wise optimisers), so a batch of goals gives each goal the poisons it gets alone.

* ``fc`` — Feature Collision / Poison Frogs (Shafahi et al. 2018), JHT ℓ∞ variant with watermarking (A9).
* ``cp`` — Convex Polytope (Zhu et al. 2019): target in the convex hull of the poisons' features (A10).
* ``bp`` — Bullseye Polytope (Aghakhani et al. 2021): target at the poisons' feature centroid (A11).
* ``clbd`` — clean-label backdoor (Turner et al. 2019): PGD-hardened bases plus a patch trigger (A7).
* ``htbd`` — Hidden Trigger Backdoor (Saha et al. 2020): features of patched target-class images (A8).

FC, CP and BP also craft *through* ReScaler's adaptation for an attacker who knows the endpoint serves it
(``adapted_aim``, :class:`TransferConfig`): the clean-label counterpart of ``rescaler-aware``.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data import ImageTensorDataset
from ..rescaler import ReScaler, ReScalerConfig
from .base import (PoisonResult, TargetedAttack, _check_dataset, _check_generator, check_float, check_int,
                   register_attack)
from .primitives import from_uint8, patch_box, random_pattern, stamp, to_uint8

logger = logging.getLogger(__name__)

__all__ = ["AttackGoal", "BP", "CLBD", "CP", "CraftConfig", "FC", "HTBD", "HTBDConfig", "PolytopeConfig",
           "TransferConfig", "TriggerTransferConfig", "make_goals"]


@dataclass(frozen=True)
class AttackGoal:
    """One JHT "setup" (ALGORITHMS.md S5): the target image (index into the test set), its true class, the
    poison class the attacker wants for it, and the training indices of the base images to perturb."""

    target_index: int
    target_class: int
    poison_class: int
    base_indices: tuple[int, ...]

    def __post_init__(self) -> None:
        check_int("target_index", self.target_index, 0)
        check_int("target_class", self.target_class, 0)
        check_int("poison_class", self.poison_class, 0)
        if self.poison_class == self.target_class:
            raise ValueError(f"poison_class must differ from target_class, both are {self.target_class}")
        object.__setattr__(self, "base_indices", tuple(int(i) for i in self.base_indices))
        if not self.base_indices or len(set(self.base_indices)) != len(self.base_indices):
            raise ValueError(f"base_indices must be distinct and non-empty, got {self.base_indices}")


def make_goals(train_set: ImageTensorDataset, test_set: ImageTensorDataset, num_goals: int, num_poisons: int,
               generator: torch.Generator) -> list[AttackGoal]:
    """``num_goals`` reproducible goals: a uniformly random target test image, a random other class as poison
    class, and ``num_poisons`` random training images of that class as bases (JHT's recipe)."""
    _check_dataset(train_set)
    _check_dataset(test_set, "test_set")
    _check_generator(generator)
    check_int("num_goals", num_goals, 1)
    check_int("num_poisons", num_poisons, 1)
    k = train_set.num_classes
    if k < 2:
        raise ValueError("attack goals need at least two classes")
    goals = []
    for _ in range(num_goals):
        target_index = int(torch.randint(0, len(test_set), (), generator=generator))
        target_class = int(test_set.labels[target_index])
        poison_class = int(torch.randint(0, k - 1, (), generator=generator))
        poison_class += poison_class >= target_class
        pool = (train_set.labels == poison_class).nonzero().flatten()
        if pool.numel() < num_poisons:
            raise ValueError(f"class {poison_class} has {pool.numel()} training images, fewer than "
                             f"num_poisons={num_poisons}")
        bases = pool[torch.randperm(pool.numel(), generator=generator)[:num_poisons]]
        goals.append(AttackGoal(target_index, target_class, poison_class, tuple(bases.tolist())))
    return goals


@dataclass(frozen=True)
class CraftConfig:
    """Crafting options shared by the transfer attacks. ``eps``: ℓ∞ radius (16/255, rescaler_appendix.txt §A);
    ``iterations`` and ``lr``: the optimiser budget."""

    eps: float = 16 / 255
    iterations: int = 120
    lr: float = 0.01

    def __post_init__(self) -> None:
        check_float("eps", self.eps, 0.0, 1.0, low_open=True)
        check_int("iterations", self.iterations, 1)
        check_float("lr", self.lr, 0.0, low_open=True)


@dataclass(frozen=True)
class TransferConfig(CraftConfig):
    """The feature-space attacks FC, CP and BP: FC's budget is JHT's 120 iterations, but step 0.01 instead of
    JHT's 0.001, which barely moves the 64-d features of the CIFAR ResNets here; ``layers``: extra sub-modules of
    ``surrogate.net`` whose outputs join the penultimate features (CP/BP's "end-to-end" multi-layer variant).

    ``adapted_aim`` — the attacker who knows ReScaler serves the victim (at the served ``rescaler_eps`` and
    ``rescaler_alpha``, rescaler_main.txt eq. 3) crafts through the adaptation: each goal's aim moves from the
    target's features φ(x_t) towards φ_{w*}(x_t), its features under the scalars the endpoint learns for it,
    aim = (1 − a)·φ(x_t) + a·φ_{w*}(x_t); 0 (default) is the plain attack, 1 aims at the adapted features alone.
    The features do not depend on the victim's head, the scalars do: the attacker models the poisoned victim
    near x_t as the surrogate with the true and poison classes swapped, so the victim's ascent from the poison
    class it answers is the surrogate's ascent from the target's true class. The victim trains on the poisons'
    plain features."""

    layers: tuple[str, ...] = ()
    adapted_aim: float = 0.0
    rescaler_eps: float = ReScalerConfig.eps
    rescaler_alpha: float = ReScalerConfig.alpha

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.layers, tuple) or not all(isinstance(s, str) for s in self.layers):
            raise TypeError(f"layers must be a tuple of module names, got {self.layers!r}")
        check_float("adapted_aim", self.adapted_aim, 0.0, 1.0)
        check_float("rescaler_eps", self.rescaler_eps, 0.0, 1.0, low_open=True)
        check_float("rescaler_alpha", self.rescaler_alpha, 0.0, low_open=True)


_NO_SEED = "{} has no trigger and crafts without random draws: a seed would change nothing"


def _feature_list(model, x: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
    """Penultimate features plus the flattened outputs of ``layers``; hooks are always removed."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in layers:
            module = model.net.get_submodule(name)
            handles.append(module.register_forward_hook(
                lambda m, inp, out, name=name: captured.__setitem__(name, out)))
        penultimate = model.features(x)
    finally:
        for h in handles:
            h.remove()
    return [penultimate] + [captured[name].flatten(1) for name in layers]


class TransferAttack(TargetedAttack):
    """Shared plumbing: validation, the frozen surrogate, batching, ℓ∞ projection and the result."""

    config_class = TransferConfig
    needs_sources = False  # HTBD collides with patched target-class training images

    @abc.abstractmethod
    def craft(self, bases: torch.Tensor, targets: torch.Tensor, surrogate, generators: Sequence[torch.Generator],
              goals: Sequence[AttackGoal], sources: torch.Tensor | None = None) -> torch.Tensor:
        """Poisons (G, P, C, H, W) from ``bases`` (G, P, C, H, W) for ``targets`` (G, C, H, W), one row per goal;
        ``generators``: goal g's random draws come from ``generators[g]``; ``sources``: (G, P, C, H, W)
        target-class images (HTBD only)."""

    def trigger_patch(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, int, int] | None:
        """The backdoor variants' trigger (patch, row, col) for images of ``shape``; ``None``: triggerless."""
        return None

    def target_input(self, target_image: torch.Tensor) -> torch.Tensor:
        """What the victim is queried with for this goal: the target image (C, H, W), with the trigger for
        the backdoor variants."""
        trigger = self.trigger_patch(tuple(target_image.shape))
        if trigger is None:
            return target_image
        patch, r, c = trigger
        return stamp(target_image[None], patch, r, c)[0]

    def _aims(self, surrogate, targets: torch.Tensor, goals: Sequence[AttackGoal],
              layers: Sequence[str]) -> list[torch.Tensor]:
        """What each goal's poisons are crafted towards, one (G, D) tensor per feature layer: the targets'
        features, moved ``adapted_aim`` of the way to their features under the scalars ReScaler learns for them
        (:class:`TransferConfig`: eq. 3's ascent from each target's true class on the surrogate). ReScaler's
        hooks are on the surrogate only inside this call."""
        with torch.no_grad():
            plain = [f.detach() for f in _feature_list(surrogate, targets, layers)]
        a = self.config.adapted_aim
        if a == 0:
            return plain
        rescaler = ReScaler(surrogate, eps=self.config.rescaler_eps, alpha=self.config.rescaler_alpha)
        try:
            true_classes = torch.tensor([g.target_class for g in goals], device=targets.device)
            w = rescaler.adapt_scalars(targets, predicted=true_classes)
            with torch.no_grad(), rescaler.scaled(w):
                adapted = _feature_list(surrogate, targets, layers)
        finally:
            rescaler.detach()
        return [(1 - a) * f + a * f_w for f, f_w in zip(plain, adapted)]

    def _project(self, x: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
        eps = self.config.eps
        return torch.max(torch.min(x, bases + eps), bases - eps).clamp(0, 1)

    def craft_goals(self, train_set: ImageTensorDataset, goals: Sequence[AttackGoal], target_images: torch.Tensor,
                    surrogate, generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
        """Poisons for several goals at once: float (G, P, C, H, W) in [0, 1], row g perturbing the base images
        of ``goals[g]`` in ``train_set`` for ``target_images[g]`` (float (G, C, H, W) in [0, 1]).

        All goals need the same number of bases. Random draws (CLBD's start, HTBD's sources) are taken goal by
        goal, in order, from ``generator`` — or from ``generator[g]`` for goal g when it is a sequence of one
        generator per goal — so crafting goals together or one after another gives the same poisons. Crafting
        runs on the surrogate's device; the surrogate is used in eval mode and its parameters are left as they
        were.
        """
        _check_dataset(train_set)
        goals = list(goals)
        generators = list(generator) if isinstance(generator, (list, tuple)) else [generator] * len(goals)
        if len(generators) != len(goals):
            raise ValueError(f"generator: expected one generator or one per goal ({len(goals)}), "
                             f"got {len(generators)}")
        for gen in generators:
            _check_generator(gen)
        if not goals or not all(isinstance(g, AttackGoal) for g in goals):
            raise TypeError(f"goals must be a non-empty sequence of AttackGoal, got "
                            f"{[type(g).__name__ for g in goals] if goals else 'nothing'}")
        sizes = {len(g.base_indices) for g in goals}
        if len(sizes) > 1:
            raise ValueError(f"goals crafted together need the same number of bases, got {sorted(sizes)}")
        shape = tuple(train_set.images.shape[1:])
        if (not isinstance(target_images, torch.Tensor) or tuple(target_images.shape) != (len(goals), *shape)
                or not target_images.is_floating_point()):
            raise ValueError(f"target_images: expected a float tensor of shape {(len(goals), *shape)} in [0, 1], "
                             f"got {getattr(target_images, 'shape', type(target_images).__name__)}")
        k, n = train_set.num_classes, len(train_set)
        for goal in goals:
            for name in ("target_class", "poison_class"):
                if getattr(goal, name) >= k:
                    raise ValueError(f"goal.{name}={getattr(goal, name)} is not a class of this dataset: "
                                     f"expected 0..{k - 1}")
            index = torch.tensor(goal.base_indices)
            if int(index.max()) >= n:
                raise ValueError(f"goal.base_indices reach {int(index.max())}, beyond the {n} training images")
            wrong = (train_set.labels[index] != goal.poison_class).nonzero().flatten()
            if wrong.numel():
                raise ValueError(f"base images must belong to the poison class {goal.poison_class}; indices "
                                 f"{index[wrong].tolist()[:5]} do not")
        param = next(surrogate.parameters())
        device, dtype = param.device, param.dtype
        index = torch.tensor([g.base_indices for g in goals])
        sources = None
        if self.needs_sources:
            chosen = []
            for goal, gen in zip(goals, generators):
                pool = (train_set.labels == goal.target_class).nonzero().flatten()
                if pool.numel() < index.shape[1]:
                    raise ValueError(f"HTBD needs {index.shape[1]} target-class training images, class "
                                     f"{goal.target_class} has {pool.numel()}")
                chosen.append(pool[torch.randperm(pool.numel(), generator=gen)[:index.shape[1]]])
            sources = from_uint8(train_set.images[torch.stack(chosen)]).to(device, dtype)
        was_training = surrogate.training
        frozen = [p for p in surrogate.parameters() if p.requires_grad]
        try:
            surrogate.eval()
            for p in frozen:
                p.requires_grad_(False)
            bases = from_uint8(train_set.images[index]).to(device, dtype)
            poisons = self.craft(bases, target_images.to(device, dtype), surrogate, generators, goals, sources)
        finally:
            for p in frozen:
                p.requires_grad_(True)
            surrogate.train(was_training)
        for goal in goals:
            logger.info("%s: crafted %d poisons for goal (target %d: class %d -> %d)", self.name,
                        len(goal.base_indices), goal.target_index, goal.target_class, goal.poison_class)
        return poisons.detach()

    def poison(self, train_set: ImageTensorDataset, goal: AttackGoal, target_image: torch.Tensor, surrogate,
               generator: torch.Generator) -> PoisonResult:
        """Perturb the goal's base images in ``train_set`` (labels unchanged) against ``surrogate``.

        ``target_image``: float (C, H, W) in [0, 1], the goal's target test image. See :meth:`craft_goals`.
        """
        if not isinstance(goal, AttackGoal):
            raise TypeError(f"goal must be an AttackGoal, got {type(goal).__name__}")
        shape = tuple(getattr(getattr(train_set, "images", None), "shape", (0,))[1:])
        if (not isinstance(target_image, torch.Tensor) or tuple(target_image.shape) != shape
                or not target_image.is_floating_point()):
            raise ValueError(f"target_image: expected a float tensor of shape {shape} "
                             f"in [0, 1], got {getattr(target_image, 'shape', type(target_image).__name__)}")
        poisons = self.craft_goals(train_set, [goal], target_image[None], surrogate, generator)[0]
        index = torch.tensor(goal.base_indices)
        images = train_set.images.clone()
        images[index] = to_uint8(poisons.cpu())
        result = ImageTensorDataset(images, train_set.labels.clone(), train_set.classes)
        return self._result(result, index, train_set.labels[index].clone(), goal=asdict(goal))


@register_attack
class FC(TransferAttack):
    """Feature Collision (Poison Frogs; ALGORITHMS.md A9), JHT ℓ∞ variant: start from the watermarked base
    ``γ·x_t + (1 − γ)·b`` (γ = 0.3), then forward steps on ``‖φ(x) − φ(x_t)‖²`` with per-poison
    step-size decay (×0.2, step rejected) whenever a poison's objective increases, projecting onto the ε-ball."""

    name = "fc"
    description = "feature collision / Poison Frogs, l-inf + watermark (Shafahi et al. 2018)"
    refused_options = {"seed": _NO_SEED.format("fc")}
    watermark = 0.3

    def craft(self, bases, targets, surrogate, generators, goals, sources=None):
        layers = self.config.layers
        g, p = bases.shape[:2]
        flat = bases.flatten(0, 1)
        # each poison collides with its own goal's aim
        aims = [f.repeat_interleave(p, 0) for f in self._aims(surrogate, targets, goals, layers)]

        def objective(x):
            feats = _feature_list(surrogate, x, layers)
            return sum(((f - a) ** 2).sum(1) for f, a in zip(feats, aims))

        start = self.watermark * targets.repeat_interleave(p, 0) + (1 - self.watermark) * flat
        x = self._project(start, flat)
        lr = torch.full((x.shape[0], 1, 1, 1), self.config.lr, device=x.device)
        x.requires_grad_(True)
        loss = objective(x)
        for _ in range(self.config.iterations):
            grad, = torch.autograd.grad(loss.sum(), x)
            with torch.no_grad():
                candidate = self._project(x - lr * grad, flat)
                new_loss = objective(candidate)
                better = (new_loss <= loss)[:, None, None, None]
                lr = torch.where(better, lr, lr * 0.2)
                x = torch.where(better, candidate, x).requires_grad_(True)
            loss = objective(x)
        return x.detach().view_as(bases)


def _simplex_projection(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex (sorting method)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / k) > 0).sum(-1, keepdim=True)
    theta = css.gather(-1, rho - 1) / rho
    return (v - theta).clamp_min(0)


def _polytope_coefficients(feats: torch.Tensor, target: torch.Tensor, c: torch.Tensor,
                           max_iter: int = 1000, tol: float = 1e-6) -> torch.Tensor:
    """argmin_{c ∈ simplex} ½‖target − cᵀ·feats‖² per goal, warm-started at ``c``: ``feats`` (G, P, D),
    ``target`` (G, D), ``c`` (G, P). Projected gradient with step 1/L (L = largest eigenvalue of feats·featsᵀ),
    accelerated (FISTA) with a restart whenever the momentum points uphill; a goal stops once its step moves
    no coefficient by ``tol`` or more. Same minimiser and stopping rule as JHT's plain projected gradient, in
    about five times fewer iterations on the ill-conditioned early-layer features of the multi-layer variant."""
    gram = feats @ feats.transpose(1, 2)
    b = (feats @ target[:, :, None])[:, :, 0]
    step = 1.0 / torch.linalg.eigvalsh(gram)[:, -1:].clamp_min(1e-12)
    y, t = c, torch.ones_like(c[:, :1])
    active = torch.ones_like(c[:, 0], dtype=torch.bool)
    for _ in range(max_iter):
        new = _simplex_projection(y - step * ((gram @ y[:, :, None])[:, :, 0] - b))
        moved = (new - c).abs().amax(1) >= tol
        keep = (active & moved)[:, None]
        new = torch.where(active[:, None], new, c)
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        uphill = ((y - new) * (new - c)).sum(1, keepdim=True) > 0
        y = torch.where(uphill, new, new + ((t - 1) / t_next) * (new - c))
        t = torch.where(uphill, torch.ones_like(t), t_next)
        c = new
        active = keep[:, 0]
        if not bool(active.any()):
            break
    return c


@dataclass(frozen=True)
class PolytopeConfig(TransferConfig):
    """CP/BP (JHT defaults): 1200 Adam iterations at lr 0.04."""

    iterations: int = 1200
    lr: float = 0.04


class _Polytope(TransferAttack):
    """CP/BP: Adam on the poisons for a feature-space reconstruction of the target, ε-projection each step."""

    config_class = PolytopeConfig

    @abc.abstractmethod
    def coefficients(self, feats: torch.Tensor, target: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The convex-combination weights (G, P) of each goal's poison features (G, P, D) for its target's (G, D)."""

    @staticmethod
    @abc.abstractmethod
    def layer_loss(feats: torch.Tensor, target: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The reconstruction loss (G,) of one feature layer, one value per goal."""

    def craft(self, bases, targets, surrogate, generators, goals, sources=None):
        layers = self.config.layers
        g, p = bases.shape[:2]
        aims = self._aims(surrogate, targets, goals, layers)
        coeffs = [torch.full((g, p), 1.0 / p, device=bases.device, dtype=bases.dtype) for _ in aims]
        flat = bases.flatten(0, 1)
        x = flat.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.config.lr, betas=(0.9, 0.999))
        for _ in range(self.config.iterations):
            feats = [f.view(g, p, -1) for f in _feature_list(surrogate, x, layers)]
            with torch.no_grad():
                coeffs = [self.coefficients(f.detach(), a, c) for f, a, c in zip(feats, aims, coeffs)]
            # goals are independent: their losses add, and Adam's update is element-wise
            loss = sum(self.layer_loss(f, a, c) for f, a, c in zip(feats, aims, coeffs)).sum() / len(aims)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.copy_(self._project(x, flat))
        return x.detach().view_as(bases)


@register_attack
class CP(_Polytope):
    """Convex Polytope (ALGORITHMS.md A10): alternate the simplex-constrained least squares for the
    coefficients c with one Adam step on ``½‖φ(x_t) − Σ_j c_j φ(x_j)‖² / ‖φ(x_t)‖²``, then project."""

    name = "cp"
    description = "convex polytope (Zhu et al. 2019)"
    refused_options = {"seed": _NO_SEED.format("cp")}

    def coefficients(self, feats, target, c):
        return _polytope_coefficients(feats, target, c)

    @staticmethod
    def layer_loss(feats, target, c):
        return 0.5 * ((target - (c[:, None, :] @ feats)[:, 0]) ** 2).sum(1) / (target ** 2).sum(1)


@register_attack
class BP(_Polytope):
    """Bullseye Polytope (ALGORITHMS.md A11): coefficients fixed to 1/k,
    ``‖mean_j φ(x_j) − φ(x_t)‖ / ‖φ(x_t)‖`` (a norm, not squared)."""

    name = "bp"
    description = "bullseye polytope (Aghakhani et al. 2021)"
    refused_options = {"seed": _NO_SEED.format("bp")}

    def coefficients(self, feats, target, c):
        return c

    @staticmethod
    def layer_loss(feats, target, c):
        return (feats.mean(1) - target).norm(dim=1) / target.norm(dim=1)


@dataclass(frozen=True)
class TriggerTransferConfig(CraftConfig):
    """CLBD/HTBD: a ``patch_size``² (6×6, rescaler_appendix.txt §A) random patch drawn from ``seed`` (A20
    substitute for the JHT trigger images); ``lr`` is CLBD's PGD step (2/255)."""

    iterations: int = 20
    lr: float = 2 / 255
    patch_size: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("patch_size", self.patch_size, 1)
        check_int("seed", self.seed, 0)


@register_attack
class CLBD(TransferAttack):
    """Clean-label backdoor (Turner et al.; JHT version, ALGORITHMS.md A7): untargeted ℓ∞ PGD on each base
    w.r.t. its own label (random start, signed steps of ``lr``), perturbation zeroed under the trigger, and the
    patch pasted at the bottom-right corner. Test: the patch on the target image."""

    name = "clbd"
    config_class = TriggerTransferConfig
    description = "clean-label backdoor: PGD-hardened bases + patch (Turner et al. 2019)"
    refused_options = {"layers": "clbd hardens the bases with PGD on the surrogate's classification loss; it "
                                 "matches no feature layers (ALGORITHMS.md A7)"}

    def trigger_patch(self, shape):
        c, h, w = shape
        s = self.config.patch_size
        r, q = patch_box((h, w), (s, s), "bottom-right")
        return random_pattern((c, s, s), torch.Generator().manual_seed(self.config.seed)), r, q

    def craft(self, bases, targets, surrogate, generators, goals, sources=None):
        eps = self.config.eps
        g, p = bases.shape[:2]
        flat = bases.flatten(0, 1)
        own = torch.tensor([goal.poison_class for goal in goals], device=bases.device).repeat_interleave(p)
        start = torch.stack([torch.rand(bases.shape[1:], generator=gen) for gen in generators])
        x = self._project(flat + (start.flatten(0, 1).to(bases.device) * 2 - 1) * eps, flat)
        for _ in range(self.config.iterations):
            x.requires_grad_(True)
            # per-poison losses summed: each poison's signed step is the one it takes alone
            loss = F.cross_entropy(surrogate(x), own, reduction="sum")
            grad, = torch.autograd.grad(loss, x)
            with torch.no_grad():
                x = self._project(x + self.config.lr * grad.sign(), flat)
        patch, r, q = self.trigger_patch(tuple(bases.shape[2:]))
        s = self.config.patch_size
        delta = (x - flat).clamp(-eps, eps)
        delta[:, :, r:r + s, q:q + s] = 0
        return stamp((flat + delta).clamp(0, 1), patch.to(bases), r, q).view_as(bases)


@dataclass(frozen=True)
class HTBDConfig(TriggerTransferConfig):
    """HTBD (JHT): 5000 iterations, lr 0.001·0.95^⌊i/2000⌋, stop when the loss falls below ``loss_stop`` 10."""

    iterations: int = 5000
    lr: float = 0.001
    loss_stop: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("loss_stop", self.loss_stop, 0.0)


def _greedy_match(dist: torch.Tensor) -> torch.Tensor:
    """For each poison (column), the source (row) assigned by repeatedly taking the globally closest
    remaining (source, poison) pair and removing both (JHT's HTBD matching)."""
    d = dist.clone()
    n = d.shape[0]
    match = torch.empty(n, dtype=torch.int64, device=d.device)
    for _ in range(n):
        flat = int(d.argmin())
        r, c = divmod(flat, d.shape[1])
        match[c] = r
        d[r, :] = float("inf")
        d[:, c] = float("inf")
    return match


@register_attack
class HTBD(TransferAttack):
    """Hidden Trigger Backdoor (Saha et al. 2020; JHT version, ALGORITHMS.md A8): poisons (poison-class bases)
    whose features collide with those of equally many *patched* target-class training images, greedily
    matched; plain gradient steps on ``Σ‖φ(patched source) − φ(poison)‖²`` within the ε-ball. The trigger
    never appears in the training set; at test time it is pasted on the target image at
    ``(H − p − 5, W − p − 5)``."""

    name = "htbd"
    config_class = HTBDConfig
    needs_sources = True
    description = "hidden trigger backdoor (Saha et al. 2020)"
    refused_options = {"layers": "htbd collides penultimate features only (ALGORITHMS.md A8)"}

    def trigger_patch(self, shape):
        c, h, w = shape
        s = self.config.patch_size
        r, q = patch_box((h, w), (s, s), (max(0, h - s - 5), max(0, w - s - 5)))
        return random_pattern((c, s, s), torch.Generator().manual_seed(self.config.seed)), r, q

    def craft(self, bases, targets, surrogate, generators, goals, sources=None):
        g, p = bases.shape[:2]
        patch, r, q = self.trigger_patch(tuple(bases.shape[2:]))
        with torch.no_grad():
            aims = surrogate.features(stamp(sources.flatten(0, 1), patch.to(sources), r, q)).view(g, p, -1)
        flat = bases.flatten(0, 1)
        x = flat.clone()
        active = torch.ones(g, dtype=torch.bool, device=bases.device)  # goals still above loss_stop
        for i in range(self.config.iterations):
            lr = self.config.lr * 0.95 ** (i // 2000)
            x.requires_grad_(True)
            feats = surrogate.features(x).view(g, p, -1)
            with torch.no_grad():
                dist = torch.cdist(aims, feats.detach())
                match = torch.stack([_greedy_match(d) for d in dist])
            matched = torch.gather(aims, 1, match[:, :, None].expand(-1, -1, aims.shape[2]))
            loss = ((matched - feats) ** 2).sum((1, 2))
            active = active & (loss.detach() >= self.config.loss_stop)
            if not bool(active.any()):
                break
            grad, = torch.autograd.grad((loss * active).sum(), x)
            with torch.no_grad():
                x = self._project(x - lr * grad, flat)
        return x.detach().view_as(bases)
