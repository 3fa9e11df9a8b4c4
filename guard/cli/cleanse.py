"""``guard cleanse``: find and remove the poisoned images of a training set (RE, SS, AC or CI), optionally retrain.

Example::

    guard poison --attack xiang --attack-opt pattern=C --model resnet20 --mode finetune \\
        --weights resnet20-12fca82f.th --epochs 2 --out runs/xiang.pt
    guard cleanse --method re --model resnet20 --weights runs/xiang.pt --attack-record runs/xiang.pt.json \\
        --out runs/cleanse.json --retrain --epochs 30 --out-model runs/clean.pt

The suspect set is ``--split`` of ``--dataset`` (any dataset ``guard.data`` loads, an ImageFolder included);
with ``--attack-record`` it is the poisoned set ``guard poison`` built, rebuilt from the record (checked
against its indices), and the report adds the removal's TPR/FPR against the record's poisoned images.
``--weights`` is a model trained on the suspect set; ``--fit-epochs N`` trains it here first, without
augmentation (RE's Step 0). SS, AC and CI do better on the model trained with augmentation, the one a user
already has: give it as ``--weights`` without ``--fit-epochs`` (benchmarks/cleanse_cifar10.py --inspect
victim). ``--retrain`` trains a fresh model on what remains with the one training loop
and reports its accuracy (and ASR with a record) on ``--eval-split``. RE writes its estimated pattern as a
PNG next to the report, beside the true one when the record's attack has one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import CLIError
from ._common import add_data_arguments, attack_report, initial_model, load_data, resolve_device, resolve_split

#: CLI flag -> cleanser -> config field it sets
_OPTION_FLAGS = {
    "threshold": {"ac": "silhouette_threshold", "ci": "impurity_threshold", "re": "theta"},
    "target": {"ss": "target", "ac": "target"},
    "eps": {"ss": "eps"},
    "reduction": {"ac": "reduction"},
    "max_components": {"ci": "max_components"},
    "pi": {"re": "pi"},
    "step_size": {"re": "step_size"},
    "refine_step_size": {"re": "refine_step_size"},
    "pair_batch_size": {"re": "batch_size_per_class"},
    "max_steps": {"re": "max_steps"},
    "chunk_size": {"re": "chunk_size"},
    "subtract_scale": {"re": "subtract_scale"},
    "removal_pi": {"re": "removal_pi"},
    "removal_to": {"re": "removal_to"},
    "removal": {"re": "removal"},
    "removal_posterior": {"re": "removal_posterior"},
}
#: why RE's margin rule did not trust a split (``details.margin_mixture.fallback``), as the report line says it
_FALLBACKS = {"no fit": "; the margin drops left nothing to fit",
              "one mode": "; the margin drops showed no second mode",
              "majority": "; the high margin drops held most of the class, which the poisons do not"}


def add_parser(subparsers) -> None:
    from ..cleanse import REDUCTIONS, REMOVAL_TARGETS, REMOVALS, list_cleansers

    p = subparsers.add_parser("cleanse", help="detect a poisoned training set, remove its poisons, retrain",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=list_cleansers(), default="re",
                   help="re: Xiang et al.'s reverse engineering (default); ss: Spectral Signatures; ac: Activation "
                        "Clustering; ci: Cluster Impurity")
    p.add_argument("--model", required=True, help="registered model name (see `guard info`)")
    p.add_argument("--weights", default=None, help="a model trained on the suspect set (or the start of --fit-epochs)")
    add_data_arguments(p, default_split="train")
    p.add_argument("--attack-record", default=None, metavar="FILE",
                   help="the JSON record of `guard poison`: rebuild its poisoned set and score the removal")
    p.add_argument("--out", required=True, help="report JSON path")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="images per feature/prediction batch (default 256)")
    g = p.add_argument_group("method options (default: the seed papers' settings, see `guard info`)")
    g.add_argument("--threshold", type=float, help="verdict threshold: ac silhouette, ci impurity, re θ (p-value)")
    g.add_argument("--target", type=int, help="ss/ac: the known target class to cleanse (Xiang's comparison)")
    g.add_argument("--eps", type=float, help="ss: assumed upper bound on a class's poisoned fraction")
    g.add_argument("--reduction", choices=REDUCTIONS, help="ac: projection to 10 dimensions")
    g.add_argument("--max-components", type=int, help="ci: largest mixture size BIC considers")
    g.add_argument("--pi", type=float, help="re: misclassification fraction that stops a pair's estimation")
    g.add_argument("--step-size", type=float, help="re: ℓ2 length of a pattern-estimation step (default 0.2)")
    g.add_argument("--refine-step-size", type=float,
                   help="re: step of the detected pair's re-estimation, the pattern that cleanses (default 0.02)")
    g.add_argument("--pair-batch-size", type=int, help="re: images of each class of a pair per step (default 32)")
    g.add_argument("--max-steps", type=int, help="re: step cap per class pair")
    g.add_argument("--chunk-size", type=int,
                   help="re: most images in one forward/backward pass, shared by many class pairs "
                        "(default: 128 on a CPU, 4096 on a GPU)")
    g.add_argument("--removal-pi", type=float,
                   help="re: the removal subtracts the smallest multiple of the estimate that sends this fraction of "
                        "all the source class's images to the target (default 0.995; where no multiple up to 4 "
                        "does, the one that sends the most)")
    g.add_argument("--subtract-scale", type=float,
                   help="re: the removal subtracts this fixed multiple of the estimate instead (1: eq. 12 as the "
                        "paper states it; larger removes more poisons and more clean images)")
    g.add_argument("--removal-to", choices=REMOVAL_TARGETS,
                   help="re --removal flip: remove a target image whose label changes to any class (eq. 12, "
                        "default) or only to an inferred source class")
    g.add_argument("--removal", choices=REMOVALS,
                   help="re: remove the target images whose target margin the subtraction lowers most (a "
                        "two-component Gaussian mixture on the drops; where they show one mode or the high component "
                        "holds half the class, again at the estimate itself, then eq. 12; default) or those whose "
                        "label it changes (eq. 12)")
    g.add_argument("--removal-posterior", type=float,
                   help="re --removal margin: the high-drop component's posterior above which an image goes "
                        "(default 0.1)")
    f = p.add_argument_group("the defender's model (RE Step 0; ss/ac/ci do better on the --weights trained with "
                             "augmentation)")
    f.add_argument("--fit-epochs", type=int, default=None,
                   help="first train --model on the suspect set for N epochs without augmentation (from --weights "
                        "when given, else from scratch); its weights go next to the report")
    f.add_argument("--fit-lr", type=float, default=None, help="learning rate of --fit-epochs (default: preset)")
    r = p.add_argument_group("retraining on the cleansed set")
    r.add_argument("--retrain", action="store_true", help="train a fresh model on the remaining images")
    r.add_argument("--epochs", type=int, default=None, help="retraining epochs (required with --retrain)")
    r.add_argument("--lr", type=float, default=None, help="retraining learning rate (default: preset)")
    r.add_argument("--retrain-from", default=None, metavar="WEIGHTS",
                   help="fine-tune from these weights instead of training from scratch")
    r.add_argument("--out-model", default=None, help="where the retrained weights go (required with --retrain)")
    r.add_argument("--eval-split", default="test", help="split for CDA/ASR of the retrained model (default: test)")
    r.add_argument("--eval-limit", type=int, default=None, metavar="N", help="use only the first N eval images")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the report summary as JSON")
    p.set_defaults(func=run)


def _cleanser(args: argparse.Namespace):
    from ..cleanse import create_cleanser

    options = {} if args.batch_size is None else {"batch_size": args.batch_size}
    for flag, fields in _OPTION_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if args.method not in fields:
            raise CLIError(f"--{flag.replace('_', '-')} applies to --method {'/'.join(fields)}, not {args.method}")
        options[fields[args.method]] = value
    try:
        return create_cleanser(args.method, **options)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


def _suspect_set(args: argparse.Namespace):
    """(suspect set, its split name, the record and the rebuilt PoisonResult — both None without a record)."""
    from ..cleanse import suspect_from_record

    if args.attack_record is None:
        split = resolve_split(args)
        return load_data(args, args.model, split), split, None, None
    try:
        record = json.loads(Path(args.attack_record).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CLIError(f"--attack-record: cannot read a poison record from {args.attack_record}: {exc}") from exc
    if not isinstance(record, dict) or "split" not in record or "train_images" not in record:
        raise CLIError(f"--attack-record: {args.attack_record} is not a `guard poison` record (no split/train_images)")
    if record.get("dataset", args.dataset) != args.dataset:
        raise CLIError(f"--attack-record was made on --dataset {record['dataset']}, got --dataset {args.dataset}")
    if args.split is not None and args.split != record["split"]:
        raise CLIError(f"--attack-record was made on --split {record['split']}, got --split {args.split}")
    if args.limit is not None and args.limit != record["train_images"]:
        raise CLIError(f"--attack-record was made on {record['train_images']} images, got --limit {args.limit}")
    args.limit = record["train_images"]
    clean = load_data(args, args.model, record["split"])
    result = suspect_from_record(record, clean)
    return result.dataset, record["split"], record, result


def _fit(args: argparse.Namespace, model, suspect, device, out: Path):
    """RE Step 0: train on the suspect set without augmentation through the one training loop."""
    from ..models import save_weights
    from ..train import TrainConfig, train

    if args.fit_epochs < 1:
        raise CLIError(f"--fit-epochs must be >= 1, got {args.fit_epochs}")
    preset = TrainConfig.finetune if args.weights is not None else TrainConfig.scratch
    overrides = {"epochs": args.fit_epochs, "augment": False}
    if args.fit_lr is not None:
        overrides["lr"] = args.fit_lr
    try:
        config = preset(**overrides)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--fit-epochs/--fit-lr: {exc}") from exc
    train(model, suspect, config, generator=torch.Generator().manual_seed(args.seed), device=device,
          progress=not args.no_progress)
    return save_weights(model, out.with_name(out.stem + "_defender.pt"))


def _retrain(args: argparse.Namespace, kept, device, attack, eval_set):
    from ..models import create
    from ..train import TrainConfig, evaluate, train

    preset = TrainConfig.finetune if args.retrain_from is not None else TrainConfig.scratch
    try:
        config = preset(epochs=args.epochs, **({} if args.lr is None else {"lr": args.lr}))
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--epochs/--lr: {exc}") from exc
    model = create(args.model, num_classes=kept.num_classes, weights=args.retrain_from,
                   generator=torch.Generator().manual_seed(args.seed))
    started = time.perf_counter()
    history = train(model, kept, config, generator=torch.Generator().manual_seed(args.seed), device=device,
                    checkpoint=args.out_model, progress=not args.no_progress)
    out = {"weights": str(args.out_model), "train_images": len(kept), "epochs": len(history.history),
           "mode": config.mode, "seconds": round(time.perf_counter() - started, 2)}
    if attack is not None:
        out.update({k: v for k, v in attack_report(model, attack, eval_set, device=device).items() if k != "attack"})
    else:
        out["cda"] = evaluate(model, eval_set, device=device)
    return out


def _true_pattern(attack, shape) -> torch.Tensor | None:
    """What the record's trigger adds to a mid-grey image (the pattern itself for additive triggers)."""
    if attack is None or not hasattr(attack, "apply_trigger"):
        return None
    grey = torch.full((1, *shape), 0.5)
    return (attack.apply_trigger(grey) - grey)[0]


def run(args: argparse.Namespace) -> int:
    from ..detect import save_trigger_png
    from ..metrics import cleansing_rates

    cleanser = _cleanser(args)
    if args.weights is None and args.fit_epochs is None:
        raise CLIError("--weights (a model trained on the suspect set) is required unless --fit-epochs trains one")
    if args.retrain and (args.epochs is None or args.out_model is None):
        raise CLIError("--retrain needs --epochs N and --out-model PATH")
    if not args.retrain and (args.epochs is not None or args.out_model is not None or args.retrain_from):
        raise CLIError("--epochs, --out-model and --retrain-from apply with --retrain only")
    device = resolve_device(args.device)
    out = Path(args.out)
    suspect, split, record, poisoned = _suspect_set(args)
    model = initial_model(args, suspect.num_classes).to(device)
    summary: dict = {"model": args.model, "weights": str(args.weights) if args.weights else None,
                     "dataset": args.dataset, "split": split, "images": len(suspect)}
    if args.fit_epochs is not None:
        summary["defender_weights"] = str(_fit(args, model, suspect, device, out))
    generator = torch.Generator().manual_seed(args.seed)
    result = cleanser.cleanse(model, suspect, generator=generator, device=device, progress=not args.no_progress)
    attack = None
    if record is not None:
        from ..attacks import attack_from_record

        attack = attack_from_record(record)
        target = attack.config.target
        summary["attack"] = {"name": record["attack"], "target": target, "num_poisons": len(record["indices"]),
                             "record": str(args.attack_record)}
        if poisoned.indices.numel():
            tpr, fpr = cleansing_rates(result.removed, poisoned.indices, suspect.labels, target)
            summary["attack"].update(tpr=tpr, fpr=fpr, target_detected=result.target_class == target)
    if result.pattern is not None:
        true = _true_pattern(attack, tuple(suspect.images.shape[1:]))
        gap = torch.zeros(result.pattern.shape[0], result.pattern.shape[1], 2)
        panel = result.pattern if true is None else torch.cat([result.pattern, gap, true], dim=2)
        summary["pattern_png"] = str(save_trigger_png(panel, out.with_name(out.stem + "_pattern.png")))
    if args.retrain:
        eval_args = argparse.Namespace(**{**vars(args), "limit": args.eval_limit})
        eval_set = load_data(eval_args, args.model, args.eval_split)
        summary["retrained"] = {"eval_split": args.eval_split,
                                **_retrain(args, result.cleansed(suspect), device, attack, eval_set)}
    result.save(out, **summary)
    if args.json:
        print(json.dumps({k: v for k, v in json.loads(out.read_text()).items() if k not in ("removed", "pattern")},
                         indent=2))
        return 0
    stat = result.statistic
    sources = result.details.get("source_classes") if result.detected else None
    verdict = {None: "no verdict (removes a quota of every class)", False: "no poisoning detected",
               True: f"POISONED, target class {result.target_class}"
               + (f" (source classes {', '.join(map(str, sources))})" if sources else "")}[result.detected]
    print(f"{args.method} on {len(suspect)} {args.dataset}/{split} images ({result.seconds:.0f}s): {verdict}; "
          f"{stat['name']} {stat['value']:.4g}" + ("" if stat["threshold"] is None else f" vs {stat['threshold']}"))
    rule, fit = result.details.get("removal_rule"), result.details.get("margin_mixture") or {}
    how = ""
    if rule == "margin":
        first = (fit.get("other") or [None])[0]  # an untrusted split at the multiple, retried at the estimate
        how = (" (the margin rule: the target margin they lost under the subtracted "
               + (f"estimate itself, since at ×{first['scale']:.3g}{_FALLBACKS[first['fallback']][1:]})" if first
                  else "pattern)"))
    elif rule == "flip":
        how = f" (eq. 12: their label changed under the subtracted pattern{_FALLBACKS.get(fit.get('fallback'), '')})"
    print(f"removed {result.removed.numel()} images{how}")
    if "tpr" in summary.get("attack", {}):
        a = summary["attack"]
        print(f"against the record ({a['name']}, target {a['target']}): TPR {a['tpr']:.3f}, FPR {a['fpr']:.3f}")
    if "retrained" in summary:
        rt = summary["retrained"]
        print(f"retrained on {rt['train_images']} images: CDA {rt['cda']:.4f}"
              + (f", ASR {rt['asr']:.4f}" if "asr" in rt else "") + f"  weights: {rt['weights']}")
    print(f"report: {out}" + (f"  pattern: {summary['pattern_png']}" if "pattern_png" in summary else ""))
    return 0
