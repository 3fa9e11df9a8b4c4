"""Block adapters: where ReScaler's scalars sit inside each kind of residual block.

A block adapter maps a residual block to its *scalar sites*: the submodules whose output is one
"convolution unit" of the residual branch (ReScaler eq. 2, ``x_{i+1} = x_i + Σ_j (1 − w_ij) f_ij(x_i)``,
implemented as scaling each unit's output by ``(1 − w_ij)`` before the next operation consumes it,
ALGORITHMS.md D1 / §7.1):

- pre-activation blocks: the raw output of each convolution;
- post-activation blocks (torchvision, CIFAR ResNets): the output of each convolution's BatchNorm, so that
  ``w = 1`` on every unit turns the block into its shortcut;
- grouped convolutions (ResNeXt): one scalar per group (``groups > 1``); the pointwise convolutions of a
  ResNeXt bottleneck get no scalars unless ``resnext_pointwise=True`` (ALGORITHMS.md §7.2).

Register a new block type with :func:`register_block`::

    @guard.register_block(MyBlock)
    def _my_block(block, resnext_pointwise=False):
        return [ScalarSite(block.conv_a), ScalarSite(block.conv_b)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn
from torchvision.models.resnet import BasicBlock as TVBasicBlock
from torchvision.models.resnet import Bottleneck as TVBottleneck

from ..models.cifar import BasicBlock, PreActBlock, PreActBottleneck


@dataclass(frozen=True)
class ScalarSite:
    """A submodule whose output (B, C, H, W) is multiplied by ``1 − w``: one scalar, or one per channel group."""

    module: nn.Module
    groups: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"ScalarSite.groups must be a positive int, got {self.groups!r}")


BlockAdapter = Callable[..., list[ScalarSite]]
_ADAPTERS: dict[type, BlockAdapter] = {}


def register_block(block_type: type) -> Callable[[BlockAdapter], BlockAdapter]:
    """Decorator: ``adapter(block, resnext_pointwise=False) -> list[ScalarSite]`` for ``block_type``."""
    if not (isinstance(block_type, type) and issubclass(block_type, nn.Module)):
        raise TypeError(f"register_block expects an nn.Module subclass, got {block_type!r}")

    def decorator(adapter: BlockAdapter) -> BlockAdapter:
        _ADAPTERS[block_type] = adapter
        return adapter

    return decorator


def registered_blocks() -> list[type]:
    """The block classes ReScaler knows."""
    return list(_ADAPTERS)


def _adapter_for(module: nn.Module) -> BlockAdapter | None:
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


@dataclass(frozen=True)
class BlockSites:
    """The scalar sites of one adapted block, with the block's qualified name."""

    name: str
    sites: tuple[ScalarSite, ...]

    @property
    def num_scalars(self) -> int:
        return sum(s.groups for s in self.sites)


def find_blocks(model: nn.Module, resnext_pointwise: bool = False) -> list[BlockSites]:
    """Every registered residual block of ``model`` except the first block of each stage.

    A stage is an ``nn.Sequential`` of blocks; its first block is "critical" and holds the down-sampling
    shortcut, so it gets no scalars (rescaler_main.txt §3.1). Blocks are not searched inside other blocks.
    """
    found: list[BlockSites] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            adapter = _adapter_for(child)
            if adapter is None:
                visit(child, name)
            elif not (isinstance(module, nn.Sequential) and child is module[0]):
                found.append(BlockSites(name, tuple(adapter(child, resnext_pointwise=resnext_pointwise))))

    visit(model, "")
    return found


def find_stages(model: nn.Module) -> list[str]:
    """Qualified names of ``model``'s stages — the ``nn.Sequential`` containers of registered residual blocks —
    in forward order; a stage's output is its last block's (the "residual groups" of NAD, ALGORITHMS.md D6)."""
    found: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, nn.Sequential) and any(_adapter_for(b) is not None for b in child):
                found.append(name)
            elif _adapter_for(child) is None:
                visit(child, name)

    visit(model, "")
    return found


# --- adapters for the blocks the project ships ---------------------------------------------------------

@register_block(TVBasicBlock)
@register_block(BasicBlock)
def _post_activation_basic(block: nn.Module, resnext_pointwise: bool = False) -> list[ScalarSite]:
    return [ScalarSite(block.bn1), ScalarSite(block.bn2)]


@register_block(TVBottleneck)
def _post_activation_bottleneck(block: TVBottleneck, resnext_pointwise: bool = False) -> list[ScalarSite]:
    groups = block.conv2.groups
    if groups == 1:
        return [ScalarSite(block.bn1), ScalarSite(block.bn2), ScalarSite(block.bn3)]
    sites = [ScalarSite(block.bn2, groups)]
    return [ScalarSite(block.bn1), *sites, ScalarSite(block.bn3)] if resnext_pointwise else sites


@register_block(PreActBlock)
def _pre_activation_basic(block: PreActBlock, resnext_pointwise: bool = False) -> list[ScalarSite]:
    return [ScalarSite(block.conv1), ScalarSite(block.conv2)]


@register_block(PreActBottleneck)
def _pre_activation_bottleneck(block: PreActBottleneck, resnext_pointwise: bool = False) -> list[ScalarSite]:
    groups = block.conv2.groups
    if groups == 1:
        return [ScalarSite(block.conv1), ScalarSite(block.conv2), ScalarSite(block.conv3)]
    sites = [ScalarSite(block.conv2, groups)]
    return [ScalarSite(block.conv1), *sites, ScalarSite(block.conv3)] if resnext_pointwise else sites
