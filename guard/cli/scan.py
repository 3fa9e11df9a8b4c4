"""``guard scan``: is this model backdoored, and which class is the target? Any registered detector.

Example::

    guard scan --model resnet20 --weights suspect.pt --dataset cifar10 --data-dir data \\
        --trusted-fraction 0.01 --out scan/report.json --repaired-out scan/repaired.pt
    guard scan ... --method nc --opt steps=50 --opt samples_per_step=256

The trusted set is a class-stratified random ``--trusted-fraction`` of ``--split`` (default: train); the
held-out set (``--eval-split``, default: the exact first 1000 test images, the set the CNC threshold was
calibrated on) bounds the repair's CDA loss and scores the triggers. ``--opt key=value`` sets a field of the
detector's config (``guard info`` lists them; ``repair.steps=200`` a field of a nested one). The defaults of
``cnc`` are the short budget whose threshold was calibrated on clean models (``guard.detect.cnc``). The
report (``{"backdoored", "flagged_class", "scores", "method", "separation", "summary", ...}``) goes to
``--out``, one PNG per inverted trigger next to it (``--triggers-dir``), and the reference model the scan
compared against (CNC's repaired model) to ``--repaired-out`` (what ``guard archive --repaired`` serves for
per-request scores). When scores pass the threshold but no class stands out, the report says so instead
of naming an arbitrary class.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from ..detect import list_detectors
from . import CLIError
from ._common import add_data_arguments, add_trust_arguments, load_trust_data, resolve_device


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("scan", help="detect a backdoor and its target class, write a report",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model name (see `guard info`)")
    p.add_argument("--weights", required=True, help="weights of the suspect model")
    add_data_arguments(p, default_split="train")
    add_trust_arguments(p)
    p.add_argument("--method", choices=list_detectors(), default="cnc",
                   help="registered detector (default cnc; see `guard info`)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the detector's config, e.g. steps_per_class=5 or repair.steps=200 (repeatable)")
    p.add_argument("--out", required=True, help="report JSON path")
    p.add_argument("--triggers-dir", default=None, help="where the trigger PNGs go (default: OUT_triggers/)")
    p.add_argument("--repaired-out", default=None, help="save the scan's reference (CNC: repaired) model here")
    p.add_argument("--repaired", default=None,
                   help="weights of an already repaired model to compare against (CNC: skips the repair)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..detect import get_detector, save_trigger_png
    from ..detect.base import DETECTORS
    from ..models import create, save_weights

    cls = get_detector(args.method)
    try:
        detector = cls(DETECTORS.parse(args.method, args.opt))
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    device = resolve_device(args.device)
    trusted, heldout = load_trust_data(args)
    model = create(args.model, num_classes=trusted.num_classes, weights=args.weights).to(device)
    reference = None
    if args.repaired is not None:
        reference = create(args.model, num_classes=trusted.num_classes, weights=args.repaired).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    triggers_dir = Path(args.triggers_dir) if args.triggers_dir else out.with_name(out.stem + "_triggers")
    started = time.perf_counter()
    result = detector.scan(model, trusted, heldout, reference=reference, generator=generator, device=device)
    seconds = time.perf_counter() - started
    if args.repaired_out:
        if result.reference is None:
            raise CLIError(f"--repaired-out: {args.method} compares against no reference model")
        save_weights(result.reference, args.repaired_out)
    paths = {c: str(save_trigger_png(result.trigger_image(c), triggers_dir / f"class_{c}.png"))
             for c in result.triggers}
    report = dataclasses.replace(result.report, triggers=paths)
    report.save(out)
    summary = {**report.to_dict(), "model": args.model, "weights": str(args.weights), "dataset": args.dataset,
               "config": json.loads(json.dumps(dataclasses.asdict(detector.config))),
               "trusted_images": len(trusted), "heldout_images": len(heldout), "seconds": round(seconds, 2),
               "repaired": args.repaired_out or args.repaired}
    out.write_text(json.dumps(summary, indent=2, allow_nan=False))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        scores = ", ".join(f"{c}: {s:+.3f}" for c, s in sorted(report.scores.items()))
        print(f"{args.method} scan of {args.model} ({len(trusted)} trusted images, {seconds:.0f}s): "
              f"{report.summary}; max score {report.max_score:.3f} vs threshold {report.threshold:.3f}")
        print(f"scores {{{scores}}}")
        print(f"report: {out}  triggers: {triggers_dir}/")
    return 0
