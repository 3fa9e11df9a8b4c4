"""ReScaler: test-time adaptation of residual blocks (rescaler_main.txt §3, rescaler_appendix.txt §A, C.1).

For every input x, per-convolution scalars ``w ∈ [0, ε]`` start at 0 and take one gradient-*ascent* step on
the cross-entropy of the model's own prediction (eq. 3)::

    y_p = argmax F_θ(x);   w ← clip(w + α ∇_w CE(F_{θ,w}(x), y_p), 0, ε)

and the defended prediction is ``F_{θ,w}(x)`` (eq. 2). A batch of B inputs gets a ``(B, S)`` scalar tensor:
samples do not interact in eval mode and the loss is summed, so one forward and one backward pass over the
batch give exactly the per-input gradients (ALGORITHMS.md D1, "batched implementation").
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .._validation import check_images
from ..models import GuardModel
from .adapters import BlockSites, find_blocks


@dataclass(frozen=True)
class ReScalerConfig:
    """ReScaler hyper-parameters. Defaults: ε = 0.15, α = 1.0, one step (rescaler_appendix.txt §A)."""

    eps: float = 0.15
    alpha: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps <= 1:
            raise ValueError(f"eps must be a number in (0, 1], got {self.eps!r}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")


@dataclass(frozen=True)
class Adaptation:
    """Result of :meth:`ReScaler.adapt` for a batch of B inputs."""

    logits: torch.Tensor            # (B, K) defended logits F_{θ,w}(x)
    original_logits: torch.Tensor   # (B, K) undefended logits F_θ(x)
    scalars: torch.Tensor           # (B, S) learned w, in [0, ε]

    @property
    def labels(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @property
    def original_labels(self) -> torch.Tensor:
        return self.original_logits.argmax(1)

    @property
    def reverted(self) -> torch.Tensor:
        """Boolean (B,): inputs whose prediction the adaptation changed."""
        return self.labels != self.original_labels


class ReScaler(nn.Module):
    """Wrap a residual network with per-input ReScaler adaptation, leaving the network itself untouched.

    Forward hooks on the scalar sites (see :mod:`guard.rescaler.adapters`) multiply each unit's output by
    ``1 − w``; they act only inside :meth:`adapt` on the calling thread and are identity elsewhere, so the
    wrapped model keeps its outputs and ``state_dict`` and several threads may adapt concurrently.
    :meth:`detach` removes the hooks. The wrapped model is put in eval mode (BatchNorm uses running
    statistics, so samples in a batch stay independent).

    Example::

        rescaler = ReScaler(model, eps=0.15, alpha=1.0)
        out = rescaler.adapt(images)     # out.logits, out.original_logits, out.scalars
    """

    def __init__(self, model: nn.Module, eps: float = 0.15, alpha: float = 1.0, steps: int = 1, *,
                 input_size: tuple[int, int, int] | None = None, amp_dtype: torch.dtype | None = None,
                 resnext_pointwise: bool = False) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"ReScaler wraps an nn.Module, got {type(model).__name__}")
        self.config = ReScalerConfig(eps, alpha, steps)
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}")
        self.amp_dtype = amp_dtype
        self.blocks: list[BlockSites] = find_blocks(model, resnext_pointwise)
        if not self.blocks:
            from .adapters import registered_blocks

            raise ValueError(
                f"ReScaler needs a residual network: found no adaptable residual blocks in "
                f"{type(model).__name__} (expected non-first blocks of stages built from "
                f"{', '.join(c.__name__ for c in registered_blocks())}; register other block types with "
                f"guard.register_block)")
        self.model = model.eval()
        if input_size is None and isinstance(model, GuardModel):
            input_size = model.spec.input_size
        self.input_size = input_size
        self._pixel_range = isinstance(model, GuardModel)
        self._local = threading.local()
        self._handles: list[RemovableHandle] = []
        offset = 0
        for block in self.blocks:
            for site in block.sites:
                self._handles.append(site.module.register_forward_hook(self._make_hook(offset, site.groups)))
                offset += site.groups
        self.num_scalars = offset

    # -- hooks -------------------------------------------------------------------------------------------
    def _make_hook(self, offset: int, groups: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            scale = getattr(self._local, "scale", None)
            if scale is None:
                return None
            s = scale[:, offset:offset + groups]
            channels = output.shape[1]
            if groups > 1:
                if channels % groups:
                    raise ValueError(f"scalar site with {groups} groups got {channels} channels "
                                     f"(not divisible) in {type(module).__name__}")
                s = s.repeat_interleave(channels // groups, dim=1)
            return output * s.to(output.dtype).view(s.shape[0], -1, 1, 1)

        return hook

    @contextlib.contextmanager
    def _scaled(self, scalars: torch.Tensor):
        """Activate ``1 − scalars`` on this thread for the duration of the block (always reset)."""
        self._local.scale = 1 - scalars
        try:
            yield
        finally:
            self._local.scale = None

    def detach(self) -> nn.Module:
        """Remove every hook and return the wrapped model, as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return self.model

    def train(self, mode: bool = True) -> "ReScaler":
        """ReScaler always runs its model in eval mode; ``train()`` is refused rather than silently ignored."""
        if mode:
            raise RuntimeError("ReScaler adapts in eval mode only (BatchNorm running statistics); "
                               "train the wrapped model directly")
        return super().train(False)

    # -- the algorithm -----------------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if not self._handles:
            raise RuntimeError("this ReScaler was detached; create a new one")
        x = check_images(x, self.input_size, pixel_range=self._pixel_range)
        param = next(self.model.parameters())
        x = x.to(device=param.device, dtype=param.dtype)
        return x.clone() if x.is_inference() else x

    def _logits(self, x: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        autocast = (torch.autocast(x.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with self._scaled(scalars), autocast:
            logits = self.model(x)
        return logits if logits.dtype == torch.float64 else logits.float()

    def _check_scalars(self, scalars: torch.Tensor, batch: int, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(scalars, torch.Tensor) or not scalars.is_floating_point():
            raise TypeError(f"scalars: expected a float tensor of shape ({self.num_scalars},) or "
                            f"(B, {self.num_scalars}), got {scalars!r:.80}")
        if scalars.shape not in ((self.num_scalars,), (batch, self.num_scalars)):
            raise ValueError(f"scalars: expected shape ({self.num_scalars},) or ({batch}, {self.num_scalars}), "
                             f"got {tuple(scalars.shape)}")
        return scalars.to(device=x.device, dtype=self._scalar_dtype(x)).expand(batch, self.num_scalars)

    @staticmethod
    def _scalar_dtype(x: torch.Tensor) -> torch.dtype:
        """Scalars are float32 (also under autocast), float64 for a float64 model."""
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def adapt(self, x: torch.Tensor, *, target: torch.Tensor | None = None,
              steps: int | None = None, eps: float | None = None, create_graph: bool = False) -> Adaptation:
        """Adapt the scalars for every input of the batch ``x`` (B, C, H, W) in [0, 1].

        Default: ``steps`` ascent steps on CE to the model's own prediction (eq. 3). With ``target`` (B,)
        labels, *descend* on CE to those labels instead — the label-targeted objective of the transfer
        analysis (rescaler_appendix.txt C.1: ε = 0.3, 100 steps). Each step is one forward and one backward
        pass over the whole batch; the defended logits take one more forward pass.

        ``create_graph=True`` keeps the graph through the steps: the returned logits, original logits and
        scalars are differentiable functions of the model's parameters and of ``x`` (second order through
        eq. 3's gradient) — what an attacker who trains or crafts through the adaptation optimises.
        """
        with torch.inference_mode(False), torch.enable_grad():
            x = self._prepare(x)
            w, original = self._ascend(x, target, steps, eps, create_graph)
            with torch.set_grad_enabled(create_graph):
                logits = self._logits(x, w)
        return Adaptation(logits=logits, original_logits=original, scalars=w)

    def adapt_scalars(self, x: torch.Tensor, *, create_graph: bool = False,
                      predicted: torch.Tensor | None = None) -> torch.Tensor:
        """The adapted scalars (B, S) of :meth:`adapt` without its defended forward pass — for a caller that
        applies them itself (:meth:`logits_with`, :meth:`scaled`).

        ``predicted`` (B,) int64: the labels eq. 3 ascends from instead of the model's own prediction (an
        attacker simulating its future victim on a surrogate, :class:`guard.attacks.TransferConfig`'s
        ``adapted_aim``)."""
        with torch.inference_mode(False), torch.enable_grad():
            x = self._prepare(x)
            if predicted is not None:
                predicted = self._check_target(predicted, x.shape[0], x.device, "predicted")
            return self._ascend(x, None, None, None, create_graph, predicted)[0]

    @contextlib.contextmanager
    def scaled(self, scalars: torch.Tensor):
        """Within the block, every forward pass of the wrapped model on this thread runs with its units scaled
        by ``1 − scalars`` (B, S), one row per input of the batch — for reading more than logits under given
        scalars (features, intermediate layers); :meth:`logits_with` is the logits-only form."""
        if not self._handles:
            raise RuntimeError("this ReScaler was detached; create a new one")
        if (not isinstance(scalars, torch.Tensor) or not scalars.is_floating_point() or scalars.dim() != 2
                or scalars.shape[1] != self.num_scalars):
            raise ValueError(f"scalars: expected a float tensor of shape (B, {self.num_scalars}), got "
                             f"{getattr(scalars, 'shape', type(scalars).__name__)}")
        with self._scaled(scalars):
            yield

    def _ascend(self, x: torch.Tensor, target: torch.Tensor | None, steps: int | None, eps: float | None,
                create_graph: bool, predicted: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eq. 3's steps on the prepared batch ``x``: (scalars, the undefended logits of the first step).
        ``target``: descend on CE to these labels instead (appendix C.1); ``predicted``: ascend from these
        labels instead of the model's own prediction."""
        cfg = ReScalerConfig(self.config.eps if eps is None else eps, self.config.alpha,
                             self.config.steps if steps is None else steps)
        batch = x.shape[0]
        if target is not None:
            target = self._check_target(target, batch, x.device)
        w = torch.zeros(batch, self.num_scalars, device=x.device, dtype=self._scalar_dtype(x), requires_grad=True)
        original = None
        for _ in range(cfg.steps):
            logits = self._logits(x, w)
            if original is None:
                original = logits if create_graph else logits.detach()
            labels = target if target is not None else predicted if predicted is not None else \
                original.detach().argmax(1)
            loss = F.cross_entropy(logits, labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, w, create_graph=create_graph)
            step = cfg.alpha * grad if target is None else -cfg.alpha * grad
            w = ((w + step).clamp(0.0, cfg.eps) if create_graph
                 else (w.detach() + step).clamp_(0.0, cfg.eps).requires_grad_(True))
        return (w if create_graph else w.detach()), original

    def _check_target(self, target: torch.Tensor, batch: int, device: torch.device,
                      name: str = "target") -> torch.Tensor:
        if not isinstance(target, torch.Tensor) or target.dtype != torch.int64:
            raise TypeError(f"{name}: expected an int64 tensor of shape ({batch},), got {target!r:.80}")
        if target.shape != (batch,):
            raise ValueError(f"{name}: expected shape ({batch},), got {tuple(target.shape)}")
        return target.to(device)

    @torch.no_grad()
    def predict_with(self, x: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        """Logits of the network under fixed ``scalars`` (S,) or (B, S) — e.g. weights learned on another
        model for the transfer analysis (rescaler_appendix.txt C.1)."""
        return self.logits_with(x, scalars)

    def logits_with(self, x: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        """:meth:`predict_with` in the caller's grad mode: differentiable with respect to the model's parameters
        and ``x`` (the scalars taken as given) — the first-order view of an attacker optimising through the
        adaptation."""
        with torch.inference_mode(False):
            x = self._prepare(x)
            return self._logits(x, self._check_scalars(scalars, x.shape[0], x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Defended logits ``F_{θ,w(x)}(x)``."""
        return self.adapt(x).logits

    def extra_repr(self) -> str:
        c = self.config
        return f"eps={c.eps}, alpha={c.alpha}, steps={c.steps}, num_scalars={self.num_scalars}"


def overlap_similarity(w_i: torch.Tensor, w_j: torch.Tensor) -> torch.Tensor:
    """Overlap similarity of two scalar vectors, ``‖min(w_i, w_j)‖ / ‖max(w_i, w_j)‖`` (appendix eq. 4).

    1 iff equal, 0 iff disjoint support; defined for non-negative, not-both-zero vectors. Batched over
    leading dimensions.
    """
    if w_i.shape != w_j.shape:
        raise ValueError(f"overlap_similarity: shapes must match, got {tuple(w_i.shape)} and {tuple(w_j.shape)}")
    if bool((w_i < 0).any() or (w_j < 0).any()):
        raise ValueError("overlap_similarity: expected non-negative scalar vectors")
    denom = torch.linalg.vector_norm(torch.maximum(w_i, w_j), dim=-1)
    if bool((denom == 0).any()):
        raise ValueError("overlap_similarity: undefined when both vectors are zero")
    return torch.linalg.vector_norm(torch.minimum(w_i, w_j), dim=-1) / denom
