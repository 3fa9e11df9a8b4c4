"""``guard scan``: is this model backdoored? Calibrated Trigger Inversion (default) or Neural Cleanse.

Example::

    guard scan --model resnet20 --weights suspect.pt --dataset cifar10 --data-dir data \\
        --trusted-fraction 0.01 --out scan/report.json --repaired-out scan/repaired.pt

The trusted set is a class-stratified random ``--trusted-fraction`` of ``--split`` (default: train); the
held-out set (``--eval-split``, default: test) bounds the repair's CDA loss and scores the triggers. The
report (``{"backdoored", "flagged_class", "scores", "method", ...}``) goes to ``--out``, one PNG per reversed
trigger next to it (``--triggers-dir``), and, for CNC, the repaired model it calibrated against to
``--repaired-out`` (what ``guard archive --repaired`` serves for per-request scores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from . import CLIError
from ._common import add_data_arguments, add_trust_arguments, load_trust_data, resolve_device


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("scan", help="detect a backdoor (CNC or Neural Cleanse) and write a report",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model name (see `guard info`)")
    p.add_argument("--weights", required=True, help="weights of the suspect model")
    add_data_arguments(p, default_split="train")
    add_trust_arguments(p)
    p.add_argument("--method", choices=("cnc", "nc"), default="cnc",
                   help="cnc: calibrated trigger inversion (default); nc: Neural Cleanse with the MAD test")
    p.add_argument("--out", required=True, help="report JSON path")
    p.add_argument("--triggers-dir", default=None, help="where the trigger PNGs go (default: OUT_triggers/)")
    p.add_argument("--repaired-out", default=None, help="CNC: save the repaired model here")
    p.add_argument("--repaired", default=None,
                   help="CNC: weights of an already repaired model to calibrate against (skips the repair)")
    g = p.add_argument_group("budgets (defaults: pick_your_poison.txt Table 5, CIFAR-10)")
    g.add_argument("--steps-per-class", type=int, default=None,
                   help="trigger optimisation steps per class (CNC default 100; NC: max passes, default 1000)")
    g.add_argument("--repair-steps", type=int, default=None, help="CNC: Pivotal Tuning steps (default 2000)")
    g.add_argument("--eval-every", type=int, default=None, help="CNC: repair evaluation interval (default 50)")
    g.add_argument("--threshold", type=float, default=None,
                   help="verdict threshold (CNC: on the max class score, default 0.5; NC: MAD index, default 2)")
    g.add_argument("--nc-samples-per-step", type=int, default=None, help="NC: images per pass (default 1000)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from ..detect import CNCConfig, NeuralCleanseConfig
    from ..repair import PivotalTuningConfig

    try:
        if args.method == "cnc":
            repair = {k: v for k, v in (("steps", args.repair_steps), ("eval_every", args.eval_every))
                      if v is not None}
            fields = {k: v for k, v in (("steps_per_class", args.steps_per_class), ("threshold", args.threshold))
                      if v is not None}
            return CNCConfig(**fields, repair=PivotalTuningConfig(**repair))
        for flag in ("repair_steps", "eval_every", "repaired", "repaired_out"):
            if getattr(args, flag) is not None:
                raise CLIError(f"--{flag.replace('_', '-')} applies to --method cnc only")
        fields = {k: v for k, v in (("steps", args.steps_per_class), ("anomaly_threshold", args.threshold),
                                    ("samples_per_step", args.nc_samples_per_step)) if v is not None}
        return NeuralCleanseConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    from ..detect import CalibratedTriggerInversion, NeuralCleanse, save_trigger_png
    from ..models import create, save_weights

    config = _config(args)
    device = resolve_device(args.device)
    trusted, heldout = load_trust_data(args)
    model = create(args.model, num_classes=trusted.num_classes, weights=args.weights).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    triggers_dir = Path(args.triggers_dir) if args.triggers_dir else out.with_name(out.stem + "_triggers")
    started = time.perf_counter()
    if args.method == "cnc":
        repaired = None
        if args.repaired is not None:
            repaired = create(args.model, num_classes=trusted.num_classes, weights=args.repaired).to(device)
        result = CalibratedTriggerInversion(config).scan(model, trusted, heldout, repaired=repaired,
                                                         generator=generator, device=device)
        images = result.triggers
        if args.repaired_out:
            save_weights(result.repaired, args.repaired_out)
    else:
        result = NeuralCleanse(config).scan(model, trusted, generator=generator, device=device)
        images = {c: result.trigger_image(c) for c, m in result.masks.items() if m is not None}
    seconds = time.perf_counter() - started
    paths = {c: str(save_trigger_png(t, triggers_dir / f"class_{c}.png")) for c, t in images.items()}
    report = dataclasses.replace(result.report, triggers=paths)
    report.save(out)
    summary = {**report.to_dict(), "model": args.model, "weights": str(args.weights), "dataset": args.dataset,
               "trusted_images": len(trusted), "heldout_images": len(heldout), "seconds": round(seconds, 2),
               "repaired": args.repaired_out or args.repaired}
    out.write_text(json.dumps(summary, indent=2, allow_nan=False))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        verdict = (f"BACKDOORED (class {report.flagged_class})" if report.backdoored else "no backdoor found")
        scores = ", ".join(f"{c}: {s:+.3f}" for c, s in sorted(report.scores.items()))
        print(f"{args.method} scan of {args.model} ({len(trusted)} trusted images, {seconds:.0f}s): {verdict}; "
              f"max score {report.max_score:.3f} vs threshold {report.threshold}")
        print(f"scores {{{scores}}}")
        print(f"report: {out}  triggers: {triggers_dir}/")
    return 0
