"""``guard distance``: how far each class of a model is from being hijacked (MOTH class distance, M12).

Example::

    guard distance --model resnet20 --weights resnet20-12fca82f.th --dataset cifar10 --data-dir data \\
        --out distance.json                  # + distance.png heat map
    guard distance ... --opt steps=1000 --opt images_per_class=100 --opt seeds=3   # the MOTH code's budget

For every ordered class pair (s → t) the size of the smallest mask trigger that sends ≥ τ of the class-s images
of ``--split`` (default: the exact first 1000 test images, as MOTH's K·100) to t, minimum over seeds; prints
the K×K matrix and its mean and writes both as JSON (``--out``) and a heat map (``--heatmap``). A backdoor
shows as one small entry (its source → target); ``--opt KEY=VALUE`` sets a field of
``guard.detect.ClassDistanceConfig``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from . import CLIError
from ._common import add_data_arguments, load_data, resolve_device, resolve_split


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("distance", help="class distance of every ordered class pair (MOTH), heat map",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model name (see `guard info`)")
    p.add_argument("--weights", required=True, help="weights of the model")
    add_data_arguments(p, default_split="test-lossless")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of ClassDistanceConfig, e.g. steps=1000 or seeds=3 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--out", required=True, help="distance JSON path")
    p.add_argument("--heatmap", default=None, help="heat map PNG (default: OUT with .png)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def distance_config(items: list[str]):
    from .._validation import parse_config_options
    from ..detect import ClassDistanceConfig

    try:
        return parse_config_options(ClassDistanceConfig, items, what="class distance")
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


def plot_distances(panels: list[tuple[str, torch.Tensor]], path: Path, title: str) -> Path:
    """One heat map per ``(title, K×K matrix)`` panel on a shared colour scale; pairs without a trigger
    (inf) are hatched grey, the diagonal blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [m[torch.isfinite(m)] for _, m in panels]
    vmax = max((float(v.max()) for v in finite if v.numel()), default=1.0)
    k = panels[0][1].shape[0]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 0.8, 4.2), squeeze=False)
    image = None
    for ax, (name, matrix) in zip(axes[0], panels):
        shown = matrix.clone()
        shown[~torch.isfinite(shown)] = math.nan
        image = ax.imshow(shown.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_facecolor("#dddddd")
        for s in range(k):
            for t in range(k):
                v = matrix[s, t].item()
                if s != t and k <= 12:
                    ax.text(t, s, "∞" if math.isinf(v) else ("" if math.isnan(v) else f"{v:.0f}"),
                            ha="center", va="center", fontsize=6, color="w" if v < 0.6 * vmax else "k")
        ax.set_xlabel("target class t")
        ax.set_ylabel("source class s")
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="distance (mask L1 × channels)")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_matrix(matrix: torch.Tensor) -> str:
    k = matrix.shape[0]
    lines = ["s\\t " + "".join(f"{t:>7}" for t in range(k))]
    for s in range(k):
        cells = ("      -" if s == t else ("      ∞" if math.isinf(v) else f"{v:7.1f}")
                 for t, v in enumerate(matrix[s].tolist()))
        lines.append(f"{s:>4} " + "".join(cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..detect import ClassDistance
    from ..models import create

    config = distance_config(args.opt)
    device = resolve_device(args.device)
    dataset = load_data(args, args.model, resolve_split(args))
    model = create(args.model, num_classes=dataset.num_classes, weights=args.weights).to(device)
    result = ClassDistance(config).measure(model, dataset, generator=torch.Generator().manual_seed(args.seed),
                                           device=device)
    out = Path(args.out)
    heatmap = Path(args.heatmap) if args.heatmap else out.with_suffix(".png")
    plot_distances([(f"{args.model}: mean {result.mean:.2f}", result.matrix)], heatmap,
                   f"class distance ({len(dataset)} images, {config.seeds} seed(s), {config.steps} steps)")
    summary = {**result.to_dict(), "model": args.model, "weights": str(args.weights), "dataset": args.dataset,
               "images": len(dataset), "heatmap": str(heatmap)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, allow_nan=False))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_matrix(result.matrix))
        found = int(result.found.sum())
        print(f"mean distance {result.mean:.2f} over {found} of {int(result.measured.sum())} pairs "
              f"(smallest {result.smallest if found else None}) in {result.seconds:.0f}s")
        print(f"distances: {out}  heat map: {heatmap}")
    return 0
