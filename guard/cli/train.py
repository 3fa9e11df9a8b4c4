"""``guard train``: train a registered model on a dataset with :func:`guard.train.train`.

Example::

    guard train --model resnet20 --dataset cifar10 --data-dir data --epochs 120 --out runs/r20.pt
    guard train --model resnet20 --mode last-layer --weights runs/r20.pt --out runs/r20-ll.pt --resume
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from . import CLIError
from ._common import (add_attack_arguments, add_record_argument, add_training_arguments, initial_model, load_data,
                      resolve_device, resolve_split, training_config)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a registered model (scratch, finetune or last-layer)",
                              description="Train a registered model on a dataset: from scratch, fine-tuning "
                                          "or last-layer transfer. With --attack NAME the training set is "
                                          "poisoned first and a JSON record written, as by guard poison.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p)
    add_attack_arguments(p, required=False, from_record=False)
    add_record_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import train, train_state_path

    if args.attack is not None:
        from . import poison

        return poison.run(args)
    if args.attack_opt or args.record:
        raise CLIError("--attack-opt and --record need --attack NAME")
    config = training_config(args)

    device = resolve_device(args.device)
    split = resolve_split(args)
    train_set = load_data(args, args.model, split)
    eval_set = load_data(args, args.model, args.eval_split) if args.eval_split else None
    model = initial_model(args, train_set.num_classes)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    result = train(model, train_set, config, eval_set=eval_set, generator=generator,
                   device=device, checkpoint=args.out, resume=args.resume,
                   progress=not args.no_progress)
    seconds = time.perf_counter() - started
    last = result.last
    summary = {
        "model": args.model, "mode": args.mode, "dataset": args.dataset, "split": split,
        "train_images": len(train_set), "epochs": len(result.history), "seconds": round(seconds, 3),
        "loss": last.loss, "train_accuracy": last.train_accuracy, "eval_accuracy": last.eval_accuracy,
        "weights": str(args.out), "state": str(train_state_path(args.out)),
        "config": dataclasses.asdict(config),
        "history": [dataclasses.asdict(h) for h in result.history],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        evaluated = "" if last.eval_accuracy is None else f", {args.eval_split} accuracy {last.eval_accuracy:.4f}"
        print(f"trained {args.model} ({args.mode}) for {len(result.history)} epochs on {len(train_set)} "
              f"{args.dataset} images in {seconds:.1f}s: loss {last.loss:.4f}, train accuracy "
              f"{last.train_accuracy:.4f}{evaluated}")
        print(f"weights: {args.out}  (guard eval --model {args.model} --weights {args.out} ...)")
    return 0
