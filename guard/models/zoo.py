"""The registered architectures (ALGORITHMS.md §0.2). Importing this module registers them."""

from __future__ import annotations

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import BasicBlock as TVBasicBlock
from torchvision.models.resnet import Bottleneck as TVBottleneck

from ._init import init_he_normal
from ._registry import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, ModelSpec, register_model
from .cifar import CifarResNet, PreActResNet, preact_resnet, resnext_cifar

_CIFAR = (3, 32, 32)
_IMAGENET = (3, 224, 224)
_TINY = (3, 16, 16)


def _cifar(name: str, description: str, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> ModelSpec:
    return ModelSpec(name, _CIFAR, mean, std, "cifar", description)


def _torchvision_init(net: nn.Module, generator: torch.Generator | None) -> None:
    """torchvision's ResNet initialisation (``zero_init_residual=False``): He-normal fan-out convolutions."""
    init_he_normal(net, generator, mode="fan_out", layers=(nn.Conv2d,))


_POST, _PRE = CifarResNet.init_weights, PreActResNet.init_weights


# --- CIFAR ResNet-(6n+2) with the option-A shortcut; pretrained files use ImageNet statistics -------------
for _n, _depth in ((3, 20), (5, 32), (7, 44), (9, 56)):
    register_model(_cifar(f"resnet{_depth}", f"CIFAR ResNet-{_depth} (option-A shortcut, He et al. 2016)",
                          IMAGENET_MEAN, IMAGENET_STD), "linear", _POST)(
        lambda num_classes, n=_n: CifarResNet((n, n, n), (16, 32, 64), num_classes, option="A"))

register_model(_cifar("resnet18_cifar", "post-activation ResNet-18, widths 64-512 (PyP; Xiang 'wide')"),
               "linear", _POST)(
    lambda num_classes: CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, "B"))
register_model(_cifar("resnet18_compact", "Xiang's compact ResNet-18, widths 16/32/64/64"), "linear", _POST)(
    lambda num_classes: CifarResNet((2, 2, 2, 2), (16, 32, 64, 64), num_classes, "B"))

# --- pre-activation ResNets and ResNeXt-29 (the ReScaler models, rescaler_appendix.txt §A) ---------------
register_model(_cifar("preact_resnet18", "pre-activation ResNet-18"), "linear", _PRE)(
    lambda num_classes: preact_resnet((2, 2, 2, 2), num_classes))
register_model(_cifar("preact_resnet34", "pre-activation ResNet-34"), "linear", _PRE)(
    lambda num_classes: preact_resnet((3, 4, 6, 3), num_classes))
register_model(_cifar("preact_resnet50", "pre-activation ResNet-50 (bottleneck)"), "linear", _PRE)(
    lambda num_classes: preact_resnet((3, 4, 6, 3), num_classes, bottleneck=True))
register_model(_cifar("resnext29_32x4d", "pre-activation ResNeXt-29 (32x4d)"), "linear", _PRE)(
    lambda num_classes: resnext_cifar((3, 3, 3), num_classes, cardinality=32, bottleneck_width=4))

# --- torchvision ImageNet-size models --------------------------------------------------------------------
for _name in ("resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2"):
    register_model(ModelSpec(_name, _IMAGENET, IMAGENET_MEAN, IMAGENET_STD, "imagenet",
                             f"torchvision {_name}"), "fc", _torchvision_init)(
        lambda num_classes, fn=getattr(tvm, _name): fn(weights=None, num_classes=num_classes))

# --- tiny variants for tests: every block type, few channels, 16x16 inputs ---------------------------------
register_model(ModelSpec("tiny_resnet", _TINY, CIFAR10_MEAN, CIFAR10_STD, "tiny",
                         "post-activation BasicBlocks, option A, widths 8/16"), "linear", _POST)(
    lambda num_classes: CifarResNet((2, 2), (8, 16), num_classes, option="A"))
register_model(ModelSpec("tiny_resnet_b", _TINY, CIFAR10_MEAN, CIFAR10_STD, "tiny",
                         "post-activation BasicBlocks, option B, widths 8/16"), "linear", _POST)(
    lambda num_classes: CifarResNet((2, 2), (8, 16), num_classes, option="B"))
register_model(ModelSpec("tiny_preact_resnet", _TINY, CIFAR10_MEAN, CIFAR10_STD, "tiny",
                         "pre-activation BasicBlocks, widths 8/16"), "linear", _PRE)(
    lambda num_classes: preact_resnet((2, 2), num_classes, widths=(8, 16), stem=8))
register_model(ModelSpec("tiny_preact_bottleneck", _TINY, CIFAR10_MEAN, CIFAR10_STD, "tiny",
                         "pre-activation bottlenecks, widths 4/8 (x4)"), "linear", _PRE)(
    lambda num_classes: preact_resnet((2, 2), num_classes, bottleneck=True, widths=(4, 8), stem=8))
register_model(ModelSpec("tiny_resnext", _TINY, CIFAR10_MEAN, CIFAR10_STD, "tiny",
                         "pre-activation ResNeXt, cardinality 4, bottleneck width 2"), "linear", _PRE)(
    lambda num_classes: resnext_cifar((2, 2), num_classes, cardinality=4, bottleneck_width=2, stem=8))
register_model(ModelSpec("tiny_tv_resnet", _TINY, IMAGENET_MEAN, IMAGENET_STD, "tiny",
                         "torchvision ResNet with BasicBlocks, layers (2, 2, 1, 1)"), "fc", _torchvision_init)(
    lambda num_classes: tvm.ResNet(TVBasicBlock, [2, 2, 1, 1], num_classes=num_classes))
register_model(ModelSpec("tiny_tv_resnext", _TINY, IMAGENET_MEAN, IMAGENET_STD, "tiny",
                         "torchvision ResNeXt bottlenecks, 4 groups of width 4, layers (2, 2, 1, 1)"), "fc",
               _torchvision_init)(
    lambda num_classes: tvm.ResNet(TVBottleneck, [2, 2, 1, 1], num_classes=num_classes, groups=4,
                                   width_per_group=4))
