"""``guard poison``: poison a training set with a registered backdoor attack, train on it, and record.

Writes the poisoned checkpoint (``--out``, loadable by ``guard.models.create``) and a JSON record beside it
(``--record``, default ``<out>.json``): the attack and its config, the seed, the poisoned indices and their
original labels, and the CDA / ASR measured on ``--eval-split``; an attack with state (ISSBA's fitted encoder,
Adv's surrogate) also writes it beside the record, so ``guard eval --attack-record`` rebuilds the exact trigger.
A supply-chain attack (``pcb``) trains the model itself on the clean set. ``--resume`` continues an interrupted
run (the poisoned set is rebuilt from the seed and checked against the record).

Example::

    guard poison --attack badnets --attack-opt target=0 --attack-opt budget=0.01 \\
        --model resnet20 --dataset cifar10 --epochs 30 --out runs/badnets.pt

The ``--attack NAME --attack-opt k=v`` flags and the record reader are shared with ``guard train``, ``guard eval``
and ``guard repair`` (:mod:`guard.cli._common`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import CLIError
from ._common import (add_attack_arguments, add_record_argument, add_training_arguments, attack_from_args,
                      attack_report, initial_model, load_data, resolve_device, resolve_split, training_config)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("poison", help="poison a training set with a backdoor, train, record CDA/ASR",
                              description="Poison a training set with a registered backdoor attack, train a "
                                          "model on it and write the checkpoint plus a JSON record.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_attack_arguments(p, required=True)
    add_training_arguments(p, eval_split="test")
    add_record_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..attacks import SupplyChainAttack, save_record
    from ..train import train

    config = training_config(args)
    attack = attack_from_args(args)
    if args.eval_split is None:  # guard train --attack: the ASR needs a test split
        args.eval_split = "test"
    out = Path(args.out)
    record_path = Path(args.record) if args.record else out.with_name(out.name + ".json")

    split = resolve_split(args)
    train_set = load_data(args, args.model, split)
    eval_set = load_data(args, args.model, args.eval_split)
    generator = torch.Generator().manual_seed(args.seed)
    supply_chain = isinstance(attack, SupplyChainAttack)  # PCB: the data stay clean, the attacker trains
    if supply_chain:
        result = None
        record = attack.record()
    else:
        result = attack.poison(train_set, generator)
        record = result.record()
    record.update({"seed": args.seed, "model": args.model, "dataset": args.dataset,
                   "split": split, "train_images": len(train_set), "mode": args.mode,
                   "train_config": {k: getattr(config, k) for k in config.__dataclass_fields__},
                   "weights": str(out)})
    if args.resume:
        if not record_path.is_file():
            raise CLIError(f"--resume: no record at {record_path}")
        previous = json.loads(record_path.read_text())
        if previous.get("indices") != record["indices"] or previous.get("config") != record["config"]:
            raise CLIError(f"--resume: the poisoned set rebuilt from seed {args.seed} differs from {record_path}")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_record(record, record_path, attack)

    model = initial_model(args, train_set.num_classes)
    device = resolve_device(args.device)
    started = time.perf_counter()
    fit = attack.train if supply_chain else train
    history = fit(model, train_set if result is None else result.dataset, config, generator=generator,
                  device=device, checkpoint=out, resume=args.resume, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    report = attack_report(model, attack, eval_set, device=device)
    record.update({"eval_split": args.eval_split, "eval_images": len(eval_set), "train_seconds": round(seconds, 3),
                   "epochs": len(history.history), "train_loss": history.last.loss,
                   **{k: v for k, v in report.items() if k != "attack"}})
    save_record(record, record_path, attack)
    if args.json:
        print(json.dumps({k: v for k, v in record.items()
                          if k not in ("indices", "original_labels", "poisoned_labels", "cover_indices")}, indent=2))
    else:
        print(f"{attack.name}: poisoned {record['num_poisons']} of {len(train_set)} images, trained {args.model} "
              f"for {len(history.history)} epochs in {seconds:.1f}s; {args.eval_split}: CDA {report['cda']:.4f}, "
              f"ASR {report['asr']:.4f} (non-target {report['asr_nontarget']:.4f})")
        print(f"weights: {out}  record: {record_path}")
    return 0
