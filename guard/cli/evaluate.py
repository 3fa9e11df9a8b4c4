"""``guard eval``: accuracy of a model on a dataset split, with and without ReScaler.

Example::

    guard eval --model resnet20 --weights resnet20-12fca82f.th --dataset cifar10 --data-dir data \\
        --split test-lossless --rescaler eps=0.15,alpha=1.0 --json

One goal of ReScaler's Table 1 (the transfer setting, ALGORITHMS.md S1; ``benchmarks/rescaler_cifar10.py`` runs
many): the weights are the pretrained backbone the attacker knows, the target is image 12 of ``--split``, the
poisons are 5 random ``train`` images of class 3, and a victim fine-tunes a fresh last layer on them::

    guard eval --model resnet20 --weights resnet20-12fca82f.th --data-dir data --split test-lossless \\
        --attack fc --attack-goal target=12,poison_class=3 --rescaler
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from . import CLIError
from ._common import (add_attack_arguments, add_data_arguments, attack_from_args, attack_report, load_data,
                      resolve_device, resolve_split)


def parse_rescaler(spec: str) -> dict[str, float | int]:
    """``"eps=0.15,alpha=1.0,steps=1"`` -> ReScaler keyword arguments (an empty string keeps the defaults).

    Keys and their types are the fields of :class:`guard.ReScalerConfig`; ranges are checked by it.
    """
    from ..rescaler import ReScalerConfig

    fields = {f.name: type(f.default) for f in dataclasses.fields(ReScalerConfig)}
    kwargs: dict[str, float | int] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise CLIError(f"--rescaler: expected key=value items like eps=0.15, got {item!r}")
        if key not in fields:
            raise CLIError(f"--rescaler: unknown key {key!r}; expected one of {', '.join(fields)}")
        if key in kwargs:
            raise CLIError(f"--rescaler: {key} given twice")
        try:
            kwargs[key] = fields[key](value)
        except ValueError as exc:
            raise CLIError(f"--rescaler: {key} expects {'an int' if fields[key] is int else 'a number'}, "
                           f"got {value!r}") from exc
    try:
        config = ReScalerConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--rescaler: {exc}") from exc
    return dataclasses.asdict(config)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy with and without ReScaler",
                              description="Accuracy of a model on a dataset split, with and without ReScaler.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model name (see `guard info`)")
    p.add_argument("--weights", required=True, help="weights file (state dict, .pt/.th or .safetensors)")
    add_data_arguments(p, default_split="test")
    p.add_argument("--rescaler", nargs="?", const="", default=None, metavar="eps=E,alpha=A[,steps=S]",
                   help="also evaluate through ReScaler with these settings (bare flag: the defaults)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_attack_arguments(p, targeted=True)  # --attack / --attack-opt / --attack-record: ASR on triggered images
    p.add_argument("--attack-goal", default=None, metavar="target=I,poison_class=C[,...]",
                   help="with a transfer attack (fc, cp, bp, clbd, htbd): run one attack goal end to end — craft "
                        "the poisons against --weights, fine-tune a victim's last layer, defend with ReScaler. "
                        "Keys: target (index into --split), poison_class, poisons (default 5), seed (default 0), "
                        "finetune_images (default 500), epochs (default 35)")
    p.set_defaults(func=run)


_GOAL_KEYS = {"target": None, "poison_class": None, "poisons": 5, "seed": 0, "finetune_images": 500, "epochs": 35}


def parse_goal(spec: str) -> dict[str, int]:
    """``"target=12,poison_class=3"`` -> the goal's keys (all ints); ``target`` and ``poison_class`` required."""
    values: dict[str, int] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in _GOAL_KEYS:
            raise CLIError(f"--attack-goal: expected key=value items with keys {', '.join(_GOAL_KEYS)}, got {item!r}")
        if key in values:
            raise CLIError(f"--attack-goal: {key} given twice")
        try:
            values[key] = int(value)
        except ValueError as exc:
            raise CLIError(f"--attack-goal: {key} expects an int, got {value!r}") from exc
        if values[key] < 0:
            raise CLIError(f"--attack-goal: {key} must be >= 0, got {values[key]}")
    missing = [k for k, v in _GOAL_KEYS.items() if v is None and k not in values]
    if missing:
        raise CLIError(f"--attack-goal: {' and '.join(missing)} required (e.g. target=12,poison_class=3)")
    return {k: values.get(k, default) for k, default in _GOAL_KEYS.items()}


def goal_report(args: argparse.Namespace, model, dataset, attack, rescaler_kwargs: dict, device) -> dict:
    """One attack goal end to end (guard.goals): poisons, victim, ReScaler's verdict and validation accuracy."""
    import torch

    from ..attacks import AttackGoal
    from ..goals import FeatureBank, GoalProtocol, evaluate_goal, goal_victim, image_features
    from ..rescaler import ReScaler
    from ..train import predict

    spec = parse_goal(args.attack_goal)
    if spec["target"] >= len(dataset):
        raise CLIError(f"--attack-goal: target={spec['target']} is not an image of {args.split or 'the split'} "
                       f"(expected 0..{len(dataset) - 1})")
    target_class = int(dataset.labels[spec["target"]])
    if not 0 <= spec["poison_class"] < dataset.num_classes or spec["poison_class"] == target_class:
        raise CLIError(f"--attack-goal: poison_class must be a class in 0..{dataset.num_classes - 1} other than "
                       f"the target's class {target_class}, got {spec['poison_class']}")
    try:
        protocol = GoalProtocol(finetune_images=spec["finetune_images"], epochs=spec["epochs"])
    except ValueError as exc:
        raise CLIError(f"--attack-goal: {exc}") from exc
    train_set = load_data(args, args.model, "train")
    g = torch.Generator().manual_seed(spec["seed"])
    pool = (train_set.labels == spec["poison_class"]).nonzero().flatten()
    if spec["poisons"] < 1 or spec["poisons"] >= protocol.finetune_images or pool.numel() < spec["poisons"]:
        raise CLIError(f"--attack-goal: poisons must be in 1..{min(pool.numel(), protocol.finetune_images - 1)}, "
                       f"got {spec['poisons']}")
    bases = pool[torch.randperm(pool.numel(), generator=g)[:spec["poisons"]]]
    goal = AttackGoal(spec["target"], target_class, spec["poison_class"], tuple(bases.tolist()))
    local = AttackGoal(goal.target_index, target_class, goal.poison_class, tuple(range(spec["poisons"])))
    target = dataset.images[goal.target_index].float() / 255
    started = time.perf_counter()
    poisons = attack.poison(train_set.subset(bases), local, target, model, g).dataset.images
    clean = torch.randperm(len(train_set), generator=g)[:protocol.finetune_images + spec["poisons"]]
    bank = FeatureBank(model, train_set, clean, protocol.epochs, g)
    victim = goal_victim(model, bank, goal, poisons, protocol, g)
    keep = torch.ones(len(dataset), dtype=torch.bool)
    keep[goal.target_index] = False
    val = dataset.subset(keep.nonzero().flatten())
    rescaler = ReScaler(victim, **rescaler_kwargs)
    try:
        outcome = evaluate_goal(attack.target_input(target), goal, rescaler)
        defended = predict(victim, val, batch_size=args.batch_size, device=device, defense=rescaler)
    finally:
        rescaler.detach()
    undefended = victim.classifier(image_features(victim, val.images).to(device)).argmax(1).cpu()
    return {"attack": attack.name, "goal": {"target": goal.target_index, "target_class": target_class,
                                            "poison_class": goal.poison_class, "base_indices": list(goal.base_indices)},
            "protocol": dataclasses.asdict(protocol), "rescaler": rescaler_kwargs, **outcome.summary(goal),
            "undefended_val_acc": (undefended == val.labels).double().mean().item(),
            "defended_val_acc": (defended == val.labels).double().mean().item(),
            "seconds": round(time.perf_counter() - started, 1)}


def run(args: argparse.Namespace) -> int:
    from ..attacks import list_attacks
    from ..models import create
    from ..rescaler import ReScaler
    from ..train import predict

    rescaler_kwargs = parse_rescaler(args.rescaler) if args.rescaler is not None else None
    targeted = args.attack in list_attacks("targeted")
    if targeted and args.attack_goal is None:
        raise CLIError(f"--attack {args.attack} is a transfer attack: give the goal with --attack-goal "
                       f"target=I,poison_class=C")
    if args.attack_goal is not None and not targeted:
        raise CLIError(f"--attack-goal needs a transfer attack ({', '.join(list_attacks('targeted'))}), "
                       f"got --attack {args.attack}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    split = resolve_split(args)
    dataset = load_data(args, args.model, split)
    model = create(args.model, num_classes=dataset.num_classes, weights=args.weights).to(device)
    labels = dataset.labels

    started = time.perf_counter()
    plain = predict(model, dataset, batch_size=args.batch_size, device=device)
    seconds = time.perf_counter() - started
    result = {
        "model": args.model, "weights": str(args.weights), "dataset": args.dataset, "split": split,
        "n": len(dataset), "device": str(device), "batch_size": args.batch_size,
        "accuracy": (plain == labels).double().mean().item(),
        "seconds": round(seconds, 4), "images_per_second": round(len(dataset) / seconds, 1),
    }
    if rescaler_kwargs is not None:
        rescaler = ReScaler(model, **rescaler_kwargs)
        try:
            started = time.perf_counter()
            defended = predict(model, dataset, batch_size=args.batch_size, device=device, defense=rescaler)
            seconds = time.perf_counter() - started
        finally:
            rescaler.detach()
        result.update({
            "rescaler": rescaler_kwargs, "num_scalars": rescaler.num_scalars,
            "defended_accuracy": (defended == labels).double().mean().item(),
            "changed_predictions": (defended != plain).double().mean().item(),
            "defended_seconds": round(seconds, 4),
            "defended_images_per_second": round(len(dataset) / seconds, 1),
        })
    # --- attack: CDA / ASR on triggered images (and through ReScaler when --rescaler is given) ---
    attack = attack_from_args(args)
    if attack is not None and attack.kind == "targeted":
        result["attack_goal"] = goal_report(args, model, dataset, attack, rescaler_kwargs or parse_rescaler(""),
                                            device)
    elif attack is not None:
        result["attack"] = attack_report(model, attack, dataset, batch_size=args.batch_size, device=device)
        if rescaler_kwargs is not None:
            rescaler = ReScaler(model, **rescaler_kwargs)
            try:
                result["attack"]["defended"] = attack_report(model, attack, dataset, batch_size=args.batch_size,
                                                             device=device, defense=rescaler)
            finally:
                rescaler.detach()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model} on {args.dataset}/{split} ({result['n']} images, {device}): accuracy "
              f"{result['accuracy']:.4f} ({result['images_per_second']:.0f} images/s)")
        if rescaler_kwargs is not None:
            settings = ", ".join(f"{k}={v}" for k, v in rescaler_kwargs.items())
            print(f"with ReScaler ({settings}; {result['num_scalars']} scalars): accuracy "
                  f"{result['defended_accuracy']:.4f}, {100 * result['changed_predictions']:.1f}% of predictions "
                  f"changed ({result['defended_images_per_second']:.0f} images/s)")
        if "attack_goal" in result:
            a = result["attack_goal"]
            print(f"attack goal ({a['attack']}): target {a['goal']['target']} (class {a['goal']['target_class']}) "
                  f"-> poison class {a['goal']['poison_class']}: {'success' if a['success'] else 'failure'} "
                  f"(victim says {a['undefended_label']}); with ReScaler {a['defended_label']} "
                  f"(target confidence {a['target_confidence']:.3f}, poison confidence {a['poison_confidence']:.3f}); "
                  f"validation accuracy {a['undefended_val_acc']:.4f} -> {a['defended_val_acc']:.4f}")
        elif attack is not None:
            a = result["attack"]
            print(f"attack {a['attack']}: ASR {a['asr']:.4f} (non-target {a['asr_nontarget']:.4f})"
                  + (f", with ReScaler {a['defended']['asr']:.4f}" if "defended" in a else ""))
    return 0
