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

#: flags of ``guard train`` that override a preset field of :class:`guard.train.TrainConfig`
_CONFIG_FLAGS = ("epochs", "lr", "momentum", "weight_decay", "batch_size", "optimizer", "schedule",
                 "milestones", "augment")


def add_data_arguments(parser: argparse.ArgumentParser, default_split: str) -> None:
    """Dataset flags shared by ``guard train`` and ``guard eval``."""
    from ..data import DATASETS

    parser.add_argument("--dataset", default="cifar10", choices=DATASETS, help="dataset (default: cifar10)")
    parser.add_argument("--data-dir", default=None,
                        help="data root (default: $GUARD_DATA_DIR, else ~/.cache/guard/data); for "
                             "imagefolder, the folder of class sub-folders")
    parser.add_argument("--split", default=None,
                        help=f"dataset split (default: {default_split}); cifar10: train, test (lossy in the npz "
                             "layout), test-lossless (first 1000 exact test images); imagefolder reads --data-dir "
                             "itself and takes no split")
    parser.set_defaults(default_split=default_split)
    parser.add_argument("--download", action="store_true", help="download through torchvision if missing")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="use only the first N images (of each split)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from exc


def resolve_split(args: argparse.Namespace) -> str:
    """``--split``, else the command's default (imagefolder has one split: the folder itself)."""
    if args.split is not None:
        return args.split
    return "train" if args.dataset == "imagefolder" else args.default_split


def load_data(args: argparse.Namespace, model_name: str, split: str):
    """The dataset split, at the input size of ``model_name``, cut to ``--limit`` images."""
    from ..data import load_dataset
    from ..models import get_spec

    size = get_spec(model_name).input_size[1]
    dataset = load_dataset(args.dataset, args.data_dir, split=split, download=args.download, image_size=size)
    if args.limit is not None:
        if args.limit < 1:
            raise CLIError(f"--limit must be >= 1, got {args.limit}")
        dataset = dataset.subset(range(min(args.limit, len(dataset))))
    return dataset


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 30,60, got {text!r}") from exc


def add_training_arguments(p: argparse.ArgumentParser, eval_split: str | None = None) -> None:
    """The flags every training command shares (``guard train``, ``guard poison``)."""
    p.add_argument("--model", required=True, help="registered model name (see `guard info`)")
    add_data_arguments(p, default_split="train")
    p.add_argument("--mode", choices=("scratch", "finetune", "last-layer"), default="scratch",
                   help="scratch: all weights from the registry's initialization; finetune: all weights from "
                        "--weights; last-layer: only the final linear layer, BatchNorm frozen (default: scratch)")
    p.add_argument("--weights", default=None, help="initial weights (required for finetune and last-layer)")
    p.add_argument("--out", required=True, help="checkpoint path written after every epoch (.pt or .safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from --out and its .state file")
    p.add_argument("--eval-split", default=eval_split,
                   help=f"split to report accuracy on (default: {eval_split or 'none'})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initialization and of the shuffling/augmentation generator (default 0)")
    g = p.add_argument_group("hyper-parameters (default: the preset of --mode, see guard.train.TrainConfig)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--optimizer", choices=("sgd", "adam"))
    g.add_argument("--schedule", choices=("cosine", "multistep", "none"))
    g.add_argument("--milestones", type=_int_list, help="epochs at which multistep multiplies lr by 0.1")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no random crop / flip")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def initial_model(args: argparse.Namespace, num_classes: int):
    """``--model`` with ``--weights``, or initialized from ``--seed`` (leaving the global RNG as it was)."""
    from ..models import create

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return create(args.model, num_classes=num_classes, weights=args.weights)


def training_config(args: argparse.Namespace):
    """The :class:`guard.train.TrainConfig` of ``--mode``'s preset with the flags given on top."""
    from ..train import TrainConfig

    if args.mode == "scratch" and args.weights is not None:
        raise CLIError("--mode scratch starts from the registry's initialization; use --mode finetune to start "
                       "from --weights")
    if args.mode != "scratch" and args.weights is None:
        raise CLIError(f"--mode {args.mode} needs --weights (the model to start from)")
    preset = {"scratch": TrainConfig.scratch, "finetune": TrainConfig.finetune,
              "last-layer": TrainConfig.last_layer}[args.mode]
    return preset(**{k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) is not None})


def add_parser(subparsers) -> None:
    from .poison import add_attack_arguments, add_record_argument

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
