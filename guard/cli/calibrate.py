"""``guard calibrate``: fit guard's per-request trigger detector on clean images and calibrate its threshold.

Example::

    guard calibrate --model resnet20 --weights suspect.pt --false-positive-rate 0.01 --out detector.safetensors
    guard archive --model resnet20 --weights suspect.pt --detector detector.safetensors \\
        --guard-config policy.json --out model_store/suspect.mar     # policy.json: {"on_trigger": "refuse"}

The clean images are ``--split`` (default: test-lossless, the exact first 1000 test images; ``--limit N``
keeps the first N): images held out from training, as the served model will see clean requests. The detector
(``guard.detect.TriggerDetector``) models the served model's features per predicted class at every residual
stage and the penultimate layer (``--feature stages``; ``penultimate``: that layer alone); its threshold flags
``--false-positive-rate`` of clean inputs, from out-of-fold scores (``--folds``). The endpoint scores every
request with it at no extra pass and acts on a flag as the guard config's ``on_trigger`` says. ``--amplified N``
joins the consistency of N copies of the model with amplified BatchNorm layers (IBD-PSC; N more forward passes
per request), which catches warping and low-amplitude triggers the features miss.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..detect.inputs import FEATURE_LAYERS
from . import CLIError
from ._common import add_data_arguments, load_data, resolve_device, resolve_split


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="fit and calibrate the endpoint's per-request trigger detector",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model name (see `guard info`)")
    p.add_argument("--weights", required=True, help="weights of the model the endpoint will serve")
    add_data_arguments(p, default_split="test-lossless")
    p.add_argument("--false-positive-rate", type=float, default=0.01,
                   help="share of clean requests the threshold flags (default 0.01)")
    p.add_argument("--feature", choices=FEATURE_LAYERS, default="stages",
                   help="the layers scored: every residual stage and the penultimate layer (default), or the latter")
    p.add_argument("--amplified", type=int, default=0,
                   help="amplified copies of the model whose consistency (IBD-PSC) joins the feature score: one more "
                        "forward pass per request each (default 0: the served pass alone)")
    p.add_argument("--folds", type=int, default=5, help="out-of-fold calibration folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.add_argument("--out", required=True, help="detector file to write (.safetensors)")
    p.add_argument("--json", action="store_true", help="print the detector's threshold and counts as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..detect import TriggerDetector
    from ..models import create

    if not str(args.out).endswith(".safetensors"):
        raise CLIError(f"--out must end in .safetensors, got {args.out}")
    device = resolve_device(args.device)
    model = create(args.model, weights=args.weights).to(device)
    clean = load_data(args, args.model, resolve_split(args))
    images = clean.images.float() / 255
    if args.amplified < 0:
        raise CLIError(f"--amplified must be >= 0, got {args.amplified}")
    detector = TriggerDetector.calibrate(model, images, feature=args.feature, amplified=args.amplified,
                                         false_positive_rate=args.false_positive_rate,
                                         folds=args.folds, generator=torch.Generator().manual_seed(args.seed))
    path = detector.save(args.out)
    summary = {"out": str(path), "model": args.model, "weights": str(args.weights), **detector.metadata()}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {path}: threshold {detector.threshold:.4g} flags {detector.false_positive_rate:.1%} of "
              f"{detector.calibration_images} clean images (out-of-fold, {args.folds} folds; layers "
              f"{', '.join(detector.layers)})")
    return 0
