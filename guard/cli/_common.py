"""Helpers the sub-commands share: data, device and split flags, the training flags and the initial model,
the attack flags (``--attack NAME --attack-opt k=v``, ``--attack-record``) and the ASR report, the trusted-data
flags of ``guard scan`` / ``guard repair``."""

from __future__ import annotations

import argparse
import copy

import torch

from . import CLIError

#: flags of ``guard train`` that override a preset field of :class:`guard.train.TrainConfig`
_CONFIG_FLAGS = ("epochs", "lr", "momentum", "weight_decay", "batch_size", "optimizer", "schedule",
                 "milestones", "augment", "jpeg")


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
    from ..train import MODES, OPTIMIZERS, SCHEDULES

    p.add_argument("--model", required=True, help="registered model name (see `guard info`)")
    add_data_arguments(p, default_split="train")
    p.add_argument("--mode", choices=MODES, default="scratch",
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
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--schedule", choices=SCHEDULES)
    g.add_argument("--milestones", type=_int_list, help="epochs at which multistep multiplies lr by 0.1")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no random crop / flip")
    g.add_argument("--jpeg", type=float, metavar="P",
                   help="re-encode each training image as a JPEG (quality 50-95) with probability P, for a model "
                        "that will be served JPEGs (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def initial_model(args: argparse.Namespace, num_classes: int):
    """``--model`` with ``--weights``, or initialized from ``--seed``."""
    from ..models import create

    return create(args.model, num_classes=num_classes, weights=args.weights,
                  generator=torch.Generator().manual_seed(args.seed))


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


def add_attack_arguments(parser: argparse.ArgumentParser, required: bool = False,
                         from_record: bool | None = None, targeted: bool = False) -> None:
    """``--attack NAME``, repeated ``--attack-opt key=value`` and (``from_record``, default: when the attack
    is optional) ``--attack-record FILE``; ``targeted`` also offers the transfer attacks (``guard eval
    --attack-goal``)."""
    from ..attacks import list_attacks

    names = list_attacks("backdoor") + list_attacks("supply-chain") + (list_attacks("targeted") if targeted else [])
    g = parser.add_argument_group("attack")
    g.add_argument("--attack", required=required, choices=names, metavar="NAME",
                   help=f"{'backdoor, supply-chain or transfer' if targeted else 'backdoor or supply-chain'} "
                        f"attack: {', '.join(names)}")
    g.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="attack option (repeatable), e.g. target=0, budget=0.01, location=top-left")
    if (not required) if from_record is None else from_record:
        g.add_argument("--attack-record", default=None, metavar="FILE",
                       help="rebuild the attack (and its trigger) from the JSON record of `guard poison`")


def attack_from_args(args: argparse.Namespace):
    """The attack named by ``--attack``/``--attack-opt`` (or ``--attack-record``), or ``None``."""
    from ..attacks import get_attack, load_record, parse_options

    record = getattr(args, "attack_record", None)
    if record is not None:
        if args.attack is not None or args.attack_opt:
            raise CLIError("--attack-record already fixes the attack; drop --attack/--attack-opt")
        try:
            return load_record(record)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise CLIError(f"--attack-record: cannot rebuild the attack of {record}: {exc}") from exc
    if args.attack is None:
        if args.attack_opt:
            raise CLIError("--attack-opt needs --attack NAME")
        return None
    try:
        return get_attack(args.attack)(parse_options(args.attack, args.attack_opt))
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--attack-opt: {exc}") from exc


def attack_report(model: torch.nn.Module, attack, test_set, *, batch_size: int = 256,
                  device: torch.device | None = None, defense=None) -> dict:
    """CDA and ASR (PyP form, non-target and source-class variants) of ``model`` under ``attack``."""
    from ..metrics import evaluate_backdoor

    return {"attack": attack.name, **evaluate_backdoor(model, attack, test_set, batch_size=batch_size,
                                                       device=device, defense=defense)}


def add_record_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", default=None, help="JSON record path (default: <out>.json); an attack's state "
                        "(ISSBA's encoder, Adv's surrogate) goes beside it as <record stem>.attack.safetensors")


def add_trust_arguments(parser: argparse.ArgumentParser, trusted_fraction: float = 0.01) -> None:
    """Flags shared by ``guard scan``, ``guard repair`` and ``guard harden``: trusted fraction, held-out
    split, seed."""
    parser.add_argument("--trusted-fraction", type=float, default=trusted_fraction,
                        help=f"share of --split the defender trusts (default {trusted_fraction:g}"
                             f"{', pick_your_poison.txt §5' if trusted_fraction == 0.01 else ''})")
    parser.add_argument("--eval-split", default="test-lossless",
                        help="held-out clean split for the CDA budget and scoring (default: test-lossless, the "
                             "exact first 1000 test images)")
    parser.add_argument("--eval-limit", type=int, default=None, metavar="N",
                        help="use only the first N images of --eval-split")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")


def load_trust_data(args: argparse.Namespace):
    """(trusted set, held-out set) for ``args`` (see :func:`add_trust_arguments`)."""
    from ..repair import split_trusted

    if not 0 < args.trusted_fraction <= 1:
        raise CLIError(f"--trusted-fraction must be in (0, 1], got {args.trusted_fraction}")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise CLIError(f"--eval-limit must be >= 1, got {args.eval_limit}")
    source = load_data(args, args.model, resolve_split(args))
    trusted = split_trusted(source, args.trusted_fraction, torch.Generator().manual_seed(args.seed))
    eval_args = copy.copy(args)
    eval_args.limit = args.eval_limit
    heldout = load_data(eval_args, args.model, args.eval_split)
    return trusted, heldout
