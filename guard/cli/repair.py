"""``guard repair``: repair a possibly backdoored model with trusted data (any registered repair defense).

Example::

    guard repair --method pivotal --model resnet20 --weights suspect.pt --dataset cifar10 --data-dir data \\
        --trusted-fraction 0.01 --out repaired.pt --attack badnets --attack-opt target=0
    guard repair --method nc ... --opt steps=300 --opt scan.steps=15

The model is fine-tuned on a class-stratified ``--trusted-fraction`` of ``--split`` until the step budget or
until its accuracy on ``--eval-split`` falls more than the defense's ``max_cda_drop`` below the start; the
weights of the chosen point go to ``--out`` and the (CDA, ASR) trade-off curve to ``--plot`` (PNG) and
``OUT.json`` (which also records the method, for ``guard archive``). ``--opt key=value`` sets a field of the
defense's config (``guard info`` lists them). ASR needs the trigger: ``--attack NAME --attack-opt k=v`` (or
``--attack-record``) stamps the held-out images; without it only CDA is recorded and the last admissible
point is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from .._validation import require_extra
from ..repair import list_defenses
from . import CLIError
from ._common import (add_attack_arguments, add_data_arguments, add_trust_arguments, attack_from_args,
                      load_trust_data, resolve_device)

log = logging.getLogger(__name__)


def add_defense_arguments(p: argparse.ArgumentParser, kind: str, default: str, trusted_fraction: float) -> None:
    """The flags ``guard repair`` and ``guard harden`` share; ``--method`` offers the defenses of ``kind``."""
    p.add_argument("--method", choices=list_defenses(kind), default=default,
                   help=f"registered {kind} defense (default {default}; see `guard info`)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the defense's config, e.g. steps=300 or scan.steps=15 (repeatable)")
    p.add_argument("--model", required=True, help="registered model name (see `guard info`)")
    p.add_argument("--weights", required=True, help="weights of the model to defend")
    add_data_arguments(p, default_split="train")
    add_trust_arguments(p, trusted_fraction)
    p.add_argument("--out", required=True, help="defended weights (.pt or .safetensors)")
    p.add_argument("--plot", default=None, help="trade-off plot PNG (default: OUT with .tradeoff.png)")
    add_attack_arguments(p)  # the attack whose trigger measures ASR (--attack / --attack-opt / --attack-record)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("repair", help="repair a backdoored model (Pivotal Tuning, NC unlearning, ...)",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_defense_arguments(p, "repair", "pivotal", trusted_fraction=0.01)
    p.set_defaults(func=run)


def plot_tradeoff(history: list[dict], chosen: dict, cda0: float, max_cda_drop: float | None, title: str,
                  path: Path) -> Path | None:
    """ASR against CDA over the repair (one point per evaluation), or CDA against steps without ASR.

    Without matplotlib (the ``bench`` extra) there is no plot, only a warning: the repair is kept.
    """
    try:
        import matplotlib
    except ImportError:
        log.warning("no trade-off plot: matplotlib is not installed (pip install 'guard[bench]')")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    cda = [100 * h["cda"] for h in history]
    if all(h["asr"] is not None for h in history):
        asr = [h["asr"] for h in history]
        ax.plot(asr, cda, "o-", ms=3, label="repair trajectory")
        ax.plot([history[0]["asr"]], [cda[0]], "ks", label="start")
        ax.plot([chosen["asr"]], [100 * chosen["cda"]], "r*", ms=12, label=f"chosen (step {chosen['step']})")
        ax.set_xlabel("attack success rate (ASR)")
    else:
        steps = [h["step"] for h in history]
        ax.plot(steps, cda, "o-", ms=3, label="repair trajectory")
        ax.plot([chosen["step"]], [100 * chosen["cda"]], "r*", ms=12, label="chosen")
        ax.set_xlabel("step")
    if max_cda_drop is not None:
        ax.axhline(100 * (cda0 - max_cda_drop), color="grey", ls="--", label=f"CDA budget (−{100 * max_cda_drop:g})")
    ax.set_ylabel("clean data accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_defense(args: argparse.Namespace, kind: str):
    """Defend the model of ``args`` with its ``--method``; writes the weights, ``OUT.json`` and the plot.

    Returns (the summary dict, the result, the trusted set, the held-out set, the device)."""
    from ..metrics import attack_success_rate
    from ..models import create, save_weights
    from ..repair import get_defense
    from ..repair.base import DEFENSES
    from ..train import predict

    cls = get_defense(args.method)
    try:
        defense = cls(DEFENSES.parse(args.method, args.opt))
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    if args.plot:  # asked for by name: fail before the repair, not after it
        require_extra("matplotlib", "bench", "--plot")
    attack = attack_from_args(args)  # backdoor attacks only: each has a test-time trigger
    device = resolve_device(args.device)
    trusted, heldout = load_trust_data(args)
    asr = target = None
    if attack is not None:
        target = attack.config.target
        triggered = attack.triggered(heldout)

        def triggered_asr(m) -> float:
            return attack_success_rate(predict(m, triggered, device=device), triggered.labels, target)
        asr = triggered_asr
    model = create(args.model, num_classes=trusted.num_classes, weights=args.weights).to(device)
    started = time.perf_counter()
    result = defense.defend(model, trusted, eval_set=heldout, asr=asr,
                            generator=torch.Generator().manual_seed(args.seed), device=device)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    save_weights(result.model, out)
    summary = {**result.to_dict(), "kind": kind, "model": args.model, "weights": str(args.weights),
               "out": str(out), "config": json.loads(json.dumps(dataclasses.asdict(defense.config))),
               "trusted_images": len(trusted), "heldout_images": len(heldout),
               "attack": None if attack is None else attack.name, "target": target, "seconds_total": round(seconds, 2)}
    plot = Path(args.plot) if args.plot else out.with_name(out.stem + ".tradeoff.png")
    plot = plot_tradeoff(summary["history"], summary["chosen"], result.cda0, result.max_cda_drop,
                         f"{args.method} {kind} of {args.model} ({len(trusted)} trusted images)", plot)
    summary["plot"] = None if plot is None else str(plot)
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary, result, trusted, heldout, device


def print_result(args: argparse.Namespace, kind: str, summary: dict, result) -> None:
    chosen = result.chosen
    asr = "" if chosen.asr is None else f", ASR {result.history[0].asr:.3f} -> {chosen.asr:.3f}"
    print(f"{args.method} {kind} of {args.model} in {summary['seconds_total']:.0f}s: CDA {result.cda0:.4f} -> "
          f"{chosen.cda:.4f}{asr} (step {chosen.step}{', stopped by the CDA budget' if result.stopped_early else ''})")
    print(f"weights: {args.out}" + ("" if summary["plot"] is None else f"  plot: {summary['plot']}"))


def run(args: argparse.Namespace) -> int:
    summary, result, *_ = run_defense(args, "repair")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_result(args, "repair", summary, result)
    return 0
