"""Scan and repair on real CIFAR-10: CNC and Neural Cleanse detection, Pivotal Tuning and NC repair.

What:     (a) detection scores of CNC (max calibrated class score) and NC (MAD anomaly index) on clean and
          BadNets-poisoned ResNet-20s, ROC AUC when both groups hold several models (M9; Table 2 of
          pick_your_poison.txt reports 0.65–0.76 on CIFAR-10 for CNC); (b) repair with 1 % trusted data:
          remaining ASR at ≤ 2 points CDA loss (v_1%, M10) for Pivotal Tuning and NC unlearning, next to
          Table 3's "Ours" / "Neural Cleanse" columns; (c) wall time of a full CNC scan (its repair plus
          trigger inversion for every class) and of each repair.
Models:   CIFAR ResNet-20 pretrained (data/weights/resnet20-12fca82f.th), fine-tuned for FT_EPOCHS on
          FT_IMAGES training images — clean, or with BadNets (3×3 checkerboard, bottom-right, target 0) at
          FT_POISON_RATE — a CPU-scale stand-in for the paper's ResNet-18 trained from scratch.
Data:     trusted = a class-stratified TRUSTED_FRACTION of the 50k training images outside the fine-tuning
          set; held-out = the first HELDOUT_IMAGES exact (lossless) test images (CDA budget, trigger
          scoring, ASR).
Scale:    CPU-scale budgets at the top (REPAIR_STEPS, CNC_STEPS_PER_CLASS, NC_*) are far below Table 5's
          (2,000 repair steps, 100 steps per class); --full uses Table 5's.
Device:   CPU with TORCH_THREADS threads (2 on the reference machine), or CUDA when available.
Output:   benchmarks/results/scan_repair_cifar10.json (rewritten after every stage) and .png (trade-off
          curves, reversed triggers next to the true one).
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/scan_repair_cifar10.py [--models N] [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from guard.attacks import create_attack
from guard.data import load_dataset
from guard.detect import (CNCConfig, CalibratedTriggerInversion, NeuralCleanse, NeuralCleanseConfig)
from guard.metrics import attack_success_rate, roc_auc
from guard.models import create
from guard.repair import PivotalTuning, PivotalTuningConfig, split_trusted
from guard.train import TrainConfig, evaluate, predict, train

MODEL = "resnet20"
WEIGHTS = "weights/resnet20-12fca82f.th"
TARGET = 0
FT_IMAGES = 8000
FT_EPOCHS = 2
FT_LR = 0.01
FT_POISON_RATE = 0.05
TRUSTED_FRACTION = 0.01
HELDOUT_IMAGES = 1000
REPAIR_STEPS = 300
EVAL_EVERY = 50
CNC_STEPS_PER_CLASS = 40
CNC_BATCH = 128
NC_STEPS = 15
NC_SAMPLES_PER_STEP = 256
NC_UNLEARN_STEPS = 300
TORCH_THREADS = 2
OUT = Path(__file__).parent / "results"
# Table 3 of pick_your_poison.txt, CIFAR-10, r = 1 %: remaining ASR v_1% ("Ours", "Neural Cleanse")
PAPER_V1 = {"badnets": {"pivotal": 0.03, "nc": 0.13}}


def victim(poisoned: bool, seed: int, train_set, attack, device) -> torch.nn.Module:
    """The pretrained ResNet-20 fine-tuned on FT_IMAGES images, with BadNets poisons when ``poisoned``."""
    g = torch.Generator().manual_seed(seed)
    data = train_set
    if poisoned:
        data = attack.poison(train_set, g).dataset
    model = create(MODEL, weights=Path(os.environ["GUARD_DATA_DIR"]) / WEIGHTS).to(device)
    train(model, data, TrainConfig.finetune(epochs=FT_EPOCHS, lr=FT_LR, weight_decay=5e-4), generator=g,
          device=device, progress=False)
    return model


def asr_probe(triggered, device):
    return lambda m: attack_success_rate(predict(m, triggered, device=device), triggered.labels, TARGET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1, help="clean and poisoned models each (AUC needs >= 2)")
    parser.add_argument("--full", action="store_true", help="Table 5 budgets instead of the CPU-scale ones")
    parser.add_argument("--skip-nc", action="store_true", help="CNC and Pivotal Tuning only")
    args = parser.parse_args()
    torch.set_num_threads(TORCH_THREADS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repair_steps, cnc_steps = (2000, 100) if args.full else (REPAIR_STEPS, CNC_STEPS_PER_CLASS)
    nc_steps, nc_samples = (1000, 1000) if args.full else (NC_STEPS, NC_SAMPLES_PER_STEP)
    unlearn_steps = 1000 if args.full else NC_UNLEARN_STEPS

    root = Path(os.environ.get("GUARD_DATA_DIR", "../shared/data"))
    full_train = load_dataset("cifar10", root, split="train")
    test = load_dataset("cifar10", root, split="test-lossless").subset(range(HELDOUT_IMAGES))
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(full_train), generator=g)
    ft_set = full_train.subset(order[:FT_IMAGES])
    trusted = split_trusted(full_train.subset(order[FT_IMAGES:]), TRUSTED_FRACTION * len(full_train)
                            / (len(full_train) - FT_IMAGES), g)
    attack = create_attack("badnets", target=TARGET, budget=FT_POISON_RATE, patch_size=3)
    triggered = attack.triggered(test)
    probe = asr_probe(triggered, device)

    pivotal = PivotalTuningConfig(steps=repair_steps, eval_every=EVAL_EVERY)
    cnc = CNCConfig(steps_per_class=cnc_steps, batch_size=CNC_BATCH, repair=pivotal)
    nc = NeuralCleanseConfig(steps=nc_steps, samples_per_step=nc_samples, unlearn_steps=unlearn_steps,
                             eval_every=EVAL_EVERY)
    results: dict = {
        "what": "CNC / NC detection and Pivotal Tuning / NC repair, CIFAR-10 ResNet-20 (CPU scale)",
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "platform": platform.platform(), "processor": platform.processor(),
        "params": {"ft_images": FT_IMAGES, "ft_epochs": FT_EPOCHS, "ft_lr": FT_LR, "poison_rate": FT_POISON_RATE,
                   "trusted_images": len(trusted), "heldout_images": HELDOUT_IMAGES, "repair_steps": repair_steps,
                   "eval_every": EVAL_EVERY, "cnc_steps_per_class": cnc_steps, "cnc_batch": CNC_BATCH,
                   "nc_steps": nc_steps, "nc_samples_per_step": nc_samples, "nc_unlearn_steps": unlearn_steps,
                   "models_per_group": args.models},
        "models": [],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    out_json = OUT / "scan_repair_cifar10.json"

    def save() -> None:
        out_json.write_text(json.dumps(results, indent=2, allow_nan=False))

    figures = {}
    for i in range(args.models):
        for poisoned in (True, False):
            name = f"{'badnets' if poisoned else 'clean'}-{i}"
            started = time.perf_counter()
            model = victim(poisoned, 100 + i, ft_set, attack, device)
            entry = {"name": name, "poisoned": poisoned, "victim_seconds": round(time.perf_counter() - started, 1),
                     "cda": evaluate(model, test, device=device), "asr": probe(model)}
            print(f"{name}: CDA {entry['cda']:.4f} ASR {entry['asr']:.3f}", flush=True)
            started = time.perf_counter()
            scan = CalibratedTriggerInversion(cnc).scan(model, trusted, test, device=device,
                                                        generator=torch.Generator().manual_seed(i))
            entry["cnc"] = {"seconds": round(time.perf_counter() - started, 1),
                            "repair_seconds": round(scan.repair.seconds, 1), "max_score": scan.report.max_score,
                            "flagged_class": scan.report.flagged_class, "scores": scan.report.scores,
                            "pivot_success": scan.report.details["pivot_success"],
                            "repaired_success": scan.report.details["repaired_success"],
                            "repaired_accuracy": scan.report.details["repaired_accuracy"],
                            "repair_cda": scan.repair.chosen.cda, "repaired_asr": probe(scan.repaired)}
            print(f"  CNC scan {entry['cnc']['seconds']}s: max score {scan.report.max_score:.3f} "
                  f"(class {max(scan.report.scores, key=scan.report.scores.get)}), repaired ASR "
                  f"{entry['cnc']['repaired_asr']:.3f}", flush=True)
            if poisoned and i == 0:
                figures["cnc_triggers"] = scan.triggers
            results["models"].append(entry)
            save()
            if not args.skip_nc:
                started = time.perf_counter()
                nc_scan = NeuralCleanse(nc).scan(model, trusted, generator=torch.Generator().manual_seed(i),
                                                 device=device)
                entry["nc"] = {"seconds": round(time.perf_counter() - started, 1),
                               "model_anomaly_index": nc_scan.mad.model_index,
                               "flagged_class": nc_scan.report.flagged_class,
                               "l1_norms": {str(c): n for c, n in nc_scan.l1_norms.items() if n != float("inf")}}
                print(f"  NC scan {entry['nc']['seconds']}s: anomaly index {nc_scan.mad.model_index:.2f}, flagged "
                      f"{nc_scan.report.flagged_class}", flush=True)
                if poisoned and i == 0:
                    figures["nc_scan"] = nc_scan
                save()
            if poisoned and i == 0:  # repair comparison on the first poisoned model, ASR recorded every step
                started = time.perf_counter()
                pt = PivotalTuning(pivotal).repair(model, trusted, eval_set=test, asr=probe,
                                                   generator=torch.Generator().manual_seed(1), device=device)
                entry["pivotal_repair"] = {**pt.to_dict(), "v_r": pt.chosen.asr,
                                           "wall_seconds": round(time.perf_counter() - started, 1)}
                print(f"  Pivotal Tuning: v_1% = {pt.chosen.asr:.3f} (CDA {pt.cda0:.4f} -> {pt.chosen.cda:.4f})",
                      flush=True)
                figures["pivotal"] = pt
                if not args.skip_nc:
                    started = time.perf_counter()
                    nr = NeuralCleanse(nc).repair(model, trusted, figures["nc_scan"], eval_set=test, asr=probe,
                                                  generator=torch.Generator().manual_seed(1), device=device)
                    entry["nc_repair"] = {**nr.to_dict(), "v_r": nr.chosen.asr,
                                          "wall_seconds": round(time.perf_counter() - started, 1)}
                    print(f"  NC unlearning: v_1% = {nr.chosen.asr:.3f}", flush=True)
                    figures["nc"] = nr
                save()

    clean = [m for m in results["models"] if not m["poisoned"]]
    bad = [m for m in results["models"] if m["poisoned"]]
    summary = {"cnc_scan_seconds_median": sorted(m["cnc"]["seconds"] for m in results["models"])[
        len(results["models"]) // 2], "paper_v1": PAPER_V1}
    if len(clean) >= 1 and len(bad) >= 1:
        scores = [m["cnc"]["max_score"] for m in bad + clean]
        positive = [True] * len(bad) + [False] * len(clean)
        summary["cnc_auc"] = roc_auc(torch.tensor(scores), torch.tensor(positive))
        if not args.skip_nc:
            summary["nc_auc"] = roc_auc(torch.tensor([m["nc"]["model_anomaly_index"] for m in bad + clean]),
                                        torch.tensor(positive))
    results["summary"] = summary
    save()
    plot(figures, attack, test, results)
    print(json.dumps(summary, indent=2))


def plot(figures: dict, attack, test, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), gridspec_kw={"width_ratios": [2, 1, 1, 1]})
    ax = axes[0]
    for key, label in (("pivotal", "Pivotal Tuning"), ("nc", "NC unlearning")):
        if key in figures:
            h = figures[key].history
            ax.plot([p.asr for p in h], [100 * p.cda for p in h], "o-", ms=3, label=label)
    if "pivotal" in figures:
        ax.axhline(100 * (figures["pivotal"].cda0 - 0.02), color="grey", ls="--", label="CDA budget (−2)")
    ax.set_xlabel("ASR")
    ax.set_ylabel("CDA (%)")
    ax.set_title("repair trade-off (BadNets, r = 1 %)", fontsize=9)
    ax.legend(fontsize=7)
    true = attack.apply_trigger(torch.zeros(1, *test.images.shape[1:]))[0]
    panels = [("true trigger", true)]
    if "cnc_triggers" in figures:
        t = figures["cnc_triggers"][TARGET]
        panels.append((f"CNC reversed (class {TARGET})", (t - t.min()) / (t.max() - t.min() + 1e-12)))
    if "nc_scan" in figures and figures["nc_scan"].masks.get(TARGET) is not None:
        panels.append((f"NC reversed (class {TARGET})", figures["nc_scan"].trigger_image(TARGET)))
    for ax, (title, image) in zip(axes[1:], panels):
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    for ax in axes[1 + len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{results['what']} — {results['device']}, {results['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "scan_repair_cifar10.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
