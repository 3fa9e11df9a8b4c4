"""Training-set cleansing on real CIFAR-10: RE, SS, AC and CI beside Xiang et al.'s Tables 2–4.

What:      for each poisoned CIFAR-10 training set — Xiang's imperceptible patterns A (chessboard, 2/255) and C
           (cross, 70/255) with 1 and 3 source classes, B (grid, 3/255) with 1 source (a row held out from the
           choice of RE's removal defaults), the perceptible pattern D (80/255 square) with 1 source,
           BadNets, Blend, and WaNet and Adaptive-Blend (the victims the other defense benchmarks share; Adaptive-Blend
           is made to defeat latent-separation defenses) — and for the clean training set: each method's detection
           outcome (Table 2 symbols: ✓ detected with the right target / nothing on a clean set, ~ wrong target,
           ✗ missed / false alarm), the removal's TPR/FPR (Table 3; FPR over the clean images labelled with the
           target), the ASR and accuracy of a model retrained on what is left (Table 4, supp. Tables 10–12), and
           each method's wall time. The seed's compact-ResNet-18 rows are printed beside ours (ResNet-20's 64-d
           features are its size class).
Victims:   ``victims.victim`` — the pretrained ResNet-20 fine-tuned on the FULL poisoned training set (undefended
           ASR >= 0.9 where the attack allows): 3 epochs, 8 for C1 and D1 (VICTIM_EPOCHS), whose small
           single-source patterns do not take hold in 3, and for WaNet; the clean row is the pretrained ResNet-20
           itself (trained on the clean set).
           ``--victims scratch``: a ResNet-20 trained from scratch on it instead (the victims' scratch recipe, 30
           epochs), as the seed's are; Step 0 (``--step0 recipe``) and the retraining then follow that recipe too
           (hours per row on 2 CPU cores, minutes on a GPU). Give such a run its own ``--out``.
Defender:  RE's Step 0 (§5.2.1: the victim's training, without augmentation, so that the model carries the exact
           pattern rather than its shifted copies); SS, AC and CI inspect the same model, as in the seed.
           ``--step0 scratch`` (default): a randomly initialised ResNet-20 trained without augmentation
           (``TrainConfig.scratch``, 12 epochs; ≈ 40 min on 2 cores), as the seed trains it. ``--step0 recipe``:
           the victims' recipe on the suspect set from the same pretrained weights with augmentation off (the
           row victim's epochs; 3 epochs ≈ 8 min on 2 cores).
           The recipe model inherits the pretrained backbone's tolerance to shifts, so it answers the chessboard
           A's negative (its one-pixel shift minus a constant) and RE's estimate mixes the two: on A1 eq. 12 then
           removes 63–85 % of the poisons; the scratch model carries the pattern itself (93–98 %). Step 0 models
           are cached beside the victims. Each row records Step 0's accuracy on the target's clean training
           images and eq. 12 with the true pattern (the TPR/FPR a perfect estimate would reach on that model).
           ``--inspect victim``: SS, AC and CI inspect the victim itself instead — the model a user has, trained
           with augmentation — and Step 0 is trained only for RE.
Methods:   library defaults; SS and AC are given the true target for TPR/FPR (Xiang's comparison; SS removes 1000
           images of it), AC's detection outcome is its own silhouette test; RE and CI use their own detection.
           ``--re-removal-pi P``: RE's removal subtracts the smallest multiple of its estimate that sends P of the
           source class to the target (``removal_pi``, default the library's 0.995); ``--re-subtract-scale K``: a
           fixed K times the estimate instead (``subtract_scale``; 1 is eq. 12 as the paper states it). Each RE
           row also records eq. 12 at the other margins on the same estimate: the fixed multiples 1, 1.25, 1.5
           (``scaled_estimate``) and removal_pi 0.99, 0.995, 0.999 (``removal_pi_estimate``). ``--re-removal``: RE
           removes the target images whose target margin the subtraction lowers most (``margin``, the library's
           default, ``guard.cleanse.margin_removal`` with its fallbacks: the high component of a two-component
           Gaussian mixture on the drops) or those whose label it changes (``flip``: eq. 12); each row records the
           other criterion at the same multiple (``removal_flip``, or ``removal_margin`` with its mixture).
           ``--re-removal flip --re-removal-to sources``: eq. 12 removes only the target images whose label moves to an
           inferred source class (``removal_to``); each row records the other rule at the same multiple
           (``removal_to_any`` or ``removal_to_sources``), the inferred ``source_classes`` and where the subtraction
           sends the target's poisons and clean images (``moved_to``: counts of the new labels). The
           ``scaled_estimate``, ``removal_pi_estimate`` and ``removal_to_*`` entries are eq. 12's label rule at those
           multiples.
Retrain:   the victims' recipe (pretrained ResNet-20, SGD lr 0.01, the row victim's epochs, augmentation) on the
           cleansed set — the same training that implants the backdoor on the full set; CDA and ASR on test-lossless
           (ASR: source classes for Xiang's patterns, M2'; non-target images otherwise; recorded with its number
           of images and exact 95 % interval). A method that removes nothing keeps the undefended numbers.
           ``--retrain-seeds N``: N trainings with seeds 0..N-1, medians (each run keeps its interval).
Output:    benchmarks/results/cleanse_cifar10.json and .png (rows, timings, hardware, versions; each method's
           per-class statistic; RE's K×K pair pattern norms, ``pair_norms``, which its test and its inferred sources
           rest on, and its estimated pattern beside the true one with their per-pixel MSE, as Xiang reports it).
Rows:      one guard.sweep job per row: Ray tasks of --threads CPUs each (one GPU each when CUDA is available)
           on a local Ray or --address (a cluster runs the rows side by side); --serial runs them here in turn.
Run:       GUARD_DATA_DIR=../shared/data python benchmarks/cleanse_cifar10.py [--rows A1,C3] [--methods re,ac]
           [--no-retrain | --retrain-methods re] [--re-removal-pi 0.99] [--inspect victim] [--threads 2]
           [--device cuda] [--out NAME] [--serial];  a rerun with the same --out resumes after the finished rows;
           --merge A.json B.json ... --out NAME gathers the rows of earlier runs split over machines; --quick: a smoke
           run on 5000 images with tiny budgets (numbers are not comparable with the tables).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from guard.attacks import attack_from_record, create_attack
from guard.cleanse import (REMOVAL_TARGETS, REMOVALS, ReverseEngineeringConfig, create_cleanser, margin_removal,
                           removal_scale, subtracted_labels, subtraction_removal, suspect_from_record)
from guard.data import load_dataset
from guard.metrics import Rate, cleansing_rates, evaluate_backdoor
from guard.models import create, save_weights
from guard.sweep import Grid
from guard.train import TrainConfig, evaluate, predict, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from victims import (CACHE, DEFENSE_VICTIMS, RECIPES, WEIGHTS, add_sweep_arguments, data_root,  # noqa: E402
                     job_resources, results_name, run_grid, train_config, victim)

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
METHODS = ("re", "ss", "ac", "ci")
#: --step0 scratch's default epochs
SCRATCH_EPOCHS = 12
#: eq. 12 is also measured at these fixed multiples of the estimate (1: eq. 12 as stated) ...
SUBTRACT_SCALES = (1.0, 1.25, 1.5)
#: ... and at these removal_pi (each but the one the run uses)
REMOVAL_PIS = (0.99, 0.995, 0.999)
#: --quick: RE's code path at a tiny budget (a smoke test, not a measurement)
RE_QUICK = {"max_steps": 3, "batch_size_per_class": 8, "max_images": 50}


def shared(attack: str) -> tuple[str, dict]:
    """The row of a victim the defense benchmarks share (victims.DEFENSE_VICTIMS; its epochs go to VICTIM_EPOCHS)."""
    return attack, {k: v for k, v in DEFENSE_VICTIMS[attack].items() if k != "epochs"}


#: row -> (attack, options); None = the clean training set
ROWS = {
    "A1": ("xiang", {"pattern": "A", "num_sources": 1}),
    "A3": ("xiang", {"pattern": "A", "num_sources": 3}),
    "B1": ("xiang", {"pattern": "B", "num_sources": 1}),
    "C1": ("xiang", {"pattern": "C", "num_sources": 1}),
    "C3": ("xiang", {"pattern": "C", "num_sources": 3}),
    "D1": ("xiang", {"pattern": "D", "num_sources": 1}),
    "badnets": shared("badnets"),
    "blend": shared("blend"),
    "wanet": shared("wanet"),
    "adaptive-blend": shared("adaptive-blend"),
    "clean": None,
}
#: rows whose victims need more than the recipe's 3 epochs to take hold (3 epochs: C1 ASR 0.37, D1 0.28 on the
#: source class; WaNet: victims.DEFENSE_VICTIMS); their Step 0 (--step0 recipe) and retraining default to the same
#: epochs
VICTIM_EPOCHS = {"C1": 8, "D1": 8, "wanet": DEFENSE_VICTIMS["wanet"]["epochs"]}


def row_victim(row: str, recipe: str = "finetune"):
    """The cached victim of ``row`` trained by ``recipe`` (victims.victim: built once, shared with every
    benchmark)."""
    attack_name, options = ROWS[row]
    return victim(attack_name, recipe=recipe, epochs=row_epochs(row, recipe), **options)


def row_epochs(row: str, recipe: str) -> int:
    """The epochs of ``row``'s victim: VICTIM_EPOCHS for the fine-tuned ones, else the recipe's."""
    epochs = RECIPES[recipe]["epochs"]
    return VICTIM_EPOCHS.get(row, epochs) if recipe == "finetune" else epochs


#: Xiang et al., compact ResNet-18 (ALGORITHMS.md T11–T13): detection, TPR/FPR (%), retrained ASR/ACC (%)
PAPER = {
    "A1": {"re": ("✓", (93.6, 20.9), (1.9, 90.2)), "ss": (None, (29.6, 17.0), (94.8, 90.3)),
           "ac": ("✓", (30.6, 45.0), (99.3, 90.3)), "ci": ("✓", (55.8, 7.5), (98.5, 90.6))},
    "A3": {"re": ("✓", (94.8, 11.3), (1.1, 90.1)), "ss": (None, (39.2, 15.7), (98.3, 90.2)),
           "ac": ("✓", (61.2, 36.1), (91.1, 90.6)), "ci": ("✓", (89.7, 1.9), (2.2, 90.6))},
    "B1": {"re": ("✓", (100.0, 9.5), (0.0, 90.2)), "ss": (None, (98.2, 10.2), (0.2, 90.3)),
           "ac": ("~", (96.0, 0.0), (0.3, 90.4)), "ci": ("✓", (99.8, 0.0), (0.1, 90.9))},
    "C1": {"re": ("✓", (91.0, 10.6), (2.6, 90.4)), "ss": (None, (45.8, 15.4), (97.6, 90.5)),
           "ac": ("✓", (81.8, 39.4), (80.6, 90.3)), "ci": ("✓", (93.8, 13.1), (3.2, 90.5))},
    "C3": {"re": ("✓", (99.0, 4.5), (0.1, 90.5)), "ss": (None, (16.5, 18.4), (97.4, 90.8)),
           "ac": ("✓", (61.8, 43.4), (97.2, 90.0)), "ci": ("✓", (98.7, 0.0), (0.3, 90.2))},
    "D1": {"re": ("✓", (98.8, 12.2), (0.3, 90.0)), "ss": (None, (75.8, 12.4), (15.0, 90.4)),
           "ac": ("✓", (92.2, 20.2), (0.4, 90.2)), "ci": ("✗", None, None)},
    "clean": {"re": ("✓", None, None), "ac": ("✓", None, None), "ci": ("✓", None, None)},
}


#: --quick's A1: 100 poisons in the 5000-image subset
QUICK_A1 = ("xiang", {"pattern": "A", "num_sources": 1, "per_source": 100})


def outcome(result, target: int | None) -> str:
    """Table 2's symbol for a detection result against the truth (``target`` None = clean set)."""
    if result.detected is None:
        return "n/a"
    if target is None:
        return "✗" if result.detected else "✓"
    if not result.detected:
        return "✗"
    return "✓" if result.target_class == target else "~"


def quick_victim(attack_name: str, options: dict, train_set, root: Path, work: Path):
    """--quick: the victim recipe for one epoch on a subset, written like guard poison (weights + record)."""
    attack = create_attack(attack_name, **options)
    poisoned = attack.poison(train_set, torch.Generator().manual_seed(SEED))
    model = create("resnet20", weights=root / WEIGHTS)
    train(model, poisoned.dataset, train_config(epochs=1),
          generator=torch.Generator().manual_seed(SEED), progress=True)
    weights = save_weights(model, work / f"quick-{attack_name}.pt")
    record = {**poisoned.record(), "seed": SEED, "train_images": len(train_set), "split": "train"}
    return weights, record


def asr_of(model, attack, test_set) -> dict:
    """CDA and ASR (M2' on the source classes for Xiang's patterns, else on the non-target images), with the
    number of triggered images behind the ASR and its exact 95 % interval: one source class of test-lossless has
    only 86–112 images, so one image moves the ASR by about 1 point."""
    scores = evaluate_backdoor(model, attack, test_set)
    sources = getattr(attack.config, "sources", None)
    labels = test_set.labels
    if sources:
        asr, n = scores["asr_source"], int(torch.isin(labels, torch.as_tensor(list(sources))).sum())
    else:
        asr, n = scores["asr_nontarget"], int((labels != attack.config.target).sum())
    return {"cda": scores["cda"], "asr": asr, "asr_images": n, "asr_ci95": list(Rate(asr, n).interval())}


def step0(suspect, record, args, root: Path):
    """RE's Step 0 (§5.2.1), the model RE inspects (SS, AC and CI too unless --inspect victim): ``--step0 recipe``
    trains the victims' recipe (from the pretrained weights for fine-tuned victims) with augmentation off;
    ``scratch`` trains a randomly initialised ResNet-20 (``TrainConfig.scratch``: SGD lr 0.1, cosine) without
    augmentation, as the seed does. Cached beside the victims, keyed by the row's record and the training;
    returns (model, seconds the training took)."""
    epochs = 1 if args.quick else args.step0_epochs
    config = (train_config(args.victims, epochs=epochs, augment=False) if args.step0 == "recipe"
              else TrainConfig.scratch(epochs=epochs, augment=False))
    key = json.dumps({"record": record, "step0": args.step0, "config": repr(config), "seed": SEED}, sort_keys=True,
                     default=str)
    cached = CACHE / f"step0-{hashlib.sha256(key.encode()).hexdigest()[:10]}.pt"
    meta = cached.with_name(cached.name + ".json")
    if cached.is_file() and meta.is_file() and not args.quick:
        return create("resnet20", weights=cached).to(args.device), json.loads(meta.read_text())["seconds"]
    model = create("resnet20", weights=root / WEIGHTS if config.mode == "finetune" else None,
                   generator=torch.Generator().manual_seed(SEED)).to(args.device)
    started = time.perf_counter()
    train(model, suspect, config, generator=torch.Generator().manual_seed(SEED), progress=True)
    sync(args.device)
    seconds = round(time.perf_counter() - started, 1)
    if not args.quick:
        CACHE.mkdir(parents=True, exist_ok=True)
        save_weights(model, cached)
        meta.write_text(json.dumps({"step0": args.step0, "config": repr(config), "seconds": seconds}))
    return model, seconds


def step0_fit(model, suspect, poison_indices: torch.Tensor, target: int, true: torch.Tensor | None) -> dict:
    """What eq. 12's removal rests on: Step 0's accuracy on the target's clean training images and, for
    Xiang's patterns, eq. 12 with the true pattern v* (the TPR/FPR of a perfect estimate)."""
    clean = torch.ones(len(suspect), dtype=torch.bool)
    clean[poison_indices] = False
    images = suspect.subset(((suspect.labels == target) & clean).nonzero().squeeze(1))
    device = next(model.parameters()).device
    out = {"target_train_accuracy": (predict(model, images, device=device) == target).double().mean().item()}
    if true is not None:
        out["true_pattern_tpr"], out["true_pattern_fpr"] = subtraction_rates(model, suspect, poison_indices, target,
                                                                             true)
    return out


def moved_to(model, suspect, poison_indices: torch.Tensor, target: int, pattern: torch.Tensor) -> dict:
    """Where subtracting ``pattern`` sends the images labelled ``target`` that change label: counts of the new
    labels among the poisons and among the clean images (what eq. 12 removes, and what ``removal_to`` keeps)."""
    index, preds = subtracted_labels(model, suspect, target, pattern, device=next(model.parameters()).device)
    poison = torch.isin(index, poison_indices)
    return {group: {str(c): n for c, n in sorted(Counter(preds[mask & (preds != target)].tolist()).items())}
            for group, mask in (("poisons", poison), ("clean", ~poison))}


def subtraction_rates(model, suspect, poison_indices: torch.Tensor, target: int,
                      pattern: torch.Tensor, to: list[int] | None = None) -> tuple[float, float]:
    """(TPR, FPR) of eq. 12 with ``pattern`` (guard.cleanse.subtraction_removal; ``to``: the classes a removed image
    must move to)."""
    removed = subtraction_removal(model, suspect, target, pattern, to=to, device=next(model.parameters()).device)
    return cleansing_rates(removed, poison_indices, suspect.labels, target)


def retrain(kept, root: Path, epochs: int, attack, test_set, device, victims: str = "finetune",
            seeds: int = 1) -> dict:
    """The victims' recipe on the cleansed set (see the header), once per training seed SEED, SEED+1, …; with
    several seeds CDA and ASR are their medians and ``runs`` holds each."""
    config = train_config(victims, epochs=epochs)
    runs = []
    for seed in range(SEED, SEED + seeds):
        model = create("resnet20", weights=root / WEIGHTS if config.mode == "finetune" else None,
                       generator=torch.Generator().manual_seed(seed)).to(device)
        started = time.perf_counter()
        train(model, kept, config, generator=torch.Generator().manual_seed(seed), progress=True)
        sync(device)
        out = asr_of(model, attack, test_set) if attack is not None else {"cda": evaluate(model, test_set)}
        runs.append({**out, "seed": seed, "seconds": round(time.perf_counter() - started, 1)})
    if seeds == 1:
        return {**{k: v for k, v in runs[0].items() if k != "seed"}, "train_images": len(kept)}
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]  # each run keeps its interval
               if k not in ("seed", "seconds", "asr_images", "asr_ci95")}
    if "asr_images" in runs[0]:
        medians["asr_images"] = runs[0]["asr_images"]  # one test set for every run
    return {**medians, "train_images": len(kept), "seconds": round(sum(r["seconds"] for r in runs), 1), "runs": runs}


def run_row(row: dict, spec, args, train_set, test_set, root: Path, work: Path, save) -> None:
    """Fill ``row`` (its ``row`` name set) method by method, calling ``save`` after each."""
    name = row["row"]
    if spec is None:
        weights, record, attack = root / WEIGHTS, None, None
        suspect, poison_indices, target = train_set, None, None
        victim_model = create("resnet20", weights=weights).to(args.device)
        undefended = {"cda": evaluate(victim_model, test_set)}
    else:
        attack_name, options = spec
        if args.quick:
            weights, record = quick_victim(attack_name, options, train_set, root, work)
        else:
            v = row_victim(name, args.victims)
            weights, record = v.weights, json.loads(Path(v.record).read_text())
        poisoned = suspect_from_record(record, train_set)
        attack = attack_from_record(record)
        suspect, poison_indices, target = poisoned.dataset, poisoned.indices, attack.config.target
        victim_model = create("resnet20", weights=weights).to(args.device)
        undefended = asr_of(victim_model, attack, test_set)
        row.update(attack=attack_name, options=options, target=target, num_poisons=int(poison_indices.numel()),
                   sources=list(getattr(attack.config, "sources", None) or []))
    row["undefended"] = undefended
    print(f"[{name}] undefended {undefended}", flush=True)

    row["inspect"] = args.inspect
    defender = None
    if "re" in args.methods or args.inspect == "step0":
        defender, row["fit_seconds"] = step0(suspect, record, args, root)
        row["step0"] = (asr_of(defender, attack, test_set) if attack is not None
                        else {"cda": evaluate(defender, test_set)})
        if target is not None:
            row["step0"].update(step0_fit(defender, suspect, poison_indices, target, true_pattern(attack, suspect)))
        print(f"[{name}] Step 0 model {row['step0']} ({row['fit_seconds']} s)", flush=True)
    n_target = int((suspect.labels == target).sum()) if target is not None else None
    row["methods"] = {}
    for method in args.methods:
        options = dict(RE_QUICK if (args.quick and method == "re") else {})
        if method == "re":
            options.update(removal_pi=args.re_removal_pi, subtract_scale=args.re_subtract_scale,
                           removal_to=args.re_removal_to, removal=args.re_removal)
        if method == "ss" and target is not None:
            options.update(target=target, eps=min(1.0, 1000 / (1.5 * n_target)))
        cleanser = create_cleanser(method, **options)
        inspected = defender if method == "re" or args.inspect == "step0" else victim_model
        started = time.perf_counter()
        result = cleanser.cleanse(inspected, suspect, generator=torch.Generator().manual_seed(SEED), progress=True)
        sync(args.device)
        seconds = time.perf_counter() - started
        entry = {"outcome": outcome(result, target), "detected": result.detected, "target_class": result.target_class,
                 "statistic": result.statistic, "removed": int(result.removed.numel()), "seconds": round(seconds, 1),
                 "class_scores": {str(c): round(float(v), 4) for c, v in sorted(result.class_scores.items())}}
        if method == "re":
            entry["pair_norms"] = result.details["norms"]
        removal = result
        if method == "ac" and target is not None and result.target_class != target:
            removal = create_cleanser("ac", target=target).cleanse(inspected, suspect,
                                                                   generator=torch.Generator().manual_seed(SEED))
            entry["removed_known_target"] = int(removal.removed.numel())
        if poison_indices is not None:
            tpr, fpr = cleansing_rates(removal.removed, poison_indices, suspect.labels, target)
            entry.update(tpr=tpr, fpr=fpr)
        if result.pattern is not None:
            entry["pattern_norm"] = float(result.pattern.norm())
            entry["subtract_scale"] = result.details["subtract_scale"]
            entry["removal_source_rate"] = result.details["removal_source_rate"]
            entry["source_classes"] = result.details["source_classes"]
            true = true_pattern(attack, suspect)
            row["patterns"] = {"estimated": rounded(result.pattern), "true": None if true is None else rounded(true)}
            if true is not None:
                entry["pattern_mse_per_pixel"] = float((result.pattern - true).square().mean())
            if poison_indices is not None and result.target_class == target:  # eq. 12 along the estimate's ray
                fixed = args.re_subtract_scale
                to = result.details["source_classes"] if args.re_removal_to == "sources" else None
                other = "any" if to is not None else "sources"
                removed_pattern = result.details["subtract_scale"] * result.pattern
                entry[f"removal_to_{other}"] = dict(zip(("tpr", "fpr"), subtraction_rates(
                    defender, suspect, poison_indices, target, removed_pattern,
                    None if to is not None else result.details["source_classes"])))
                entry["moved_to"] = moved_to(defender, suspect, poison_indices, target, removed_pattern)
                entry["scaled_estimate"] = {str(k): dict(zip(("tpr", "fpr"), subtraction_rates(
                    defender, suspect, poison_indices, target, k * result.pattern, to)))
                    for k in SUBTRACT_SCALES if k != fixed}
                entry["removal_pi_estimate"] = {}
                for pi in REMOVAL_PIS:
                    if fixed is None and pi == args.re_removal_pi:
                        continue
                    k, rate = removal_scale(defender, suspect, result.details["source_class"], target, result.pattern,
                                            pi)
                    rates = subtraction_rates(defender, suspect, poison_indices, target, k * result.pattern, to)
                    entry["removal_pi_estimate"][str(pi)] = {"scale": k, "source_rate": rate, "tpr": rates[0],
                                                             "fpr": rates[1]}
                if args.re_removal == "margin":
                    entry["margin_mixture"] = result.details["margin_mixture"]
                    entry["removal_flip"] = dict(zip(("tpr", "fpr"), subtraction_rates(
                        defender, suspect, poison_indices, target, removed_pattern)))
                else:
                    by_margin, fit = margin_removal(defender, suspect, target, result.pattern,
                                                    scale=result.details["subtract_scale"], seed=SEED,
                                                    device=args.device)
                    entry["removal_margin"] = {**dict(zip(("tpr", "fpr"), cleansing_rates(
                        by_margin, poison_indices, suspect.labels, target))), "mixture": fit}
        row["methods"][method] = entry
        print(f"[{name}] {method}: {entry}", flush=True)
        if args.retrain and method in args.retrain_methods:
            entry["retrained"] = (retrain(removal.cleansed(suspect), root, args.retrain_epochs, attack, test_set,
                                          args.device, args.victims, args.retrain_seeds)
                                  if removal.removed.numel() else
                                  {**undefended, "note": "nothing removed: the undefended model"})
            print(f"[{name}] {method} retrained: {entry['retrained']}", flush=True)
        save()
    row["complete"] = True
    save()


def rounded(pattern: torch.Tensor) -> list:
    """A pattern as nested lists for the JSON (5 decimals: far below one grey level, 1/255)."""
    return pattern.mul(1e5).round().div(1e5).tolist()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work before reading a wall clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def true_pattern(attack, suspect) -> torch.Tensor | None:
    """Xiang's additive pattern v* of the row (None for the other attacks and the clean set)."""
    if attack is None or attack.name != "xiang":
        return None
    return attack.trigger_params(tuple(suspect.images.shape[1:]))["v"]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("methods")]
    patterns = {r["row"]: (torch.tensor(r["patterns"]["estimated"]),
                           None if r["patterns"]["true"] is None else torch.tensor(r["patterns"]["true"]))
                for r in rows if r.get("patterns")}
    methods = [m for m in METHODS if any(m in r["methods"] for r in rows)]
    fig = plt.figure(figsize=(22, 9 if patterns else 4.5))
    grid = fig.add_gridspec(2 if patterns else 1, max(4, len(patterns)))
    axes = [fig.add_subplot(grid[0, i]) for i in range(4)]
    width = 0.8 / (len(methods) + 1)
    for k, label in enumerate(["undefended", *methods]):
        xs = [i + k * width for i in range(len(rows))]
        get = (lambda r, key: r["undefended"].get(key)) if label == "undefended" else \
            (lambda r, key, m=label: r["methods"].get(m, {}).get(key))
        if label != "undefended":
            axes[0].bar(xs, [100 * (get(r, "tpr") or 0) for r in rows], width, label=label)
            axes[1].bar(xs, [100 * (get(r, "fpr") or 0) for r in rows], width, label=label)
            axes[3].bar(xs, [get(r, "seconds") or 0 for r in rows], width, label=label)
            asr = [100 * (get(r, "retrained") or {}).get("asr", math.nan) for r in rows]  # NaN: not retrained, no bar
        else:
            asr = [100 * (get(r, "asr") or 0) for r in rows]
        axes[2].bar(xs, asr, width, label=label, color="lightgrey" if label == "undefended" else None)
    titles = ("TPR (%) of the removal", "FPR (%) on the target class", "ASR (%) after retraining", "wall time (s)")
    for ax, title in zip(axes, titles):
        ax.set_xticks([i + 0.4 for i in range(len(rows))], [r["row"] for r in rows])
        ax.set_title(title)
        ax.legend(fontsize=7)
    for i, (name, (estimated, true)) in enumerate(sorted(patterns.items())):
        ax = fig.add_subplot(grid[1, i])
        panels = [estimated] + ([] if true is None else [torch.zeros(estimated.shape[0], estimated.shape[1], 2), true])
        image = torch.cat(panels, dim=2)
        image = (image - image.min()) / (image.max() - image.min() + 1e-12)
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{name}: RE estimate | true", fontsize=9)
        ax.axis("off")
    inspected = "SS/AC/CI on the victim" if results.get("inspect") == "victim" else "every method on Step 0"
    fig.suptitle(f"Training-set cleansing, CIFAR-10 ResNet-20, {inspected} ({results['hardware']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def row_job(row: str, settings: dict) -> dict:
    """One row, run by the sweep (guard.sweep; a Ray task or the serial loop): Step 0, every method, the
    retraining. ``settings``: the command line's run settings (methods, retraining, Step 0, quick, device)."""
    args = argparse.Namespace(**settings)
    args.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                               else args.device)
    root = data_root()
    train_set = load_dataset("cifar10", root, split="train")
    test_set = load_dataset("cifar10", root, split="test-lossless")
    if args.quick:
        train_set = train_set.subset(range(5000))
    spec = QUICK_A1 if args.quick and row == "A1" else ROWS[row]
    epochs = row_epochs(row, args.victims)
    if args.step0_epochs is None:
        args.step0_epochs = epochs if args.step0 == "recipe" else SCRATCH_EPOCHS
    if args.retrain_epochs is None:
        args.retrain_epochs = epochs
    result = {"row": row, "hardware": hardware_of(args.device), "victim_epochs": epochs,
              "step0_epochs": args.step0_epochs, "retrain_epochs": args.retrain_epochs}
    with tempfile.TemporaryDirectory(prefix="cleanse-bench-") as work:  # --quick's victims
        run_row(result, spec, args, train_set, test_set, root, Path(work), lambda: None)
    return result


def hardware_of(device: torch.device) -> dict:
    return {"device": device_name(device), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to run (default all: {','.join(ROWS)})")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-retrain", dest="retrain", action="store_false")
    parser.add_argument("--retrain-epochs", type=int, default=None,
                        help="epochs of the retraining (default: those of the row's victim)")
    parser.add_argument("--retrain-methods", default=",".join(METHODS), help="methods whose cleansed set is retrained")
    parser.add_argument("--retrain-seeds", type=int, default=1,
                        help="retrain each cleansed set with this many training seeds and report the medians")
    parser.add_argument("--victims", choices=sorted(RECIPES), default="finetune",
                        help="the victims' recipe (benchmarks/victims.py): fine-tuned from the pretrained ResNet-20 "
                             "(default) or trained from scratch; Step 0 recipe and the retraining follow it")
    parser.add_argument("--step0", choices=("recipe", "scratch"), default="scratch",
                        help="Step 0's model: the victims' recipe from the pretrained weights, or from scratch "
                             "(both without augmentation; see step0())")
    parser.add_argument("--step0-epochs", type=int, default=None,
                        help=f"Step 0's epochs (default: the row victim's for recipe, {SCRATCH_EPOCHS} for scratch)")
    parser.add_argument("--inspect", choices=("step0", "victim"), default="step0",
                        help="the model SS, AC and CI inspect: RE's Step 0, as in the seed (default), or the victim "
                             "itself (trained with augmentation; Step 0 is then trained only for RE)")
    parser.add_argument("--re-removal-pi", type=float, default=ReverseEngineeringConfig.removal_pi,
                        help="RE's removal_pi: the removal subtracts the smallest multiple of the estimate that sends "
                             "this fraction of the source class to the target (default: the library's, %(default)s)")
    parser.add_argument("--re-subtract-scale", type=float, default=None,
                        help="RE's subtract_scale: the removal subtracts this fixed multiple of the estimate instead "
                             "(1: eq. 12 as the paper states it)")
    parser.add_argument("--re-removal-to", choices=REMOVAL_TARGETS, default=ReverseEngineeringConfig.removal_to,
                        help="RE's removal_to (with --re-removal flip): eq. 12 removes a target image whose label "
                             "changes to any class, or only to an inferred source class (default: the library's, "
                             "%(default)s)")
    parser.add_argument("--re-removal", choices=REMOVALS, default=ReverseEngineeringConfig.removal,
                        help="RE's removal: the target images whose target margin the subtraction lowers most (the "
                             "margin rule, with the library's fallbacks), or those whose label it changes (eq. 12) "
                             "(default: the library's, %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each row's job (its declared CPUs)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    add_sweep_arguments(parser)
    parser.add_argument("--out", type=results_name,
                        default=None, help="results name (default cleanse_cifar10[_quick]; .json/.png)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5000 images, tiny budgets, rows A1 and clean")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="no run: gather the rows of these results files (e.g. runs on several devices) into "
                             "--out (default cleanse_cifar10) and plot them")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    retrain_methods = [m for m in args.retrain_methods.split(",") if m]
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS] + [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown rows/methods {unknown}")
    if args.retrain_seeds < 1:
        parser.error(f"--retrain-seeds must be >= 1, got {args.retrain_seeds}")
    try:  # RE's removal options, refused now rather than after the victims and Step 0 are trained
        ReverseEngineeringConfig(removal_pi=args.re_removal_pi, subtract_scale=args.re_subtract_scale,
                                 removal_to=args.re_removal_to, removal=args.re_removal)
    except ValueError as e:
        parser.error(f"RE's removal options: {e}")
    name = args.out or ("cleanse_cifar10_quick" if args.quick else "cleanse_cifar10")
    out_json = RESULTS / f"{name}.json"
    if args.merge:
        results = merge([Path(f) for f in args.merge])
        out_json.write_text(json.dumps(results, indent=2, default=str))
        plot(results, RESULTS / f"{name}.png")
        summarize(results, out_json)
        return
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    retrain_epochs = 1 if args.quick else args.retrain_epochs  # None: each row's victim epochs
    if args.quick:
        rows = ["A1", "clean"]
    results = {"benchmark": "cleanse_cifar10", "quick": args.quick, "seed": SEED,
               "step0": {"model": args.step0, "epochs": args.step0_epochs}, "victims": args.victims,
               "inspect": args.inspect,
               "re_subtract_scale": args.re_subtract_scale, "re_removal_pi": args.re_removal_pi,
               "re_removal_to": args.re_removal_to, "re_removal": args.re_removal, "recipe": RECIPES[args.victims],
               "retrain_epochs": retrain_epochs, "retrain_seeds": args.retrain_seeds, "paper_compact": PAPER,
               "hardware": hardware_of(device), "rows": []}
    if out_json.is_file() and not args.quick:  # resume: keep the rows already measured
        results["rows"] = [r for r in json.loads(out_json.read_text())["rows"] if r["row"] in ROWS]
    results["rows"] = [r for r in results["rows"] if r.get("complete")]
    done = {r["row"] for r in results["rows"]}
    if not args.quick:  # victims are built here, once, before the rows run in parallel
        for row in rows:
            if ROWS[row] is not None and row not in done:
                row_victim(row, args.victims)
    settings = {"methods": methods, "retrain": args.retrain, "retrain_methods": retrain_methods,
                "retrain_epochs": retrain_epochs, "retrain_seeds": args.retrain_seeds, "step0": args.step0,
                "step0_epochs": args.step0_epochs, "inspect": args.inspect,
                "quick": args.quick, "device": args.device, "victims": args.victims,
                "re_subtract_scale": args.re_subtract_scale, "re_removal_pi": args.re_removal_pi,
                "re_removal_to": args.re_removal_to, "re_removal": args.re_removal}
    grid = Grid(name=name, function=f"{Path(__file__).resolve()}:row_job", params={"settings": settings},
                points=[{"row": r} for r in rows if r not in done],
                resources=job_resources(args.threads, device),
                out=None if args.quick else RESULTS / f"{name}.sweep.json")
    for finished in run_grid(grid, args):
        if not finished.ok:
            print(f"FAILED row {finished.job.params['row']}: {finished.record['error']}", flush=True)
            continue
        results["rows"] = [r for r in results["rows"] if r["row"] != finished.result["row"]] + [finished.result]
        results["rows"].sort(key=lambda r: list(ROWS).index(r["row"]))
        out_json.write_text(json.dumps(results, indent=2, default=str))
    out_json.write_text(json.dumps(results, indent=2, default=str))
    plot(results, RESULTS / f"{name}.png")
    summarize(results, out_json)


def merge(files: list[Path]) -> dict:
    """One results dict from several runs' files: each row once (the last file that has it), in ROWS order."""
    runs = [json.loads(f.read_text()) for f in files]
    rows = {r["row"]: r for run in runs for r in run["rows"] if r.get("methods")}
    devices = sorted({r.get("hardware", run["hardware"])["device"] for run in runs for r in run["rows"]})
    return {**runs[0], "hardware": {**runs[0]["hardware"], "device": " + ".join(devices)},
            "merged_from": [f.name for f in files], "rows": [rows[n] for n in ROWS if n in rows]}


def summarize(results: dict, out_json: Path) -> None:
    for row in results["rows"]:
        for method, e in row.get("methods", {}).items():
            paper = PAPER.get(row["row"], {}).get(method)
            rates = f"{100 * e['tpr']:.1f}/{100 * e['fpr']:.1f}" if "tpr" in e else "–"
            retrained = e.get("retrained", {})
            asr = "–" if "asr" not in retrained else f"{100 * retrained['asr']:.1f}"
            if "asr_images" in retrained:
                asr += f" of {retrained['asr_images']}"
            print(f"{row['row']:<8} {method:<3} {e['outcome']:<4} TPR/FPR {rates:<12} retrained ASR {asr}  "
                  f"{e['seconds']:.0f}s   paper: {paper}")
    print(f"wrote {out_json} and .png")


if __name__ == "__main__":
    main()
