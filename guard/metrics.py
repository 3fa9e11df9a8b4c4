"""Attack and defense metrics (ALGORITHMS.md §3, M1–M10).

The core functions take predictions / probabilities / scores as tensors, so they are exact and cheap to
test; :func:`evaluate_backdoor` runs a model (optionally through a defense) on clean and triggered test
images and returns CDA and every ASR variant at once.

Example::

    from guard.metrics import evaluate_backdoor
    scores = evaluate_backdoor(model, attack, test_set)     # {"cda": ..., "asr": ..., "asr_nontarget": ...}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["METRICS", "Rate", "accuracy", "attack_success_rate", "cleansing_rates", "data_efficiency", "defended_asr",
           "evaluate_backdoor", "goal_confidences", "goal_success", "nontarget_asr", "overlap_similarity",
           "put_back_rate", "roc_auc", "source_asr"]


#: metric function -> what it measures (ALGORITHMS.md §3 label); listed by ``guard info``
METRICS = {
    "accuracy": "M1 clean data accuracy (CDA)",
    "attack_success_rate": "M2 ASR, Pick-your-Poison form (minus the target-class base rate)",
    "nontarget_asr": "M2 ASR over non-target triggered test images (MOTH form)",
    "source_asr": "M2' ASR over source-class triggered test images (Xiang form)",
    "goal_success": "M3 targeted-poisoning success per attack goal",
    "defended_asr": "M4 defended ASR over successfully poisoned models",
    "put_back_rate": "M5 put-back rate",
    "goal_confidences": "M6 target / poison confidence",
    "overlap_similarity": "M7 overlap similarity of ReScaler weight vectors",
    "cleansing_rates": "M8 training-set cleansing TPR / FPR",
    "roc_auc": "M9 model-level detection ROC AUC",
    "data_efficiency": "M10 defense effectiveness / data efficiency v_r under a CDA budget",
}


@dataclass(frozen=True)
class Rate:
    """A proportion ``value`` over ``n`` trials with its binomial standard error ``sqrt(p(1 − p)/n)`` and exact
    confidence interval (``nan`` when ``n`` = 0: the rate is undefined)."""

    value: float
    n: int

    @property
    def stderr(self) -> float:
        if self.n == 0:
            return math.nan
        return math.sqrt(self.value * (1 - self.value) / self.n)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The exact (Clopper–Pearson) two-sided ``level`` confidence interval of the proportion, from scipy's
        ``binomtest`` on ``round(value·n)`` successes (``(nan, nan)`` when ``n`` = 0). On few trials it is wide:
        5 of 89 is 5.6 % with interval (1.8 %, 12.6 %)."""
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        if self.n == 0:
            return math.nan, math.nan
        from scipy.stats import binomtest

        ci = binomtest(round(self.value * self.n), self.n).proportion_ci(confidence_level=level, method="exact")
        return float(ci.low), float(ci.high)


def _labels(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected a 1-D integer tensor of class indices, got {t.dtype} "
                         f"of shape {tuple(t.shape)}")
    return t.cpu()


def _same_length(**tensors: torch.Tensor) -> int:
    lengths = {k: int(v.shape[0]) for k, v in tensors.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"expected tensors of equal length, got lengths {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"expected at least one element, got empty {', '.join(lengths)}")
    return n


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy — clean data accuracy (CDA, M1) when ``preds`` are on the clean test set."""
    preds, labels = _labels("preds", preds), _labels("labels", labels)
    _same_length(preds=preds, labels=labels)
    return (preds == labels).double().mean().item()


def attack_success_rate(preds: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """ASR, Pick-your-Poison form (Algorithm 1 line 17; M2): the fraction of triggered test images predicted
    as ``target`` minus the fraction whose true label already is ``target``:
    ``(#(pred = t) − #(y = t)) / n`` over every triggered test image."""
    preds, labels = _labels("preds", preds), _labels("labels", labels)
    n = _same_length(preds=preds, labels=labels)
    return ((preds == target).sum() - (labels == target).sum()).item() / n


def nontarget_asr(preds: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """ASR over the triggered test images whose true class is not ``target`` (MOTH Table 8 / usual form)."""
    preds, labels = _labels("preds", preds), _labels("labels", labels)
    _same_length(preds=preds, labels=labels)
    keep = labels != target
    if not bool(keep.any()):
        raise ValueError(f"every test label equals the target {target}; the non-target ASR is undefined")
    return (preds[keep] == target).double().mean().item()


def source_asr(preds: torch.Tensor, labels: torch.Tensor, target: int, sources: Sequence[int]) -> float:
    """ASR, Xiang form (M2'): fraction of triggered test images of the ``sources`` classes predicted ``target``."""
    preds, labels = _labels("preds", preds), _labels("labels", labels)
    _same_length(preds=preds, labels=labels)
    keep = torch.isin(labels, torch.as_tensor(list(sources), dtype=labels.dtype))
    if not bool(keep.any()):
        raise ValueError(f"no test image belongs to the source classes {list(sources)}")
    return (preds[keep] == target).double().mean().item()


def evaluate_backdoor(model: torch.nn.Module, attack, test_set, *, batch_size: int = 256,
                      device: str | torch.device | None = None,
                      defense: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      generator: torch.Generator | None = None) -> dict[str, float]:
    """CDA (M1) on ``test_set`` and, on ``attack.triggered(test_set)``, the PyP ASR (M2, ``"asr"``), the
    non-target ASR (``"asr_nontarget"``) and, for attacks with source classes, Xiang's ASR (M2',
    ``"asr_source"``). ``defense`` (images -> logits) replaces the model, as in :func:`guard.train.predict`."""
    from .train import predict

    target = attack.config.target
    clean = predict(model, test_set, batch_size=batch_size, device=device, defense=defense)
    triggered = attack.triggered(test_set, generator=generator)
    poisoned = predict(model, triggered, batch_size=batch_size, device=device, defense=defense)
    out = {"cda": accuracy(clean, test_set.labels),
           "asr": attack_success_rate(poisoned, test_set.labels, target),
           "asr_nontarget": nontarget_asr(poisoned, test_set.labels, target)}
    sources = getattr(attack.config, "sources", None)
    if sources:
        out["asr_source"] = source_asr(poisoned, test_set.labels, target, sources)
    return out


# --------------------------------------------------------------------- targeted (clean-label) poisoning

def goal_success(preds: torch.Tensor, poison_classes: torch.Tensor) -> torch.Tensor:
    """Per attack goal (M3): did the poisoned model predict the poison class on the target image?
    ``preds[i]`` is the prediction of goal i's model on its (triggered for CLBD/HTBD) target image; the sum
    of the returned bool tensor is "SA" of ReScaler Table 1."""
    preds, poison_classes = _labels("preds", preds), _labels("poison_classes", poison_classes)
    _same_length(preds=preds, poison_classes=poison_classes)
    return preds == poison_classes


def defended_asr(defended_preds: torch.Tensor, poison_classes: torch.Tensor) -> Rate:
    """Defended ASR (M4): among successfully poisoned models, the fraction whose target image is still
    predicted as the poison class after the defense."""
    hit = goal_success(defended_preds, poison_classes)
    return Rate(hit.double().mean().item(), int(hit.numel()))


def put_back_rate(defended_preds: torch.Tensor, target_classes: torch.Tensor,
                  poison_classes: torch.Tensor) -> Rate:
    """Put-back rate (M5): of the defended models whose target image is no longer predicted as the poison
    class (the denominator ALGORITHMS.md M5 adopts), the fraction predicting its ground-truth class."""
    preds = _labels("defended_preds", defended_preds)
    target_classes = _labels("target_classes", target_classes)
    poison_classes = _labels("poison_classes", poison_classes)
    _same_length(defended_preds=preds, target_classes=target_classes, poison_classes=poison_classes)
    moved = preds != poison_classes
    n = int(moved.sum())
    if n == 0:
        return Rate(math.nan, 0)
    return Rate((preds[moved] == target_classes[moved]).double().mean().item(), n)


def goal_confidences(probs: torch.Tensor, target_classes: torch.Tensor,
                     poison_classes: torch.Tensor) -> tuple[float, float]:
    """(target confidence, poison confidence) (M6): mean softmax probability of each goal's target image on
    its ground-truth class and on the poison class. ``probs``: (G, K) probabilities, one row per goal."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or not probs.is_floating_point():
        raise ValueError(f"probs: expected a float tensor (goals, classes), got "
                         f"{getattr(probs, 'shape', type(probs).__name__)}")
    if bool((probs < 0).any()) or not torch.allclose(probs.sum(1), torch.ones(probs.shape[0], dtype=probs.dtype),
                                                      atol=1e-4):
        raise ValueError("probs: expected rows of softmax probabilities (non-negative, summing to 1); "
                         "apply softmax to logits first")
    target_classes = _labels("target_classes", target_classes)
    poison_classes = _labels("poison_classes", poison_classes)
    _same_length(probs=probs, target_classes=target_classes, poison_classes=poison_classes)
    rows = torch.arange(probs.shape[0])
    probs = probs.cpu().double()
    return probs[rows, target_classes].mean().item(), probs[rows, poison_classes].mean().item()


def overlap_similarity(w_i: torch.Tensor, w_j: torch.Tensor) -> float:
    """Overlap similarity (M7, rescaler_appendix.txt §C.1 eq. 4): ``‖min(w_i, w_j)‖ / ‖max(w_i, w_j)‖``."""
    if w_i.shape != w_j.shape:
        raise ValueError(f"expected weight vectors of equal shape, got {tuple(w_i.shape)} and {tuple(w_j.shape)}")
    denom = torch.maximum(w_i, w_j).norm()
    if denom == 0:
        raise ValueError("overlap similarity is undefined for two all-zero vectors")
    return (torch.minimum(w_i, w_j).norm() / denom).item()


# ------------------------------------------------------------------------------------------- defenses

def cleansing_rates(removed: torch.Tensor, poison_indices: torch.Tensor, labels: torch.Tensor,
                    target: int) -> tuple[float, float]:
    """Training-set cleansing (TPR, FPR) (M8, reverse_engineering_cleansing.txt §5.2.3).

    TPR = fraction of the backdoor training images that were removed; FPR = fraction of the *clean* training
    images labelled ``target`` that were removed. ``removed`` and ``poison_indices`` are index tensors into the
    training set whose (poisoned) ``labels`` are given.
    """
    labels = _labels("labels", labels)
    n = labels.numel()
    removed, poison_indices = _labels("removed", removed), _labels("poison_indices", poison_indices)
    for name, idx in (("removed", removed), ("poison_indices", poison_indices)):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"{name}: indices must lie in [0, {n - 1}], got [{int(idx.min())}, {int(idx.max())}]")
    if poison_indices.numel() == 0:
        raise ValueError("poison_indices is empty; TPR is undefined without backdoor images")
    is_removed = torch.zeros(n, dtype=torch.bool)
    is_removed[removed] = True
    is_poison = torch.zeros(n, dtype=torch.bool)
    is_poison[poison_indices] = True
    clean_target = (~is_poison) & (labels == target)
    if not bool(clean_target.any()):
        raise ValueError(f"no clean training image is labelled {target}; FPR is undefined")
    return is_removed[is_poison].double().mean().item(), is_removed[clean_target].double().mean().item()


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC AUC of ``scores`` (larger = more suspicious) for the ``positive`` (backdoored) class (M9): the
    probability that a random positive outscores a random negative, ties counting one half
    (Mann–Whitney U / (n₊·n₋))."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
    positive = torch.as_tensor(positive).flatten().cpu()
    if positive.dtype != torch.bool:
        if not bool(((positive == 0) | (positive == 1)).all()):
            raise ValueError("positive: expected booleans or 0/1 labels")
        positive = positive.bool()
    _same_length(scores=scores, positive=positive)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite")
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs both classes, got {n_pos} positive and {n_neg} negative scores")
    diff = scores[positive][:, None] - scores[~positive][None, :]
    return ((diff > 0).double().sum() + 0.5 * (diff == 0).double().sum()).item() / (n_pos * n_neg)


def data_efficiency(curve: Sequence[tuple[float, float]], cda0: float, delta: float = 0.02) -> float:
    """Defense effectiveness η_Δ / data efficiency v_r (M10, pick_your_poison.txt §5.2): the lowest ASR among
    the logged (CDA, ASR) points of a defense run whose CDA stays ≥ ``cda0 − delta`` (Δ = 2 points, as
    fractions). Evaluated with r trusted images, it is v_r. Raises if no point is admissible."""
    points = [(float(c), float(a)) for c, a in curve]
    if not points:
        raise ValueError("curve is empty; expected (CDA, ASR) pairs logged during the defense")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1) (a fraction, 0.02 = 2 points), got {delta}")
    kept = [a for c, a in points if c >= cda0 - delta - 1e-12]
    if not kept:
        raise ValueError(f"no point keeps CDA >= {cda0 - delta:.4f} (cda0 {cda0:.4f} - delta {delta}); "
                         "log the undefended model as the first point")
    return min(kept)
