"""Attack goals in the transfer setting, end to end (ALGORITHMS.md S1, S5, M3–M7; rescaler_appendix.txt §A).

One goal = one target test image, its class, a poison class and the base images an attacker perturbs
(:class:`~guard.attacks.AttackGoal`). The victim knows the pretrained backbone, fine-tunes only a fresh last
layer (BatchNorm frozen) on a fine-tuning set holding the goal's poisons (1 %, never augmented), and the goal
succeeds when the victim predicts the poison class for the (triggered) target (M3). ReScaler then adapts the
victim on that one input (M4–M6).

The backbone is frozen, so a victim's features do not depend on its head. :class:`FeatureBank` computes the
features of a shared clean fine-tuning pool once per backbone, under one augmentation draw per epoch, and
:func:`goal_victim` trains each goal's head on those plus its poisons' features with the one training loop
(:func:`guard.train.train`): a victim costs the poisons' forward pass instead of ``epochs`` passes over the
whole fine-tuning set. The head sees every epoch's draws in one shuffled stream rather than epoch by epoch;
the number of steps, the learning rate and the data are the protocol's.

Example::

    bank = FeatureBank(backbone, train_set, pool_indices, epochs=35, generator=torch.Generator().manual_seed(0))
    poisons = create_attack("fc").craft_goals(train_set, [goal], target[None], backbone, g)[0]   # float (P, C, H, W)
    victim = goal_victim(backbone, bank, goal, poisons, GoalProtocol(), torch.Generator().manual_seed(0))
    outcome = evaluate_goal(target, goal, ReScaler(victim, eps=0.15))   # success, defended label, confidences
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._validation import is_int, is_number
from .attacks import AttackGoal
from .attacks.primitives import from_uint8
from .data import ImageTensorDataset, random_crop_flip
from .models import GuardModel, init_defaults
from .train import TrainConfig, train

__all__ = ["FeatureBank", "GoalOutcome", "GoalProtocol", "evaluate_goal", "goal_victim", "image_features"]


@dataclass(frozen=True)
class GoalProtocol:
    """The victim's fine-tuning (rescaler_appendix.txt §A; ALGORITHMS.md S1): a fine-tuning set of
    ``finetune_images`` images including the goal's poisons, a fresh last layer trained for ``epochs`` epochs
    with SGD (``lr``, ``momentum``, ``weight_decay``; the :meth:`~guard.train.TrainConfig.last_layer` preset)
    at ``batch_size``, clean images crop/flip-augmented, poisons not."""

    finetune_images: int = 500
    epochs: int = 35
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 2e-4

    def __post_init__(self) -> None:
        for name in ("finetune_images", "epochs", "batch_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not is_number(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, "
                                 f"got {value!r}")

    def train_config(self) -> TrainConfig:
        """The head's run: every epoch's feature draws form one shuffled pass (see the module docstring)."""
        return TrainConfig.last_layer(epochs=1, lr=self.lr, momentum=self.momentum,
                                      weight_decay=self.weight_decay, batch_size=self.batch_size,
                                      augment=False, mode="finetune")


@torch.no_grad()
def image_features(model: GuardModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features (N, D) of ``images`` (uint8 or float in [0, 1]) in eval mode, on the model's
    device; returned on the CPU."""
    if not isinstance(model, GuardModel):
        raise TypeError(f"model must be a guard.models.GuardModel, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = []
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size]
            x = from_uint8(x) if x.dtype == torch.uint8 else x
            out.append(model.features(x.to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.classifier.in_features)


class FeatureBank:
    """Features of a clean fine-tuning pool under ``epochs`` crop/flip draws: ``features`` (epochs, N, D).

    ``pool_indices`` index ``train_set``; a goal's fine-tuning set takes the first pool images that are not
    among its bases (:meth:`clean_for`), so the pool should hold a few more than ``finetune_images``.
    """

    def __init__(self, model: GuardModel, train_set: ImageTensorDataset, pool_indices: torch.Tensor,
                 epochs: int, generator: torch.Generator, batch_size: int = 256) -> None:
        if not isinstance(train_set, ImageTensorDataset):
            raise TypeError(f"train_set must be a guard.data.ImageTensorDataset, got {type(train_set).__name__}")
        index = torch.as_tensor(pool_indices, dtype=torch.int64)
        if index.dim() != 1 or index.numel() == 0 or index.unique().numel() != index.numel():
            raise ValueError(f"pool_indices must be distinct training indices (1-d, non-empty), got "
                             f"shape {tuple(index.shape)}")
        if int(index.min()) < 0 or int(index.max()) >= len(train_set):
            raise ValueError(f"pool_indices must lie in [0, {len(train_set) - 1}], got "
                             f"[{int(index.min())}, {int(index.max())}]")
        if not is_int(epochs) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        images = train_set.images[index]
        self.indices = index
        self.labels = train_set.labels[index].clone()
        self.features = torch.stack([image_features(model, random_crop_flip(images, generator), batch_size)
                                     for _ in range(epochs)])

    @property
    def epochs(self) -> int:
        return self.features.shape[0]

    def save(self, path: str | os.PathLike) -> None:
        """Write the bank (indices, labels, features) for :meth:`load`."""
        torch.save({"indices": self.indices, "labels": self.labels, "features": self.features}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureBank":
        """A bank written by :meth:`save` (read with ``weights_only=True``)."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or set(saved) != {"indices", "labels", "features"}:
            raise ValueError(f"{path} is not a FeatureBank file (expected indices, labels and features)")
        bank = cls.__new__(cls)
        bank.indices, bank.labels, bank.features = saved["indices"], saved["labels"], saved["features"]
        return bank

    def clean_for(self, goal: AttackGoal, count: int) -> torch.Tensor:
        """Positions (into the pool) of the ``count`` clean images of ``goal``'s fine-tuning set."""
        keep = (~torch.isin(self.indices, torch.tensor(goal.base_indices))).nonzero().flatten()
        if keep.numel() < count:
            raise ValueError(f"the pool holds {keep.numel()} images outside the goal's bases, fewer than the "
                             f"{count} clean fine-tuning images needed; give FeatureBank a larger pool")
        return keep[:count]


def goal_victim(model: GuardModel, bank: FeatureBank, goal: AttackGoal, poisons: torch.Tensor,
                protocol: GoalProtocol, generator: torch.Generator) -> GuardModel:
    """The victim of one goal: a copy of the pretrained ``model`` whose last layer is re-initialised (torch's
    default, drawn from ``generator``) and trained on the bank's clean features plus ``poisons``' features
    (labelled with the poison class, un-augmented), as :class:`GoalProtocol` describes. ``model`` is not
    modified; the victim is returned in eval mode."""
    if not isinstance(goal, AttackGoal):
        raise TypeError(f"goal must be an AttackGoal, got {type(goal).__name__}")
    p = len(goal.base_indices)
    if not isinstance(poisons, torch.Tensor) or poisons.dim() != 4 or poisons.shape[0] != p:
        raise ValueError(f"poisons: expected the goal's {p} images (P, C, H, W), got "
                         f"{getattr(poisons, 'shape', type(poisons).__name__)}")
    if bank.epochs != protocol.epochs:
        raise ValueError(f"the bank holds {bank.epochs} augmentation draws, the protocol trains "
                         f"{protocol.epochs} epochs")
    clean = bank.clean_for(goal, protocol.finetune_images - p)
    victim = copy.deepcopy(model).eval()
    poison_feats = image_features(victim, poisons)
    feats = torch.cat([bank.features[:, clean], poison_feats.expand(bank.epochs, -1, -1)], 1).flatten(0, 1)
    labels = torch.cat([bank.labels[clean], torch.full((p,), goal.poison_class)]).repeat(bank.epochs)
    head = victim.classifier
    init_defaults(head, generator)
    head_set = torch.utils.data.TensorDataset(feats.to(head.weight.device), labels.to(head.weight.device))
    train(head, head_set, protocol.train_config(), generator=generator, progress=False)
    return victim.eval()


@dataclass(frozen=True)
class GoalOutcome:
    """What the victim and ReScaler do with one goal's query (M3–M6 inputs): labels and softmax
    probabilities before and after adaptation, and ReScaler's learned scalars."""

    success: bool
    undefended_label: int
    undefended_probs: torch.Tensor
    defended_label: int
    defended_probs: torch.Tensor
    scalars: torch.Tensor

    def summary(self, goal: AttackGoal) -> dict:
        """JSON-ready record: success (M3), still poisoned after defense (M4), put back (M5), confidences (M6)."""
        return {"success": self.success, "undefended_label": self.undefended_label,
                "defended_label": self.defended_label,
                "defended_poisoned": self.defended_label == goal.poison_class,
                "put_back": self.defended_label == goal.target_class,
                "undefended_poison_confidence": float(self.undefended_probs[goal.poison_class]),
                "target_confidence": float(self.defended_probs[goal.target_class]),
                "poison_confidence": float(self.defended_probs[goal.poison_class])}


def evaluate_goal(query: torch.Tensor, goal: AttackGoal, rescaler) -> GoalOutcome:
    """Adapt the victim wrapped by ``rescaler`` (a :class:`guard.ReScaler`) on ``query`` — the target image
    (C, H, W), triggered for backdoor attacks (:meth:`~guard.attacks.transfer.TransferAttack.target_input`)."""
    if not isinstance(goal, AttackGoal):
        raise TypeError(f"goal must be an AttackGoal, got {type(goal).__name__}")
    if not isinstance(query, torch.Tensor) or query.dim() != 3:
        raise ValueError(f"query: expected one image (C, H, W), got {getattr(query, 'shape', type(query).__name__)}")
    out = rescaler.adapt(query[None])
    before = F.softmax(out.original_logits[0].double(), 0).cpu()
    after = F.softmax(out.logits[0].double(), 0).cpu()
    undefended = int(before.argmax())
    return GoalOutcome(success=undefended == goal.poison_class, undefended_label=undefended,
                       undefended_probs=before, defended_label=int(after.argmax()), defended_probs=after,
                       scalars=out.scalars[0].cpu())
