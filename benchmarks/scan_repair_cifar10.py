"""Scan and repair on real CIFAR-10: CNC and Neural Cleanse detection, Pivotal Tuning and NC repair.

What:     four parts, each written into one JSON as it finishes (--part picks them):
          detect — detection scores of CNC (max calibrated class score, code and paper forms) and NC (MAD
                   anomaly index) on --models clean and --models BadNets-poisoned ResNet-20s, ROC AUC (M9;
                   pick_your_poison.txt Table 2: 0.65–0.76 on CIFAR-10 for CNC). CNC runs with the detector's
                   default repair at several inversion budgets (CNC_STEPS, sharing one repair) to show how AUC
                   changes with fewer steps; the clean models calibrate the default verdict threshold.
          strong — CNC with every default (guard scan's) on the strong victims the defense benchmarks share
                   (benchmarks/victims.py, fine-tuned 3 epochs on the full poisoned training set), at the default
                   repair grain and at the defaults before (STRONG_OLD_*), with guard scan's trusted set and
                   with the detect part's: is the target flagged, and does the scan say when it cannot tell?
                   More draws of guard scan's trusted set (STRONG_SCAN_SEEDS) at the default grain show whether
                   a miss or a false alarm is one draw's luck.
                   The negative controls (STRONG_CLEAN) are the same recipe on the clean training set, two seeds,
                   scanned at the default grain: does the threshold calibrated on the detect part's clean models
                   hold for models trained like the victims?
                   Beside them, Neural Cleanse as `guard scan --method nc --opt steps=STRONG_NC_STEPS` runs it, on
                   guard scan's trusted set, on the same victims, on the controls and on clean models
                   (STRONG_NC_CLEAN: the pretrained ResNet-20 and clean models of the detect part), under the
                   paper's MAD threshold 2.
          repair — per attack (BadNets, Blend, A-Blend, A-Patch, WaNet, Refool, Adv): remaining ASR at ≤ 2 points
                   CDA loss with 1 % trusted data (v_1%, M10) for Pivotal Tuning and NC unlearning, beside Table 3's
                   "Ours" / "Neural Cleanse" columns; (CDA, ASR) every EVAL_EVERY steps (trade-off curves).
          timing — one full CNC scan at Table 5 budgets (its Pivotal Tuning, then 100 inversion steps for each
                   of the 10 classes) of a poisoned model: the wall time floor is 10 minutes on 2 CPU cores.
Models:   CIFAR ResNet-20 pretrained (data/weights/resnet20-12fca82f.th), fine-tuned (all weights) for FT_EPOCHS
          on FT_IMAGES training images — a different random subset per model — clean or poisoned at
          FT_POISON_RATE: a CPU-scale stand-in for the paper's ResNet-18 trained from scratch.
Data:     trusted = a class-stratified 1 % (500 images) of the 50k training images, disjoint from every
          fine-tuning subset; held-out = the first HELDOUT_IMAGES exact (lossless) test images (CDA budget,
          trigger scoring, ASR).
Scale:    detect/repair budgets at the top are far below Table 5's (2,000 repair steps, 100 steps per class);
          the timing part uses Table 5's.
Device:   CPU with --threads threads (2 on the reference machine), or CUDA when available. The detect and repair
          rows are guard.sweep jobs of --threads CPUs (one GPU each with CUDA) on a local Ray, --address, or
          --serial in this process; timing runs here, alone.
Output:   benchmarks/results/scan_repair_cifar10.json and .png (trade-off curves, CNC score distributions,
          reversed triggers next to the true one).
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/scan_repair_cifar10.py [--part detect] [--models 10]
          (the strong part builds missing victims first: about 6 min each on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from guard.attacks import create_attack, load_record
from guard.data import load_dataset
from guard.detect import (CNCConfig, CalibratedTriggerInversion, NeuralCleanse, NeuralCleanseConfig,
                          calibrate_threshold, save_trigger_png)
from guard.metrics import attack_success_rate, roc_auc
from guard.models import create
from guard.repair import PivotalTuning, PivotalTuningConfig, UnlearningConfig, create_defense, split_trusted
from guard.sweep import Grid
from guard.train import TrainConfig, evaluate, predict, train
from victims import (CLEAN, DEFENSE_VICTIMS, WEIGHTS, add_sweep_arguments, data_root, job_resources,  # shared
                     pick_device, run_grid, victim)

MODEL = "resnet20"
TARGET = 0
FT_IMAGES = 5000
FT_EPOCHS = 2
FT_LR = 0.01
FT_POISON_RATE = 0.05
TRUSTED_FRACTION = 0.01
HELDOUT_IMAGES = 1000
EVAL_EVERY = 50
# detect: one Pivotal Tuning per model (CNC's default repair), then trigger inversion at each budget
CNC_STEPS = (5, 15)
CNC_BATCH = 64
NC_STEPS = 5
NC_SAMPLES_PER_STEP = 256
# repair
REPAIR_STEPS = 300
# strong: the shared victims scanned with CNC's defaults, and with the defaults before (repair evaluated every 50
# steps, threshold calibrated at that grain: detect.summary.cnc_threshold_fpr10_steps5 of that run)
STRONG_ATTACKS = ("badnets", "blend", "adaptive-blend", "wanet")
STRONG_OLD_EVAL_EVERY = 50
STRONG_OLD_THRESHOLD = 0.25808249721293197
# the trusted sets: guard scan's (1 % of the training set drawn with --seed 0) and the detect part's
STRONG_SPLITS = ("scan", "detect")
# more draws of guard scan's trusted set (--seed S, split "scan-S"), scanned by the defaults only
STRONG_SCAN_SEEDS = (1, 2)
# every draw of guard scan's trusted set by split name: its --seed
SCAN_DRAWS = {"scan": 0, **{f"scan-{s}": s for s in STRONG_SCAN_SEEDS}}
# and Neural Cleanse's mask inversion at a budget a scan affords (one pass over the 500 trusted images per step)
STRONG_NC_STEPS = 50
STRONG_NC_CLEAN = ("pretrained", "clean-0", "clean-1")
# the negative controls of the strong part: the victims' recipe on the clean training set (victim(CLEAN, seed=S)),
# scanned like the victims by CNC's defaults on both trusted sets and by NC
STRONG_CLEAN = {"clean-full-0": 0, "clean-full-1": 1}
NC_REPAIR_STEPS = 15
NC_UNLEARN_STEPS = 300
# Adv: PyP's independent ImageNet model is not reachable; the pretrained CIFAR ResNet-56 stands in, pushing
# toward class 6 (frog), not the target (airplane), so that ASR is the backdoor's and not plain transfer
ADV = {"surrogate": "resnet56", "surrogate_weights": "weights/resnet56-4bfd9763.th", "adv_class": 6}
REPAIR_ATTACKS = {  # name: options; poison-label attacks at FT_POISON_RATE, the rest at their defaults
    "badnets": {"patch_size": 3}, "blend": {}, "adaptive-blend": {}, "adaptive-patch": {"patch_size": 4},
    "wanet": {}, "refool": {}, "adv": ADV,
}
# Table 3 of pick_your_poison.txt, CIFAR-10, r = 1 %: remaining ASR v_1% ("Ours", "Neural Cleanse")
PAPER_V1 = {"badnets": (0.03, 0.13), "adaptive-blend": (0.00, 0.72), "adaptive-patch": (0.00, 0.53),
            "refool": (0.03, 0.26), "wanet": (0.04, 0.28), "adv": (0.01, 0.95), "blend": (None, None)}
OUT = Path(__file__).parent / "results"
OUT_JSON = OUT / "scan_repair_cifar10.json"
PARTS = ("detect", "strong", "repair", "timing")
TRIGGER_PNG = OUT / "scan_repair_cifar10_cnc_trigger.png"


class Bench:
    """The data every part shares (the training set, held-out images, trusted split) and the victims it trains."""

    def __init__(self, root: Path, device: torch.device) -> None:
        self.root, self.device = root, device
        self.train = full = load_dataset("cifar10", root, split="train")
        self.test = load_dataset("cifar10", root, split="test-lossless").subset(range(HELDOUT_IMAGES))
        # trusted: 10 % of a random tenth of the training set (1 % of it); victims draw from the other 90 %
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(full), generator=g)
        tenth = len(full) // 10
        self.trusted = split_trusted(full.subset(order[:tenth]), TRUSTED_FRACTION * 10, g)
        self.pool = full.subset(order[tenth:])

    def trusted_split(self, split: str):
        """The trusted set of a strong row: the detect part's (``detect``) or guard scan's, 1 % of the training set
        drawn with the --seed of SCAN_DRAWS (``scan``: 0, ``scan-S``: S)."""
        if split == "detect":
            return self.trusted
        return split_trusted(self.train, TRUSTED_FRACTION, torch.Generator().manual_seed(SCAN_DRAWS[split]))

    def shared_victim(self, name: str):
        """(victim record, model on the bench's device, attack) of the shared strong victim of attack ``name``, or
        of the clean control ``name`` of STRONG_CLEAN (attack ``None``)."""
        if name in STRONG_CLEAN:
            built, attack = victim(CLEAN, progress=False, seed=STRONG_CLEAN[name]), None
        else:
            built = victim(name, progress=False, **DEFENSE_VICTIMS[name])
            attack = load_record(built.record)
        return built, create(MODEL, weights=built.weights).to(self.device), attack

    def victim(self, seed: int, attack=None) -> torch.nn.Module:
        """The pretrained ResNet-20 fine-tuned on its own random FT_IMAGES-image subset (poisoned by ``attack``)."""
        g = torch.Generator().manual_seed(seed)
        data = self.pool.subset(torch.randperm(len(self.pool), generator=g)[:FT_IMAGES])
        if attack is not None:
            data = attack.poison(data, g).dataset
        model = create(MODEL, weights=self.root / WEIGHTS).to(self.device)
        train(model, data, TrainConfig.finetune(epochs=FT_EPOCHS, lr=FT_LR, weight_decay=5e-4), generator=g,
              device=self.device, progress=False)
        return model

    def asr_probe(self, attack):
        triggered = attack.triggered(self.test)
        return lambda m: attack_success_rate(predict(m, triggered, device=self.device), triggered.labels,
                                             attack.config.target)


def poisoning_attack(name: str, **options):
    """``name`` with target class TARGET poisoning FT_POISON_RATE of a victim's fine-tuning set (clean-label
    attacks: that many target-class images, half of the class)."""
    return create_attack(name, target=TARGET, budget=FT_POISON_RATE, **options)


def detect_job(i: int, poisoned: bool) -> dict:
    """One detect row, run by the sweep (guard.sweep; a Ray task or the serial loop): victim ``i`` (BadNets or
    clean), CNC at each inversion budget over one shared repair, and NC."""
    bench = Bench(data_root(), pick_device("auto"))
    attack = poisoning_attack("badnets", patch_size=3)
    probe = bench.asr_probe(attack)
    nc = NeuralCleanseConfig(steps=NC_STEPS, samples_per_step=NC_SAMPLES_PER_STEP)
    name = f"{'badnets' if poisoned else 'clean'}-{i}"
    started = time.perf_counter()
    model = bench.victim(1000 + i, attack if poisoned else None)
    row = {"name": name, "poisoned": poisoned, "victim_seconds": round(time.perf_counter() - started, 1),
           "cda": evaluate(model, bench.test, device=bench.device), "asr": probe(model), "cnc": {}}
    repaired = None
    for steps in CNC_STEPS:
        config = CNCConfig(steps_per_class=steps, batch_size=CNC_BATCH)
        started = time.perf_counter()
        scan = CalibratedTriggerInversion(config).scan(model, bench.trusted, bench.test, reference=repaired,
                                                       generator=torch.Generator().manual_seed(i),
                                                       device=bench.device)
        d = scan.report.details
        paper = {c: d["pivot_success"][str(c)] - d["repaired_accuracy"][str(c)] for c in scan.report.scores}
        row["cnc"][str(steps)] = {
            "seconds": round(time.perf_counter() - started, 1), "max_score": scan.report.max_score,
            "max_score_paper": max(paper.values()), "top_class": max(scan.report.scores, key=scan.report.scores.get),
            "scores": {str(c): v for c, v in scan.report.scores.items()}}
        if repaired is None:
            repaired, record = scan.reference, scan.report.details["repair"]
            row["repair"] = {"steps": record["chosen"]["step"], "cda": record["chosen"]["cda"],
                             "asr": probe(repaired), "seconds": round(record["seconds"], 1)}
    started = time.perf_counter()
    nc_scan = NeuralCleanse(nc).scan(model, bench.trusted, bench.test,
                                     generator=torch.Generator().manual_seed(i), device=bench.device)
    row["nc"] = {"seconds": round(time.perf_counter() - started, 1),
                 "anomaly_index": nc_scan.report.separation, "flagged_class": nc_scan.report.flagged_class}
    return row


def finished_jobs(part: str, function: str, points: list[dict], args):
    """The part's jobs (``function`` of this file at each of ``points``) run by guard.sweep, as they finish; a
    failed job is printed and skipped."""
    grid = Grid(name=part, function=f"{Path(__file__).resolve()}:{function}", points=points,
                resources=job_resources(args.threads, pick_device("auto")))
    for finished in run_grid(grid, args):
        if not finished.ok:
            print(f"FAILED {part} {finished.job.params}: {finished.record['error']}", flush=True)
            continue
        yield finished


def detect(args, results: dict, save) -> None:
    rows = results.setdefault("detect", {"models": []})["models"]
    done = {row["name"] for row in rows}
    points = [{"i": i, "poisoned": poisoned} for i in range(args.models) for poisoned in (True, False)
              if f"{'badnets' if poisoned else 'clean'}-{i}" not in done]
    for finished in finished_jobs("detect", "detect_job", points, args):
        row = finished.result
        rows.append(row)
        cnc_text = ", ".join(f"N={s}: {row['cnc'][str(s)]['max_score']:.3f} (class "
                             f"{row['cnc'][str(s)]['top_class']})" for s in CNC_STEPS)
        print(f"{row['name']}: CDA {row['cda']:.3f} ASR {row['asr']:.3f} | CNC {cnc_text} | NC index "
              f"{row['nc']['anomaly_index']:.2f} (class {row['nc']['flagged_class']})", flush=True)
        save("detect")
    bad = [r for r in rows if r["poisoned"]]
    clean = [r for r in rows if not r["poisoned"]]
    if bad and clean:
        labels = torch.tensor([True] * len(bad) + [False] * len(clean))
        auc = lambda values: roc_auc(torch.tensor(values, dtype=torch.float64), labels)  # noqa: E731
        summary = {"models_per_group": [len(bad), len(clean)],
                   "paper_cnc_auc_cifar10": "0.65-0.76 (Table 2, BadNets m = 50: 0.76)",
                   "nc_auc": auc([r["nc"]["anomaly_index"] for r in bad + clean])}
        for steps in CNC_STEPS:
            summary[f"cnc_auc_steps{steps}"] = auc([r["cnc"][str(steps)]["max_score"] for r in bad + clean])
            summary[f"cnc_auc_paper_form_steps{steps}"] = auc([r["cnc"][str(steps)]["max_score_paper"]
                                                               for r in bad + clean])
            summary[f"cnc_top_class_is_target_steps{steps}"] = sum(r["cnc"][str(steps)]["top_class"] == TARGET
                                                                   for r in bad) / len(bad)
            # the verdict threshold calibrated on the clean models (10 % false positives) and its detection rate
            threshold = calibrate_threshold([r["cnc"][str(steps)]["max_score"] for r in clean], 0.1)
            summary[f"cnc_threshold_fpr10_steps{steps}"] = threshold
            summary[f"cnc_tpr_at_threshold_steps{steps}"] = sum(r["cnc"][str(steps)]["max_score"] > threshold
                                                                for r in bad) / len(bad)
        summary["nc_flags_target"] = sum(r["nc"]["flagged_class"] == TARGET for r in bad) / len(bad)
        results["detect"]["summary"] = summary
        save()
        print(json.dumps(summary, indent=2), flush=True)


def target_rank(scores: dict[int, float], target: int) -> int:
    """The target's rank among the class scores, ties counted against it (all scores 0: last)."""
    return 1 + sum(score >= scores[target] for c, score in scores.items() if c != target)


def strong_job(name: str, eval_every: int, split: str) -> dict:
    """One strong row, run by the sweep: the shared victim of attack ``name`` (or the clean control ``name`` of
    STRONG_CLEAN) scanned by CNC with its defaults but the repair's evaluation grain ``eval_every`` (and, at
    STRONG_OLD_EVAL_EVERY, the threshold calibrated there), on the trusted set ``split`` (Bench.trusted_split)."""
    bench = Bench(data_root(), pick_device("auto"))
    trusted = bench.trusted_split(split)
    built, model, attack = bench.shared_victim(name)
    defaults = CNCConfig()
    config = defaults if eval_every == defaults.repair.eval_every else dataclasses.replace(
        defaults, repair=dataclasses.replace(defaults.repair, eval_every=eval_every), threshold=STRONG_OLD_THRESHOLD)
    started = time.perf_counter()
    scan = CalibratedTriggerInversion(config).scan(model, trusted, bench.test,
                                                   generator=torch.Generator().manual_seed(0), device=bench.device)
    seconds = time.perf_counter() - started
    report, record = scan.report, scan.report.details["repair"]
    target = None if attack is None else attack.config.target
    probe = (lambda m: None) if attack is None else bench.asr_probe(attack)
    return {"attack": name, "eval_every": eval_every, "split": split,
            "default_grain": eval_every == defaults.repair.eval_every,
            "target": target, "victim_cda": built.cda, "victim_asr": probe(model),
            "repair_step": record["chosen"]["step"], "repair_cda": record["chosen"]["cda"],
            "repaired_asr": probe(scan.reference), "scores": {str(c): v for c, v in report.scores.items()},
            "top_class": report.details["top_class"], "max_score": report.max_score, "threshold": report.threshold,
            "separation": report.separation, "backdoored": report.backdoored, "flagged_class": report.flagged_class,
            "target_rank": None if target is None else target_rank(report.scores, target),
            "summary": report.summary, "seconds": round(seconds, 1)}


def strong_nc_job(name: str) -> dict:
    """One NC row of the strong part, run by the sweep: ``name`` (a shared victim of STRONG_ATTACKS, a clean
    control of STRONG_CLEAN, or a clean model of STRONG_NC_CLEAN) scanned by Neural Cleanse at STRONG_NC_STEPS on
    guard scan's trusted set."""
    bench = Bench(data_root(), pick_device("auto"))
    target = None
    if name in STRONG_ATTACKS or name in STRONG_CLEAN:
        _, model, attack = bench.shared_victim(name)
        target = None if attack is None else attack.config.target
    elif name == "pretrained":
        model = create(MODEL, weights=bench.root / WEIGHTS).to(bench.device)
    else:  # clean-i: the detect part's clean model i
        model = bench.victim(1000 + int(name.removeprefix("clean-")))
    started = time.perf_counter()
    scan = NeuralCleanse(NeuralCleanseConfig(steps=STRONG_NC_STEPS)).scan(
        model, bench.trusted_split("scan"), bench.test, generator=torch.Generator().manual_seed(0),
        device=bench.device)
    report = scan.report
    return {"model": name, "target": target, "l1_norms": report.details["l1_norms"],
            "anomaly_index": report.separation, "backdoored": report.backdoored,
            "flagged_class": report.flagged_class,
            "target_rank": None if target is None else target_rank(report.scores, target),
            "summary": report.summary, "seconds": round(time.perf_counter() - started, 1)}


def strong(args, results: dict, save) -> None:
    rows = results.setdefault("strong", {"rows": []})["rows"]
    done = {(row["attack"], row["eval_every"], row["split"]) for row in rows}
    nc_rows = results["strong"].setdefault("nc", {})
    grains = (CNCConfig().repair.eval_every, STRONG_OLD_EVAL_EVERY)
    scans = [(a, e) for a in STRONG_ATTACKS for e in grains] + [(c, grains[0]) for c in STRONG_CLEAN]
    draws = tuple(t for t in SCAN_DRAWS if t not in STRONG_SPLITS)
    points = [{"name": n, "eval_every": e, "split": t} for t in STRONG_SPLITS for n, e in scans]
    points += [{"name": n, "eval_every": grains[0], "split": t} for t in draws
               for n in (*STRONG_ATTACKS, *STRONG_CLEAN)]
    points = [p for p in points if (p["name"], p["eval_every"], p["split"]) not in done]
    nc_points = [{"name": n} for n in (*STRONG_ATTACKS, *STRONG_CLEAN, *STRONG_NC_CLEAN) if n not in nc_rows]
    needed = {p["name"] for p in points + nc_points}
    for name in needed & set(STRONG_ATTACKS):  # build missing models once, before the jobs that share them
        victim(name, **DEFENSE_VICTIMS[name])
    for name in needed & set(STRONG_CLEAN):
        victim(CLEAN, seed=STRONG_CLEAN[name])
    for finished in finished_jobs("strong", "strong_job", points, args):
        row = finished.result
        rows.append(row)
        asr = "" if row["target"] is None else f" ASR {row['victim_asr']:.3f} -> {row['repaired_asr']:.3f}"
        print(f"{row['attack']} ({row['split']} split, repair every {row['eval_every']}): repair step "
              f"{row['repair_step']} CDA {row['repair_cda']:.3f}{asr} | target rank "
              f"{row['target_rank']}, max {row['max_score']:.3f} (class {row['top_class']}) | {row['summary']}",
              flush=True)
        save("strong")
    for finished in finished_jobs("strong", "strong_nc_job", nc_points, args):
        row = nc_rows[finished.result["model"]] = finished.result
        print(f"NC {row['model']} (scan split, {STRONG_NC_STEPS} steps, {row['seconds']:.0f}s): {row['summary']}",
              flush=True)
        save("strong")
    summary = results["strong"]["summary"] = {}
    for grain in ("default", "old"):
        for split in STRONG_SPLITS + draws:
            picked = [r for r in rows if r["default_grain"] == (grain == "default") and r["split"] == split]
            if not picked:
                continue
            clean = [r for r in picked if r["target"] is None]
            picked = [r for r in picked if r["target"] is not None]
            summary[f"{grain}_{split}"] = {
                "victims": len(picked), "target_flagged": sum(r["flagged_class"] == r["target"] for r in picked),
                "target_ranked_first": sum(r["target_rank"] == 1 for r in picked),
                "wrong_class_flagged": sum(r["flagged_class"] not in (None, r["target"]) for r in picked),
                "victim_kept": sum(r["repair_step"] == 0 for r in picked),
                **({"clean_models": len(clean), "clean_flagged": sum(r["backdoored"] for r in clean),
                    "clean_max_score": max(r["max_score"] for r in clean)} if clean else {})}
    picked = [r for r in rows if r["default_grain"] and r["split"] in SCAN_DRAWS]
    clean = [r for r in picked if r["target"] is None]
    summary["default_scan_draws"] = {  # every draw of guard scan's trusted set, per victim and for the controls
        "seeds": list(SCAN_DRAWS.values()),
        "target_flagged": {a: sum(r["flagged_class"] == r["target"] for r in picked if r["attack"] == a)
                           for a in STRONG_ATTACKS},
        "clean_scans": len(clean), "clean_flagged": sum(r["backdoored"] for r in clean),
        "clean_max_score": max((r["max_score"] for r in clean), default=None)}
    victims = [r for r in nc_rows.values() if r["target"] is not None]
    clean = [r for r in nc_rows.values() if r["target"] is None]
    summary["nc_scan"] = {"steps": STRONG_NC_STEPS, "victims": len(victims),
                          "target_flagged": sum(r["flagged_class"] == r["target"] for r in victims),
                          "target_ranked_first": sum(r["target_rank"] == 1 for r in victims),
                          "clean_models": len(clean), "clean_flagged": sum(r["backdoored"] for r in clean)}
    save()


def repair_job(j: int, name: str) -> dict:
    """One repair row, run by the sweep: the victim of attack ``name`` repaired by Pivotal Tuning and NC."""
    bench = Bench(data_root(), pick_device("auto"))
    pivotal = PivotalTuningConfig(steps=REPAIR_STEPS, eval_every=EVAL_EVERY)
    nc = UnlearningConfig(scan=NeuralCleanseConfig(steps=NC_REPAIR_STEPS, samples_per_step=NC_SAMPLES_PER_STEP),
                          steps=NC_UNLEARN_STEPS, eval_every=EVAL_EVERY)
    options = REPAIR_ATTACKS[name]
    if "surrogate_weights" in options:
        options = {**options, "surrogate_weights": str(bench.root / options["surrogate_weights"])}
    attack = poisoning_attack(name, **options)
    probe = bench.asr_probe(attack)
    model = bench.victim(2000 + j, attack)
    row = {"cda": evaluate(model, bench.test, device=bench.device), "asr": probe(model),
           "paper_v1_ours_nc": PAPER_V1[name]}
    started = time.perf_counter()
    pt = PivotalTuning(pivotal).defend(model, bench.trusted, eval_set=bench.test, asr=probe,
                                       generator=torch.Generator().manual_seed(1), device=bench.device)
    row["pivotal"] = {**pt.to_dict(), "v_1": pt.chosen.asr, "wall_seconds": round(time.perf_counter() - started, 1)}
    started = time.perf_counter()
    nr = create_defense("nc", config=nc).defend(model, bench.trusted, eval_set=bench.test, asr=probe,
                                                generator=torch.Generator().manual_seed(1), device=bench.device)
    row["nc"] = {**nr.to_dict(), "v_1": nr.chosen.asr, "flagged_class": nr.details["scan"]["flagged_class"],
                 "wall_seconds": round(time.perf_counter() - started, 1)}
    return row


def repair_part(args, results: dict, save) -> None:
    rows = results.setdefault("repair", {})
    points = [{"j": j, "name": n} for j, n in enumerate(REPAIR_ATTACKS) if n not in rows]
    for finished in finished_jobs("repair", "repair_job", points, args):
        name = finished.job.params["name"]
        row = rows[name] = finished.result
        print(f"{name}: CDA {row['cda']:.3f} ASR {row['asr']:.3f} -> Pivotal v_1% {row['pivotal']['v_1']:.3f} "
              f"(CDA {row['pivotal']['chosen']['cda']:.3f}), NC v_1% {row['nc']['v_1']:.3f} (CDA "
              f"{row['nc']['chosen']['cda']:.3f}); paper {PAPER_V1[name]}", flush=True)
        save("repair")


def timing(bench: Bench, results: dict, save) -> None:
    attack = poisoning_attack("badnets", patch_size=3)
    model = bench.victim(1000, attack)
    started = time.perf_counter()
    scan = CalibratedTriggerInversion(CNCConfig.table5()).scan(model, bench.trusted, bench.test,
                                                        generator=torch.Generator().manual_seed(0),
                                                        device=bench.device)
    seconds = time.perf_counter() - started
    save_trigger_png(scan.trigger_image(TARGET), TRIGGER_PNG, scale=1)
    record = scan.report.details["repair"]
    results["timing"] = {"cnc_full_scan_seconds": round(seconds, 1), "repair_seconds": round(record["seconds"], 1),
                         "repair_steps": record["chosen"]["step"], "stopped_early": record["stopped_early"],
                         "inversion_steps_per_class": CNCConfig.table5().steps_per_class,
                         "threads": torch.get_num_threads(),
                         "max_score": scan.report.max_score, "flagged_class": scan.report.flagged_class,
                         "target_score": scan.report.scores[TARGET], "floor_seconds": 600}
    save("timing")
    print(f"full CNC scan: {seconds:.0f} s (repair {record['seconds']:.0f} s, stopped at step "
          f"{record['chosen']['step']}); target score {scan.report.scores[TARGET]:.3f}, max "
          f"{scan.report.max_score:.3f}", flush=True)


def plot(results: dict, bench: Bench) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8), gridspec_kw={"width_ratios": [2, 2, 1, 1]})
    ax = axes[0]
    for name, row in results.get("repair", {}).items():
        pt, nr = row["pivotal"]["history"], row["nc"]["history"]
        line, = ax.plot([p["asr"] for p in pt], [100 * p["cda"] for p in pt], "o-", ms=3, label=f"{name} Pivotal")
        ax.plot([p["asr"] for p in nr], [100 * p["cda"] for p in nr], "x--", ms=3, color=line.get_color(),
                label=f"{name} NC")
    ax.set_xlabel("ASR")
    ax.set_ylabel("CDA (%)")
    ax.set_title("repair trade-off, r = 1 % (o Pivotal Tuning, x NC unlearning)", fontsize=8)
    ax.legend(fontsize=5, ncol=2)
    ax = axes[1]
    rows = results.get("detect", {}).get("models", [])
    for k, steps in enumerate(CNC_STEPS):
        for poisoned, marker in ((True, "o"), (False, "x")):
            values = [r["cnc"][str(steps)]["max_score"] for r in rows if r["poisoned"] == poisoned]
            ax.scatter([k + (0.1 if poisoned else -0.1)] * len(values), values, marker=marker,
                       color="C3" if poisoned else "C0", label=("BadNets" if poisoned else "clean") if k == 0 else None)
    values = {p: [r["nc"]["anomaly_index"] / 10 for r in rows if r["poisoned"] == p] for p in (True, False)}
    for poisoned, marker in ((True, "o"), (False, "x")):
        ax.scatter([len(CNC_STEPS) + (0.1 if poisoned else -0.1)] * len(values[poisoned]), values[poisoned],
                   marker=marker, color="C3" if poisoned else "C0")
    ticks = [f"CNC N={s}" for s in CNC_STEPS] + ["NC index / 10"]
    strong_rows = [r for r in results.get("strong", {}).get("rows", []) if r["default_grain"]]
    if strong_rows:  # the shared strong victims under guard scan's defaults: the target's score, labelled
        x = len(ticks)
        for r in strong_rows:  # * guard scan's trusted sets (seed 0 labelled), + the detect part's; controls: max
            scan_split, clean = r["split"] in SCAN_DRAWS, r["target"] is None
            score = r["max_score"] if clean else r["scores"][str(r["target"])]
            ax.scatter([x + (0 if scan_split else 0.15)], [score], marker="*" if scan_split else "+",
                       color="C0" if clean else "C3")
            if r["split"] == "scan":
                ax.annotate(r["attack"], (x, score), fontsize=5, xytext=(-4, 0), textcoords="offset points",
                            ha="right")
        ax.hlines(strong_rows[0]["threshold"], -0.3, x + 0.3, color="grey", ls="--", lw=0.8,
                  label="default threshold (N=5)")
        ticks.append("strong victims: target (red),\nclean controls: max (blue)\n(* scan's draws, + detect's trusted)")
    ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
    ax.set_title("detection scores per model", fontsize=8)
    ax.legend(fontsize=7)
    attack = poisoning_attack("badnets", patch_size=3)
    true = attack.apply_trigger(torch.zeros(1, *bench.test.images.shape[1:]))[0]
    panels = [("true trigger", true)]
    if TRIGGER_PNG.is_file():
        reversed_trigger = torch.from_numpy(np.array(Image.open(TRIGGER_PNG))).permute(2, 0, 1).float() / 255
        panels.append((f"CNC reversed, full scan (class {TARGET})", reversed_trigger))
    for ax, (title, image) in zip(axes[2:], panels):
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    for ax in axes[2 + len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{results['what']} — {results['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "scan_repair_cifar10.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", choices=PARTS,
                        help="run only these parts (repeatable; default: all); the others keep their results")
    parser.add_argument("--models", type=int, default=10, help="clean and poisoned models each for detect")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="discard previous results of the parts run")
    add_sweep_arguments(parser)
    args = parser.parse_args()
    parts = args.part or list(PARTS)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = Bench(data_root(), device)
    OUT.mkdir(parents=True, exist_ok=True)
    results = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
    if args.fresh:
        for part in parts:
            results.pop(part, None)
    results.update({
        "what": "CNC / NC detection and Pivotal Tuning / NC repair, CIFAR-10 ResNet-20 (CPU scale)",
        "device": str(device), "torch": torch.__version__, "platform": platform.platform(),
        "params": {"ft_images": FT_IMAGES, "ft_epochs": FT_EPOCHS, "ft_lr": FT_LR, "poison_rate": FT_POISON_RATE,
                   "trusted_images": len(bench.trusted), "heldout_images": HELDOUT_IMAGES, "eval_every": EVAL_EVERY,
                   "detect_repair": dataclasses.asdict(CNCConfig().repair), "cnc_steps": CNC_STEPS,
                   "cnc_batch": CNC_BATCH,
                   "nc_steps": NC_STEPS, "nc_samples_per_step": NC_SAMPLES_PER_STEP, "repair_steps": REPAIR_STEPS,
                   "nc_repair_steps": NC_REPAIR_STEPS, "nc_unlearn_steps": NC_UNLEARN_STEPS,
                   "strong_nc_steps": STRONG_NC_STEPS}})

    def save(ran: str | None = None) -> None:
        """Write this run's parts into the JSON, keeping the parts another run (maybe running now) wrote; ``ran``:
        the part that just measured a row, with --threads threads."""
        with open(OUT / ".scan_repair_cifar10.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
            current.update({k: v for k, v in results.items() if k not in PARTS or k in parts})
            if ran is not None:
                current.setdefault("threads_per_part", {})[ran] = args.threads
            OUT_JSON.write_text(json.dumps(current, indent=2, allow_nan=False))
            results.update({k: v for k, v in current.items() if k not in parts})

    if "detect" in parts:
        detect(args, results, save)
    if "strong" in parts:
        strong(args, results, save)
    if "repair" in parts:
        repair_part(args, results, save)
    if "timing" in parts:
        timing(bench, results, save)
    save()
    plot(results, bench)


if __name__ == "__main__":
    main()
