"""Per-request backdoor detection on strong CIFAR-10 victims: every input detector and guard's own score.

What:     per attack (--attacks) the strong victim from the shared cache (benchmarks/victims.py: the pretrained
          ResNet-20 fine-tuned on the full poisoned training set) and every input detector of
          guard.detect.list_input_detectors() (--detectors) at its defaults (guard's ``rescaler``: every residual stage
          and the penultimate layer), plus its other forms (VARIANTS: ``penultimate`` alone, ReScaler's ``drop``, the
          largest layer, one or five amplified copies joined). The 1000 lossless test images (exact pixels; the victims
          saw every training image) are split three ways: the first FIT_IMAGES, which each detector fits on; the next
          CALIBRATION_IMAGES, which set the threshold at 5 % false positives; and the rest, the clean evaluation images.
          The triggered evaluation images are the non-fit images (non-target labels; Xiang's source classes) stamped
          with the trigger, where the attack succeeds on them, as in the reference code of SCALE-UP and IBD-PSC. Per
          detector: ROC AUC, TPR at 5 % and 1 % FPR on the ROC curve, TPR and the realized FPR at the calibrated
          threshold (discrete scores such as SCALE-UP's tie at it, so it may flag less), forward passes per input and
          images per second of ``score``.
Transfer: rows ``transfer-fc`` and ``transfer-bp`` are the clean-label transfer attacks of ReScaler's Table 1
          (benchmarks/rescaler_cifar10.py's goals on ResNet-20, crafted here if not cached; --goals, default
          TRANSFER_GOALS). Each goal has its own victim (the backbone with the goal's fine-tuned head) and one
          triggered input, its target image, counted where the goal succeeded. Per successful goal the detector
          fits on that victim with the fit images, and scores the target with CALIBRATION_PER_GOAL calibration
          and CLEAN_PER_GOAL clean evaluation images, taken in turn from the same splits (the target left
          out); the scores are pooled over the goals, one threshold set on the pooled calibration scores.
Hardware: one job per (attack, detector), run as a guard.sweep grid: Ray tasks of --threads CPUs each (one GPU
          each when CUDA is available) on a local Ray or --address; --serial runs them here one by one. A job
          holds its --threads CPUs alone, so its images/s is not shared with another job (on 2 cores, with the
          default --threads 2, the jobs run one at a time).
Output:   benchmarks/results/detect_cifar10.json and .png (ROC curves per attack, AUC bars); the JSON accumulates,
          so an interrupted run resumes (a detector already measured on an attack with the same config is kept).
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/detect_cifar10.py [--attacks badnets,blend,transfer-fc]
          [--detectors strip,scale-up] [--threads 2] [--goals 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

import guard
from guard.attacks import load_record
from guard.data import load_dataset
from guard.detect import calibrate_threshold, create_input_detector, get_input_detector, list_input_detectors
from guard.models import create
from guard.sweep import Grid
from guard.train import predict
from rescaler_cifar10 import CHUNK, Setting, goal_path, make_attack, pending_chunks, restore_victim
# benchmarks/victims.py: the shared cache of strong victims and the helpers every benchmark uses
from victims import (DEFENSE_VICTIMS, add_sweep_arguments, data_root, job_resources, pick_device, results_name,
                     run_grid, stamp_sources, victim)

ATTACKS = DEFENSE_VICTIMS
#: detectors measured beyond the registry defaults: name -> (registered detector, options)
VARIANTS = {"rescaler-penultimate": ("rescaler", {"feature": "penultimate"}),
            "rescaler-drop": ("rescaler", {"feature": "drop"}),
            "rescaler-max": ("rescaler", {"combine": "max"}), "rescaler-psc": ("rescaler", {"amplified": 1}),
            "rescaler-psc5": ("rescaler", {"amplified": 5})}
FIT_IMAGES, CALIBRATION_IMAGES, FPR, SEED = 400, 300, 0.05, 0
ENDPOINT_FPR = 0.01  # the endpoint's default (guard calibrate --false-positive-rate)
#: transfer-attack rows -> the Table 1 attack of rescaler_cifar10.py whose ResNet-20 goals they score
TRANSFER = {"transfer-fc": "fc", "transfer-bp": "bp"}
TRANSFER_MODEL, TRANSFER_GOALS, CALIBRATION_PER_GOAL, CLEAN_PER_GOAL = "resnet20", 30, 10, 15
OUT = Path(__file__).parent / "results"


def variants(names: list[str]) -> dict[str, tuple[str, dict]]:
    """Benchmark row name -> (registered detector, options)."""
    rows = {n: (n, {}) for n in names if n in list_input_detectors()}
    rows.update({n: v for n, v in VARIANTS.items() if v[0] in names})
    return rows


def evaluation_images(attack_name: str, model, test, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(clean evaluation images, triggered images on which the attack succeeds, counts) from the lossless test
    images ``test``."""
    v = victim(attack_name, **ATTACKS[attack_name])
    attack = load_record(v.record)
    triggered = stamp_sources(attack, test.subset(range(FIT_IMAGES, len(test))))
    hit = predict(model, triggered, device=device) == attack.config.target
    clean = test.images[FIT_IMAGES + CALIBRATION_IMAGES:].float() / 255
    stamped = triggered.images[hit].float() / 255
    return clean, stamped, {"clean": len(clean), "triggered": len(triggered), "successful": int(hit.sum()),
                            "asr": round(hit.double().mean().item(), 4), "cda": v.cda, "victim_asr": v.asr}


def tpr_at(fpr, tpr, rate: float = FPR) -> float:
    """The ROC curve's true positive rate at false positive rate ``rate`` (linear between its points)."""
    return float(np.interp(rate, fpr, tpr))


def measure(name: str, options: dict, model, fit: torch.Tensor, calibration: torch.Tensor, clean: torch.Tensor,
            stamped: torch.Tensor) -> dict:
    detector = create_input_detector(name, **options)
    started = time.perf_counter()
    detector.fit(model, fit, generator=torch.Generator().manual_seed(SEED))
    fit_seconds = time.perf_counter() - started
    threshold = detector.threshold(detector.score(calibration), FPR)
    started = time.perf_counter()
    s_clean, s_trig = detector.score(clean), detector.score(stamped)
    seconds = time.perf_counter() - started
    return {"config": json.loads(json.dumps(dataclasses.asdict(detector.config))),
            **separation(s_clean, s_trig, threshold), "forward_passes": detector.forward_passes,
            "images_per_second": round((len(s_clean) + len(s_trig)) / seconds, 1),
            "fit_seconds": round(fit_seconds, 1)}


def separation(s_clean: torch.Tensor, s_trig: torch.Tensor, threshold: float) -> dict:
    """ROC AUC, TPR at FPR and at ENDPOINT_FPR on the ROC curve, and TPR / realized FPR at the calibrated
    ``threshold``."""
    y = np.r_[np.zeros(len(s_clean)), np.ones(len(s_trig))]
    s = np.r_[s_clean.numpy(), s_trig.numpy()]
    fpr, tpr, _ = roc_curve(y, s)
    keep = np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).round().astype(int)  # a plot's worth of points
    return {"auc": round(float(roc_auc_score(y, s)), 4), "tpr_at_fpr": round(tpr_at(fpr, tpr), 4),
            "tpr_at_endpoint_fpr": round(tpr_at(fpr, tpr, ENDPOINT_FPR), 4),
            "threshold": threshold,
            "tpr": round(float((s_trig > threshold).double().mean()), 4),
            "fpr": round(float((s_clean > threshold).double().mean()), 4),
            "roc": {"fpr": fpr[keep].round(4).tolist(), "tpr": tpr[keep].round(4).tolist()}}


def in_turn(indices: list[int], k: int, count: int) -> list[int]:
    """The ``k``-th window of ``count`` of ``indices``, wrapping around: each goal scores other images."""
    return [indices[(k * count + j) % len(indices)] for j in range(count)]


def transfer_measure(row: str, name: str, options: dict, goals: int, device: torch.device) -> dict:
    """Detector ``name`` on the cached successful goals of transfer row ``row`` (see the module docstring)."""
    attack_name = TRANSFER[row]
    root = data_root()
    train_set = load_dataset("cifar10", root, split="train")
    test = load_dataset("cifar10", root, split="test-lossless")
    setting = Setting(TRANSFER_MODEL, train_set, test, goals, device)
    records = [json.loads(goal_path(TRANSFER_MODEL, attack_name, i).read_text()) for i in range(goals)]
    hits = [r for r in records if r["success"]]
    counts = {"goals": goals, "successful": len(hits), "asr": round(len(hits) / goals, 4),
              "victim_val_acc": round(float(np.mean([r["undefended_val_acc"] for r in records])), 4)}
    if len(hits) < 5:
        return {"skipped": f"{len(hits)} of {goals} goals succeed", "counts": counts}
    attack = make_attack(attack_name)
    scores = {"calibration": [], "clean": [], "triggered": []}
    fit_seconds = seconds = 0.0
    for k, r in enumerate(hits):
        model = restore_victim(setting, attack_name, r["goal"], device)
        split = {part: [i for i in range(lo, hi) if i != r["target_index"]] for part, (lo, hi) in
                 {"fit": (0, FIT_IMAGES), "calibration": (FIT_IMAGES, FIT_IMAGES + CALIBRATION_IMAGES),
                  "clean": (FIT_IMAGES + CALIBRATION_IMAGES, len(test))}.items()}
        images = {part: test.images[index].float().div(255).to(device) for part, index in
                  (("fit", split["fit"]), ("calibration", in_turn(split["calibration"], k, CALIBRATION_PER_GOAL)),
                   ("clean", in_turn(split["clean"], k, CLEAN_PER_GOAL)))}
        query = attack.target_input(test.images[r["target_index"]].float() / 255)[None].to(device)
        detector = create_input_detector(name, **options)
        started = time.perf_counter()
        detector.fit(model, images["fit"], generator=torch.Generator().manual_seed(SEED))
        fit_seconds += time.perf_counter() - started
        scores["calibration"].append(detector.score(images["calibration"]))
        started = time.perf_counter()
        scored = detector.score(torch.cat([images["clean"], query]))
        seconds += time.perf_counter() - started
        scores["clean"].append(scored[:-1])
        scores["triggered"].append(scored[-1:])
    pooled = {part: torch.cat(s) for part, s in scores.items()}
    counts.update(clean=len(pooled["clean"]), calibration=len(pooled["calibration"]))
    return {"config": json.loads(json.dumps(dataclasses.asdict(detector.config))),
            **separation(pooled["clean"], pooled["triggered"], calibrate_threshold(pooled["calibration"], FPR)),
            "forward_passes": detector.forward_passes,
            "images_per_second": round((len(pooled["clean"]) + len(hits)) / seconds, 1),
            "fit_seconds": round(fit_seconds / len(hits), 1), "counts": counts}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(results["attacks"])
    cols = min(4, len(attacks)) + 1
    rows = -(-(len(attacks) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    axes = axes.flatten()
    names = sorted({d for a in attacks for d in results["attacks"][a]["detectors"]})
    colours = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    for ax, attack_name in zip(axes, attacks):
        row = results["attacks"][attack_name]
        for n, d in row["detectors"].items():
            ax.plot(d["roc"]["fpr"], d["roc"]["tpr"], color=colours[n], label=f"{n} {d['auc']:.2f}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        counts = row["counts"]
        ax.set_title(f"{attack_name} ({counts['successful']}/{counts['goals']} goals succeed)" if "goals" in counts
                     else f"{attack_name} (ASR {counts['asr']:.2f})")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[len(attacks)]
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        aucs = [results["attacks"][a]["detectors"].get(n, {}).get("auc", np.nan) for a in attacks]
        ax.bar(np.arange(len(attacks)) + i * width, aucs, width, color=colours[n], label=n)
    ax.set_xticks(np.arange(len(attacks)) + 0.4 - width / 2, attacks, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("ROC AUC")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    for ax in axes[len(attacks) + 1:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(results: dict) -> dict:
    """Mean AUC, TPR at 5 % FPR (ROC) and TPR at the calibrated threshold of every detector over the attacks
    that took hold (ASR >= 0.5 on the evaluation images; for a transfer row, half its goals succeed)."""
    rows = [r for r in results["attacks"].values() if r.get("counts", {}).get("asr", 0) >= 0.5]  # measured ones
    names = sorted({d for r in rows for d in r["detectors"]})

    def mean(n: str, f) -> float:
        return round(float(np.mean([f(r["detectors"][n]) for r in rows if n in r["detectors"]])), 4)

    return {n: {"attacks": sum(n in r["detectors"] for r in rows), "mean_auc": mean(n, lambda d: d["auc"]),
                "mean_tpr_at_fpr": mean(n, lambda d: tpr_at(d["roc"]["fpr"], d["roc"]["tpr"])),
                "mean_tpr": mean(n, lambda d: d["tpr"]),
                "forward_passes": next(r["detectors"][n]["forward_passes"] for r in rows if n in r["detectors"])}
            for n in names}


def detect_job(attack: str, label: str, name: str, options: dict, device: str, goals: int) -> dict:
    """One grid point, run by the sweep (a Ray task or the serial loop): detector ``name`` with ``options``
    (reported as ``label``) on the cached victim of ``attack``, or on the first ``goals`` goals of a transfer
    row."""
    device = pick_device(device)
    if attack in TRANSFER:
        return transfer_measure(attack, name, options, goals, device)
    test = load_dataset("cifar10", data_root(), split="test-lossless")
    fit = test.images[:FIT_IMAGES].float() / 255
    calibration = test.images[FIT_IMAGES:FIT_IMAGES + CALIBRATION_IMAGES].float() / 255
    model = create("resnet20", weights=victim(attack, **ATTACKS[attack]).weights).to(device).eval()
    clean, stamped, counts = evaluation_images(attack, model, test, device)
    if counts["successful"] < 10:
        return {"skipped": f"the trigger succeeds on {counts['successful']} images", "counts": counts}
    d = measure(name, options, model, fit.to(device), calibration.to(device), clean.to(device), stamped.to(device))
    return {**d, "counts": counts}


def build_goals(rows: list[str], goals: int, args: argparse.Namespace) -> None:
    """Craft the transfer rows' goals that rescaler_cifar10.py has not cached yet, with its chunk job."""
    chunks = pending_chunks(TRANSFER_MODEL, [TRANSFER[r] for r in rows], goals, CHUNK)
    crafter = Path(__file__).resolve().with_name("rescaler_cifar10.py")
    grid = Grid(name="detect-goals", function=f"{crafter}:chunk_job",
                points=chunks, resources=job_resources(args.threads, pick_device(args.device)))
    for done in run_grid(grid, args):
        p = done.job.params
        if not done.ok:
            raise SystemExit(f"crafting {p['attack']} goals {p['indices']} failed: {done.record['error']}")
        print(f"{p['attack']} goals {p['indices'][0] + 1}-{p['indices'][-1] + 1}/{goals}: "
              f"{done.result['successes']} successes", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default=",".join([*ATTACKS, *TRANSFER]))
    parser.add_argument("--detectors", default=",".join(list_input_detectors()))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each job (its declared CPUs)")
    parser.add_argument("--goals", type=int, default=TRANSFER_GOALS, help="goals of each transfer row")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    add_sweep_arguments(parser)
    parser.add_argument("--out", type=results_name,
                        default="detect_cifar10", help="results name in benchmarks/results/")
    args = parser.parse_args()
    attacks, names = args.attacks.split(","), args.detectors.split(",")
    unknown = [a for a in attacks if a not in {**ATTACKS, **TRANSFER}]
    unknown += [d for d in names if d not in list_input_detectors()]
    if unknown:
        raise SystemExit(f"unknown attacks/detectors {unknown}; attacks: {[*ATTACKS, *TRANSFER]}, "
                         f"detectors: {list_input_detectors()}")
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    test = load_dataset("cifar10", data_root(), split="test-lossless")
    out_json = OUT / f"{args.out}.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    results.update({"what": __doc__.splitlines()[0], "device": str(device), "threads": args.threads,
                    "torch": torch.__version__, "guard": guard.__version__, "platform": platform.platform(),
                    "params": {"fit_images": FIT_IMAGES, "calibration_images": CALIBRATION_IMAGES,
                               "clean_evaluation_images": len(test) - FIT_IMAGES - CALIBRATION_IMAGES,
                               "false_positive_rate": FPR, "seed": SEED, "transfer_model": TRANSFER_MODEL,
                               "calibration_per_goal": CALIBRATION_PER_GOAL, "clean_per_goal": CLEAN_PER_GOAL}})
    results.setdefault("attacks", {})
    points = []
    build_goals([a for a in attacks if a in TRANSFER], args.goals, args)
    for attack_name in attacks:  # victims are built here, once, before jobs that share them run in parallel
        row_options = {"goals": args.goals} if attack_name in TRANSFER else ATTACKS[attack_name]
        if attack_name in ATTACKS:
            victim(attack_name, **row_options)
        row = results["attacks"].setdefault(attack_name, {"detectors": {}})
        if row.get("options", row_options) != row_options:  # measured on another victim: measure again
            row["detectors"] = {}
        row["options"] = row_options
        for label, (name, options) in variants(names).items():
            config = json.loads(json.dumps(dataclasses.asdict(get_input_detector(name).config_class(**options))))
            if row["detectors"].get(label, {}).get("config") != config:  # else measured by an earlier run
                points.append({"attack": attack_name, "label": label, "name": name, "options": options})
    grid = Grid(name=args.out, function=f"{Path(__file__).resolve()}:detect_job",
                params={"device": args.device, "goals": args.goals},
                points=points, resources=job_resources(args.threads, device),
                out=OUT / f"{args.out}.sweep.json")
    for done in run_grid(grid, args):
        attack_name, label = done.job.params["attack"], done.job.params["label"]
        if not done.ok:
            print(f"FAILED {attack_name} {label}: {done.record['error']}", flush=True)
            continue
        d, row = dict(done.result), results["attacks"][attack_name]
        row["counts"] = d.pop("counts")
        if "skipped" in d:
            print(f"{attack_name}: {d['skipped']}; skipped", flush=True)
            continue
        row["detectors"][label] = d
        print(f"{attack_name:15s} {label:14s} AUC {d['auc']:.3f} TPR@5% {d['tpr_at_fpr']:.3f} "
              f"TPR@1% {d['tpr_at_endpoint_fpr']:.3f}, calibrated "
              f"{d['tpr']:.3f} (FPR {d['fpr']:.3f}) "
              f"{d['forward_passes']:3d} passes {d['images_per_second']:7.1f} img/s", flush=True)
        results["summary"] = summarize(results)
        out_json.write_text(json.dumps(results, indent=1))
    results["summary"] = summarize(results)
    out_json.write_text(json.dumps(results, indent=1))
    plot(results, OUT / f"{args.out}.png")
    print(json.dumps(results["summary"], indent=1))
    print(f"wrote {out_json} and .png")


if __name__ == "__main__":
    main()
