"""``guard harden``: harden a model before it is served (MOTH class-distance hardening, any registered
hardening defense), with the class distances before and after.

Example::

    guard harden --method moth --model resnet20 --weights resnet20-12fca82f.th --dataset cifar10 \\
        --data-dir data --out hardened.pt
    guard archive --model resnet20 --weights hardened.pt --out model_store/hardened.mar   # serve it

The model is fine-tuned on a class-stratified ``--trusted-fraction`` (default 0.1) of ``--split`` with the
defense's schedule; the hardened weights go to ``--out`` and the run's record to ``OUT.json`` (the method,
the (CDA, ASR) curve, the defense's bookkeeping). The class distance of every ordered pair (``guard
distance``) is measured on ``--eval-split`` before and after: the report in ``OUT.json`` gives both
matrices, their means and the mean enlargement, and ``OUT.distance.png`` the two heat maps side by side.
``--distance-opt KEY=VALUE`` sets a field of ``guard.detect.ClassDistanceConfig``; ``--no-distance`` skips
the measurement. ``--attack`` records the ASR of a known trigger along the way, as for ``guard repair``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .distance import distance_config, format_matrix, plot_distances
from .repair import add_defense_arguments, print_result, run_defense


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("harden", help="harden a model before serving (MOTH), distances before/after",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_defense_arguments(p, "hardening", "moth", trusted_fraction=0.1)
    p.add_argument("--distance-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of ClassDistanceConfig for the before/after distances (repeatable)")
    p.add_argument("--no-distance", action="store_true", help="skip the class distances before and after")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..detect import ClassDistance
    from ..models import create

    config = distance_config(args.distance_opt)  # fail on a bad option before the long run
    summary, result, _, heldout, device = run_defense(args, "hardening")
    out = Path(args.out)
    if not args.no_distance:
        measure = ClassDistance(config)
        original = create(args.model, num_classes=heldout.num_classes, weights=args.weights).to(device)
        before = measure.measure(original, heldout, generator=torch.Generator().manual_seed(args.seed), device=device)
        after = measure.measure(result.model, heldout, generator=torch.Generator().manual_seed(args.seed),
                                device=device)
        enlargement = after.enlargement(before)
        heatmap = plot_distances([(f"before: mean {before.mean:.2f}", before.matrix),
                                  (f"after {args.method}: mean {after.mean:.2f}", after.matrix)],
                                 out.with_name(out.stem + ".distance.png"),
                                 f"class distance of {args.model} on {len(heldout)} held-out images; "
                                 f"mean enlargement {100 * enlargement:+.1f} %")
        summary["distance"] = {"before": before.to_dict(), "after": after.to_dict(),
                               "mean_before": before.to_dict()["mean"], "mean_after": after.to_dict()["mean"],
                               "enlargement": enlargement if enlargement == enlargement else None,
                               "heatmap": str(heatmap)}
        out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print_result(args, "hardening", summary, result)
    if not args.no_distance:
        print("class distance before:")
        print(format_matrix(before.matrix))
        print("after:")
        print(format_matrix(after.matrix))
        print(f"mean distance {before.mean:.2f} -> {after.mean:.2f} (enlargement {100 * enlargement:+.1f} %); "
              f"heat maps: {heatmap}")
    return 0
