"""``guard repair``: repair a possibly backdoored model with trusted data (Pivotal Tuning or NC unlearning).

Example::

    guard repair --method pivotal --model resnet20 --weights suspect.pt --dataset cifar10 --data-dir data \\
        --trusted-fraction 0.01 --out repaired.pt --attack badnets --attack-opt target=0

The model is fine-tuned on a class-stratified ``--trusted-fraction`` of ``--split`` until the step budget or
until its accuracy on ``--eval-split`` falls more than ``--max-cda-drop`` below the start; the weights of
the chosen point go to ``--out`` and the (CDA, ASR) trade-off curve to ``--plot`` (PNG) and ``OUT.json``.
ASR needs the trigger: ``--attack NAME --attack-opt k=v`` (or ``--attack-record``) (a registered attack, see ``guard.attacks``)
stamps the held-out images; without it only CDA is recorded and the last admissible point is kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from .._validation import require_extra
from . import CLIError
from ._common import (add_attack_arguments, add_data_arguments, add_trust_arguments, attack_from_args,
                      load_trust_data, resolve_device)

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("repair", help="repair a backdoored model (Pivotal Tuning or NC unlearning)",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("pivotal", "nc"), default="pivotal",
                   help="pivotal: Pivotal Tuning + SLOL (default); nc: Neural Cleanse unlearning")
    p.add_argument("--model", required=True, help="registered model name (see `guard info`)")
    p.add_argument("--weights", required=True, help="weights of the model to repair")
    add_data_arguments(p, default_split="train")
    add_trust_arguments(p)
    p.add_argument("--out", required=True, help="repaired weights (.pt or .safetensors)")
    p.add_argument("--plot", default=None, help="trade-off plot PNG (default: OUT with .tradeoff.png)")
    add_attack_arguments(p)  # the attack whose trigger measures ASR (--attack / --attack-opt / --attack-record)
    g = p.add_argument_group("hyper-parameters (defaults: pick_your_poison.txt Table 5, CIFAR-10)")
    g.add_argument("--steps", type=int, default=None, help="fine-tuning steps (pivotal 2000, nc 1000)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (pivotal 0.01, nc 0.001)")
    g.add_argument("--eval-every", type=int, default=None, help="steps between (CDA, ASR) records (default 50)")
    g.add_argument("--max-cda-drop", type=float, default=None, help="CDA budget Δ as a fraction (default 0.02)")
    g.add_argument("--slol-lambda", type=float, default=None, help="pivotal: λ_S (default 0.05)")
    g.add_argument("--param-lambda", type=float, default=None, help="pivotal: λ_P (default 20000)")
    g.add_argument("--nc-steps", type=int, default=None, help="nc: reverse-engineering passes per class (1000)")
    g.add_argument("--nc-samples-per-step", type=int, default=None, help="nc: images per pass (default 1000)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _pick(args: argparse.Namespace, mapping: dict[str, str]) -> dict:
    return {field: getattr(args, flag) for flag, field in mapping.items() if getattr(args, flag) is not None}


def _configs(args: argparse.Namespace):
    from ..detect import NeuralCleanseConfig
    from ..repair import PivotalTuningConfig

    try:
        if args.method == "pivotal":
            for flag in ("nc_steps", "nc_samples_per_step"):
                if getattr(args, flag) is not None:
                    raise CLIError(f"--{flag.replace('_', '-')} applies to --method nc only")
            return PivotalTuningConfig(**_pick(args, {"steps": "steps", "lr": "lr", "eval_every": "eval_every",
                                                      "max_cda_drop": "max_cda_drop",
                                                      "slol_lambda": "slol_lambda",
                                                      "param_lambda": "param_lambda"}))
        for flag in ("slol_lambda", "param_lambda"):
            if getattr(args, flag) is not None:
                raise CLIError(f"--{flag.replace('_', '-')} applies to --method pivotal only")
        return NeuralCleanseConfig(**_pick(args, {"steps": "unlearn_steps", "lr": "unlearn_lr",
                                                  "eval_every": "eval_every", "max_cda_drop": "max_cda_drop",
                                                  "nc_steps": "steps",
                                                  "nc_samples_per_step": "samples_per_step"}))
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


def plot_tradeoff(history: list[dict], chosen: dict, cda0: float, max_cda_drop: float, title: str,
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
    ax.axhline(100 * (cda0 - max_cda_drop), color="grey", ls="--", label=f"CDA budget (−{100 * max_cda_drop:g})")
    ax.set_ylabel("clean data accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    from ..detect import NeuralCleanse
    from ..metrics import attack_success_rate
    from ..models import create, save_weights
    from ..repair import PivotalTuning
    from ..train import predict

    config = _configs(args)
    if args.plot:  # asked for by name: fail before the repair, not after it
        require_extra("matplotlib", "bench", "--plot")
    attack = attack_from_args(args)  # backdoor attacks only: each has a test-time trigger
    device = resolve_device(args.device)
    trusted, heldout = load_trust_data(args)
    asr = target = None
    if attack is not None:
        target = attack.config.target
        triggered = attack.triggered(heldout)

        def asr(m) -> float:
            return attack_success_rate(predict(m, triggered, device=device), triggered.labels, target)
    model = create(args.model, num_classes=trusted.num_classes, weights=args.weights).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    extra = {}
    if args.method == "pivotal":
        result = PivotalTuning(config).repair(model, trusted, eval_set=heldout, asr=asr, generator=generator,
                                              device=device)
    else:
        nc = NeuralCleanse(config)
        scan = nc.scan(model, trusted, generator=generator, device=device)
        extra["nc_scan"] = scan.report.to_dict()
        result = nc.repair(model, trusted, scan, eval_set=heldout, asr=asr, generator=generator, device=device)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    save_weights(result.model, out)
    summary = {"method": args.method, "model": args.model, "weights": str(args.weights), "out": str(out),
               "trusted_images": len(trusted), "heldout_images": len(heldout), "attack": None if attack is None else attack.name,
               "target": target, "seconds_total": round(seconds, 2), **result.to_dict(), **extra}
    plot = Path(args.plot) if args.plot else out.with_name(out.stem + ".tradeoff.png")
    plot = plot_tradeoff(summary["history"], summary["chosen"], result.cda0, result.max_cda_drop,
                         f"{args.method} repair of {args.model} ({len(trusted)} trusted images)", plot)
    summary["plot"] = None if plot is None else str(plot)
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        chosen = result.chosen
        asr = "" if chosen.asr is None else f", ASR {result.history[0].asr:.3f} -> {chosen.asr:.3f}"
        print(f"{args.method} repair of {args.model} in {seconds:.0f}s: CDA {result.cda0:.4f} -> {chosen.cda:.4f}"
              f"{asr} (step {chosen.step}{', stopped by the CDA budget' if result.stopped_early else ''})")
        print(f"weights: {out}" + ("" if plot is None else f"  plot: {plot}"))
    return 0
