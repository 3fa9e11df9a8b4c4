"""Poisoning and backdoor attacks behind one interface (ALGORITHMS.md §5), addressed by name.

Example::

    import torch
    from guard.attacks import create_attack
    attack = create_attack("badnets", target=0, budget=0.01)
    result = attack.poison(train_set, generator=torch.Generator().manual_seed(0))
    result.dataset, result.indices, result.record()      # poisoned set, what changed, JSON record
    triggered_test = attack.triggered(test_set)            # for the ASR metrics in guard.metrics

Backdoors (:class:`BackdoorAttack`, verb ``poison``): ``badnets``, ``c-badnets``, ``blend``, ``sig``, ``wanet``,
``adaptive-blend``, ``adaptive-patch``, ``refool``, ``instagram``, ``xiang``, ``tsb``, ``issba`` (trained-encoder
substitute), ``dfst`` (colour-style substitute), ``adv`` (per-image adversarial trigger from a trained independent
model); the supply-chain ``pcb`` and ``rescaler-aware`` (:class:`SupplyChainAttack`, verb ``train``; the latter
trains through ReScaler's adaptation and optionally past guard's trigger detector); clean-label transfer attacks
(:class:`TargetedAttack`): ``fc``, ``cp``, ``bp``, ``clbd``, ``htbd`` with :func:`make_goals`::

    goal = make_goals(train_set, test_set, num_goals=1, num_poisons=25, generator=g)[0]
    fc = create_attack("fc", eps=16 / 255)
    result = fc.poison(train_set, goal, target_image, surrogate, generator=g)

A run's record is written with :func:`save_record` and read back, attack state included, with :func:`load_record`.
"""

from . import primitives
from .adv import AdvClean
from .aware import ReScalerAware
from .base import (Attack, AttackConfig, BackdoorAttack, PoisonConfig, PoisonResult, SupplyChainAttack,
                   TargetedAttack, Trigger, attack_from_record, create_attack, describe_attacks, get_attack,
                   list_attacks, load_record, parse_options, register_attack, save_record)
from .blend import AdaptiveBlend, Blend, Refool, SIG
from .filters import DFSTStyle, Instagram
from .issba import ISSBA
from .pcb import PCB
from .patch import AdaptivePatch, BadNets, CleanLabelBadNets, TSB
from .transfer import BP, CLBD, CP, FC, HTBD, AttackGoal, TransferConfig, make_goals
from .wanet import WaNet
from .xiang import XiangPattern

__all__ = ["AdaptiveBlend", "AdaptivePatch", "AdvClean", "Attack", "AttackConfig", "AttackGoal", "BP", "BackdoorAttack",
           "BadNets", "Blend", "CLBD", "CP", "CleanLabelBadNets", "DFSTStyle", "FC", "HTBD", "ISSBA", "Instagram",
           "PCB", "PoisonConfig", "PoisonResult", "ReScalerAware", "Refool", "SIG", "SupplyChainAttack", "TSB",
           "TargetedAttack", "TransferConfig", "Trigger", "WaNet", "XiangPattern", "attack_from_record",
           "create_attack", "describe_attacks", "get_attack", "list_attacks", "load_record", "make_goals",
           "parse_options", "primitives", "register_attack", "save_record"]
