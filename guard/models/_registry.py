"""Model registry: ``create(name)`` over registered builders, in the style of timm's ``create_model``.

Every registered model is returned as a :class:`GuardModel`, which takes images in [0, 1] and normalizes
inside, so attacks, defenses and the serving handler all work in pixel space (ALGORITHMS.md §0.1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ._init import init_defaults

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ModelSpec:
    """What a registered architecture expects: its input size and the normalization baked into it."""

    name: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    family: str  # "cifar", "imagenet" or "tiny"
    description: str = ""
    num_classes: int = 10
    tags: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        c = self.input_size[0]
        if len(self.input_size) != 3 or len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"{self.name}: input_size must be (C, H, W) with C means and stds; got "
                             f"input_size={self.input_size}, mean={self.mean}, std={self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"{self.name}: std must be positive, got {self.std}")


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the statistics are non-persistent buffers (not in the state dict)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class GuardModel(nn.Module):
    """A classifier on [0, 1] images: ``net(normalize(x))``.

    ``net`` is the unmodified backbone (its state dict is what checkpoints hold); ``classifier`` is its
    final linear layer and ``features(x)`` the penultimate features, i.e. that layer's input
    (ALGORITHMS.md P5).
    """

    def __init__(self, net: nn.Module, spec: ModelSpec, classifier_name: str) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(spec.mean, spec.std)
        self.net = net
        self._classifier_name = classifier_name
        if not isinstance(self.classifier, nn.Linear):
            raise TypeError(f"{spec.name}: expected net.{classifier_name} to be nn.Linear, "
                            f"got {type(self.classifier).__name__}")

    @property
    def classifier(self) -> nn.Linear:
        return self.net.get_submodule(self._classifier_name)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the input of the final linear layer), flattened to ``(B, D)``."""
        captured: list[torch.Tensor] = []
        handle = self.classifier.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
        try:
            self(x)
        finally:
            handle.remove()
        return captured[0].flatten(1)


#: ``init(net, generator)``: draws every parameter and buffer of a freshly built ``net`` from ``generator``
InitFn = Callable[[nn.Module, torch.Generator | None], None]


@dataclass(frozen=True)
class _Entry:
    spec: ModelSpec
    builder: Callable[[int], nn.Module]
    classifier_name: str
    init: InitFn


_REGISTRY: dict[str, _Entry] = {}


def register_model(spec: ModelSpec, classifier_name: str, init: InitFn = init_defaults
                   ) -> Callable[[Callable[[int], nn.Module]], Callable[[int], nn.Module]]:
    """Decorator registering ``builder(num_classes) -> nn.Module`` under ``spec.name``.

    ``init(net, generator)`` initialises a built network as the architecture's constructor would, drawing from
    ``generator`` (default: torch's per-layer defaults, :func:`~guard.models.init_defaults`). Duplicate names are
    refused, so a typo cannot silently replace an architecture.
    """

    def decorator(builder: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        if spec.name in _REGISTRY:
            raise ValueError(f"model {spec.name!r} is already registered")
        _REGISTRY[spec.name] = _Entry(spec, builder, classifier_name, init)
        return builder

    return decorator


def list_models(family: str | None = None) -> list[str]:
    """Registered model names (optionally of one family: ``cifar``, ``imagenet``, ``tiny``), sorted."""
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.spec.family == family)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered model (raises ``ValueError`` naming the known models)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(list_models())}")
    return _REGISTRY[name].spec


def create(name: str, num_classes: int = 10, weights: str | Path | None = None, *,
           generator: torch.Generator | None = None) -> GuardModel:
    """Build a registered model in eval mode, optionally loading a checkpoint.

    The network is built on the meta device and its parameters are then drawn from ``generator`` (a CPU
    ``torch.Generator``) by the architecture's ``init``: the same seed gives the same model, and the global RNG
    is neither read nor advanced. Without a generator the parameters come from the global RNG, as torch's
    layers do.

    Example::

        model = guard.models.create("resnet20", weights="data/weights/resnet20-12fca82f.th")
        fresh = guard.models.create("resnet20", generator=torch.Generator().manual_seed(0))
    """
    spec = get_spec(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if generator is not None and not (isinstance(generator, torch.Generator) and generator.device.type == "cpu"):
        raise TypeError(f"generator must be a CPU torch.Generator or None, got {generator!r}")
    entry = _REGISTRY[name]
    spec = ModelSpec(**{**spec.__dict__, "num_classes": num_classes})
    with torch.device("meta"):
        net = entry.builder(num_classes)
    net = net.to_empty(device="cpu")
    entry.init(net, generator)
    model = GuardModel(net, spec, entry.classifier_name)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with code in it, truncated file, ...
        raise ValueError(f"cannot load {path} safely with torch.load(weights_only=True): {exc}") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), optionally under 'state_dict'; "
                         f"got {type(obj).__name__}")
    return obj


def load_weights(model: GuardModel, path: str | Path) -> GuardModel:
    """Load a state dict into ``model.net``: a ``module.``/``net.`` prefix and a wrapping dict are accepted.

    Loading is safe (``weights_only=True`` or safetensors) and strict: missing or unexpected keys and shape
    mismatches raise ``ValueError`` naming them. Missing BatchNorm ``num_batches_tracked`` counters (absent
    from some published checkpoints) are the only keys filled from the fresh model.
    """
    path = Path(path)
    state = _read_state_dict(path)
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "net."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    own = model.net.state_dict()
    for key in own:
        if key.endswith("num_batches_tracked") and key not in cleaned:
            cleaned[key] = own[key]
    missing = sorted(set(own) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(own))
    bad_shapes = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(cleaned[k].shape)}"
                  for k in own if k in cleaned and own[k].shape != cleaned[k].shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(f"{path} does not fit model {model.spec.name!r} "
                         f"(num_classes={model.num_classes}): missing keys {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}, shape mismatches {bad_shapes[:5]}")
    model.net.load_state_dict(cleaned, strict=True)
    log.info("loaded %d tensors from %s into %s", len(cleaned), path, model.spec.name)
    return model


def save_weights(model: GuardModel, path: str | Path) -> Path:
    """Save ``model.net``'s state dict (``.safetensors`` by suffix, else ``torch.save``) for ``create(weights=)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"model": model.spec.name,
                                              "num_classes": str(model.num_classes)})
    else:
        torch.save({"state_dict": state, "model": model.spec.name, "num_classes": model.num_classes}, path)
    return path
