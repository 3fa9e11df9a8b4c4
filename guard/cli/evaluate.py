"""``guard eval``: accuracy of a model on a dataset split, with and without ReScaler.

Example::

    guard eval --model resnet20 --weights resnet20-12fca82f.th --dataset cifar10 --data-dir data \\
        --split test-lossless --rescaler eps=0.15,alpha=1.0 --json
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
    add_attack_arguments(p)  # --attack / --attack-opt / --attack-record: ASR on triggered images
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import create
    from ..rescaler import ReScaler
    from ..train import predict

    rescaler_kwargs = parse_rescaler(args.rescaler) if args.rescaler is not None else None
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
    if attack is not None:
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
        if attack is not None:
            a = result["attack"]
            print(f"attack {a['attack']}: ASR {a['asr']:.4f} (non-target {a['asr_nontarget']:.4f})"
                  + (f", with ReScaler {a['defended']['asr']:.4f}" if "defended" in a else ""))
    return 0
