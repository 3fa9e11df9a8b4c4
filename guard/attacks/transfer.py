"""Clean-label targeted poisoning in the transfer setting (ALGORITHMS.md S1, S5; A7–A11).

The attacker knows the victim's pretrained feature extractor (``surrogate``, a :class:`~guard.models.GuardModel`)
and one *attack goal*: a target test image, its true class, and a poison class. It perturbs the goal's base
images (training images of the poison class) within an ℓ∞ ball of radius ε, labels untouched, so that a victim
fine-tuning only its last layer on the poisoned set (:meth:`~guard.train.TrainConfig.last_layer`) classifies the
target image — with the trigger for CLBD/HTBD — as the poison class (success, M3).

Every crafting loop optimises all poisons of a goal as one batch on the surrogate's device.

* ``fc`` — Feature Collision / Poison Frogs (Shafahi et al. 2018), JHT ℓ∞ variant with watermarking (A9).
* ``cp`` — Convex Polytope (Zhu et al. 2019): target in the convex hull of the poisons' features (A10).
* ``bp`` — Bullseye Polytope (Aghakhani et al. 2021): target at the poisons' feature centroid (A11).
* ``clbd`` — clean-label backdoor (Turner et al. 2019): PGD-hardened bases plus a patch trigger (A7).
* ``htbd`` — Hidden Trigger Backdoor (Saha et al. 2020): features of patched target-class images (A8).
"""

from __future__ import annotations

import abc
import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data import ImageTensorDataset
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
    ``surrogate.net`` whose outputs join the penultimate features (CP/BP's "end-to-end" multi-layer variant)."""

    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.layers, tuple) or not all(isinstance(s, str) for s in self.layers):
            raise TypeError(f"layers must be a tuple of module names, got {self.layers!r}")


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
    def craft(self, bases: torch.Tensor, target: torch.Tensor, surrogate, generator: torch.Generator,
              goal: AttackGoal, sources: torch.Tensor | None = None) -> torch.Tensor:
        """Poisons (P, C, H, W) from ``bases`` for ``target``; ``sources``: target-class images (HTBD only)."""

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

    def _project(self, x: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
        eps = self.config.eps
        return torch.max(torch.min(x, bases + eps), bases - eps).clamp(0, 1)

    def poison(self, train_set: ImageTensorDataset, goal: AttackGoal, target_image: torch.Tensor, surrogate,
               generator: torch.Generator) -> PoisonResult:
        """Perturb the goal's base images in ``train_set`` (labels unchanged) against ``surrogate``.

        ``target_image``: float (C, H, W) in [0, 1], the goal's target test image. Crafting runs on the
        surrogate's device; the surrogate is used in eval mode and its parameters are left as they were.
        """
        _check_dataset(train_set)
        _check_generator(generator)
        if not isinstance(goal, AttackGoal):
            raise TypeError(f"goal must be an AttackGoal, got {type(goal).__name__}")
        k, n = train_set.num_classes, len(train_set)
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
        if (not isinstance(target_image, torch.Tensor) or target_image.shape != train_set.images.shape[1:]
                or not target_image.is_floating_point()):
            raise ValueError(f"target_image: expected a float tensor of shape {tuple(train_set.images.shape[1:])} "
                             f"in [0, 1], got {getattr(target_image, 'shape', type(target_image).__name__)}")
        device = next(surrogate.parameters()).device
        sources = None
        if self.needs_sources:
            pool = (train_set.labels == goal.target_class).nonzero().flatten()
            if pool.numel() < index.numel():
                raise ValueError(f"HTBD needs {index.numel()} target-class training images, class "
                                 f"{goal.target_class} has {pool.numel()}")
            chosen = pool[torch.randperm(pool.numel(), generator=generator)[:index.numel()]]
            sources = from_uint8(train_set.images[chosen]).to(device)
        was_training = surrogate.training
        frozen = [p for p in surrogate.parameters() if p.requires_grad]
        try:
            surrogate.eval()
            for p in frozen:
                p.requires_grad_(False)
            bases = from_uint8(train_set.images[index]).to(device)
            poisons = self.craft(bases, target_image.to(device), surrogate, generator, goal, sources)
        finally:
            for p in frozen:
                p.requires_grad_(True)
            surrogate.train(was_training)
        logger.info("%s: crafted %d poisons for goal (target %d: class %d -> %d)", self.name, index.numel(),
                    goal.target_index, goal.target_class, goal.poison_class)
        images = train_set.images.clone()
        images[index] = to_uint8(poisons.detach().cpu())
        result = ImageTensorDataset(images, train_set.labels.clone(), train_set.classes)
        return self._result(result, index, train_set.labels[index].clone(), goal=asdict(goal))


@register_attack
class FC(TransferAttack):
    """Feature Collision (Poison Frogs; ALGORITHMS.md A9), JHT ℓ∞ variant: start from the watermarked base
    ``γ·x_t + (1 − γ)·b`` (γ = 0.3), then forward steps on ``‖φ(x) − φ(x_t)‖²`` with per-poison step-size
    decay (×0.2, step rejected) whenever a poison's objective increases, projecting onto the ε-ball."""

    name = "fc"
    description = "feature collision / Poison Frogs, l-inf + watermark (Shafahi et al. 2018)"
    refused_options = {"seed": _NO_SEED.format("fc")}
    watermark = 0.3

    def craft(self, bases, target, surrogate, generator, goal, sources=None):
        layers = self.config.layers
        with torch.no_grad():
            goal = [f.detach() for f in _feature_list(surrogate, target[None], layers)]

        def objective(x):
            feats = _feature_list(surrogate, x, layers)
            return sum(((f - g) ** 2).sum(1) for f, g in zip(feats, goal))

        x = self._project(self.watermark * target + (1 - self.watermark) * bases, bases)
        lr = torch.full((x.shape[0], 1, 1, 1), self.config.lr, device=x.device)
        x.requires_grad_(True)
        loss = objective(x)
        for _ in range(self.config.iterations):
            grad, = torch.autograd.grad(loss.sum(), x)
            with torch.no_grad():
                candidate = self._project(x - lr * grad, bases)
                new_loss = objective(candidate)
                better = (new_loss <= loss)[:, None, None, None]
                lr = torch.where(better, lr, lr * 0.2)
                x = torch.where(better, candidate, x).requires_grad_(True)
            loss = objective(x)
        return x.detach()


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
    """argmin_{c ∈ simplex} ½‖target − cᵀ·feats‖² by projected gradient with step 1/L (L = largest
    eigenvalue of feats·featsᵀ), warm-started at ``c``."""
    gram = feats @ feats.T
    b = feats @ target
    step = 1.0 / torch.linalg.eigvalsh(gram)[-1].clamp_min(1e-12)
    for _ in range(max_iter):
        new = _simplex_projection(c - step * (gram @ c - b))
        if (new - c).abs().max() < tol:
            return new
        c = new
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
        """The convex-combination weights of the poisons' features for the target's."""

    @staticmethod
    @abc.abstractmethod
    def layer_loss(feats: torch.Tensor, target: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The reconstruction loss of one feature layer."""

    def craft(self, bases, target, surrogate, generator, goal, sources=None):
        layers = self.config.layers
        with torch.no_grad():
            goal = [f[0].detach() for f in _feature_list(surrogate, target[None], layers)]
        p = bases.shape[0]
        coeffs = [torch.full((p,), 1.0 / p, device=bases.device) for _ in goal]
        x = bases.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.config.lr, betas=(0.9, 0.999))
        for _ in range(self.config.iterations):
            feats = _feature_list(surrogate, x, layers)
            with torch.no_grad():
                coeffs = [self.coefficients(f.detach(), g, c) for f, g, c in zip(feats, goal, coeffs)]
            loss = sum(self.layer_loss(f, g, c) for f, g, c in zip(feats, goal, coeffs)) / len(goal)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.copy_(self._project(x, bases))
        return x.detach()


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
        return 0.5 * ((target - c @ feats) ** 2).sum() / (target ** 2).sum()


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
        return (feats.mean(0) - target).norm() / target.norm()


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

    def craft(self, bases, target, surrogate, generator, goal, sources=None):
        eps = self.config.eps
        own = torch.full((bases.shape[0],), goal.poison_class, dtype=torch.int64, device=bases.device)
        start = (torch.rand(bases.shape, generator=generator) * 2 - 1).to(bases.device) * eps
        x = self._project(bases + start, bases)
        for _ in range(self.config.iterations):
            x.requires_grad_(True)
            loss = F.cross_entropy(surrogate(x), own)
            grad, = torch.autograd.grad(loss, x)
            with torch.no_grad():
                x = self._project(x + self.config.lr * grad.sign(), bases)
        patch, r, q = self.trigger_patch(tuple(bases.shape[1:]))
        s = self.config.patch_size
        delta = (x - bases).clamp(-eps, eps)
        delta[:, :, r:r + s, q:q + s] = 0
        return stamp((bases + delta).clamp(0, 1), patch.to(bases), r, q)


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

    def craft(self, bases, target, surrogate, generator, goal, sources=None):
        patch, r, q = self.trigger_patch(tuple(bases.shape[1:]))
        with torch.no_grad():
            source_feats = surrogate.features(stamp(sources, patch.to(sources), r, q))
        x = bases.clone()
        for i in range(self.config.iterations):
            lr = self.config.lr * 0.95 ** (i // 2000)
            x.requires_grad_(True)
            feats = surrogate.features(x)
            with torch.no_grad():
                match = _greedy_match(torch.cdist(source_feats, feats.detach()))
            loss = ((source_feats[match] - feats) ** 2).sum()
            if loss.item() < self.config.loss_stop:
                break
            grad, = torch.autograd.grad(loss, x)
            with torch.no_grad():
                x = self._project(x - lr * grad, bases)
        return x.detach()
