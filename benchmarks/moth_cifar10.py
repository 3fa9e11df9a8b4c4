"""MOTH on real CIFAR-10: the class distance of the pretrained ResNet-20, and hardening of strong victims.

What:     two parts, each written into one JSON as it finishes (--part picks them):
          distance — the class distance (ALGORITHMS.md M12) of all 90 ordered pairs of the pretrained CIFAR
                     ResNet-20 on the first 1000 (lossless) test images, at the default CPU budget of
                     guard.detect.ClassDistanceConfig (and, with --reference, the MOTH code's: 1000 passes, ≤ 100
                     images per pair, minimum over 3 seeds), beside MOTH's Supplementary.md 61.31 ± 4.50; wall
                     time of the 90 pairs (the issue's floor: 10 min on 2 CPU cores), and the inversion's
                     images/s per forward/backward pass size (PASS_SIZES and the engine's device default).
          moth     — per pervasive attack of Table 8 (Blend, SIG, WaNet, DFST substitute, target class 0): a strong
                     victim (undefended non-target ASR ≥ 0.9: the pretrained ResNet-20 fine-tuned on the full
                     poisoned training set, WaNet for the 8 epochs of the defense benchmarks' victim; or with
                     --victims scratch a ResNet-20 trained from scratch on it as Table 8's are; from the shared
                     victim cache benchmarks/victims.py), hardened by MOTH
                     (guard.repair.create_defense("moth"), default budget, 2 epochs) on a class-stratified
                     TRUSTED_FRACTION of the clean training set; CDA and non-target ASR before/after beside
                     moth_supplementary.txt Table 8 (ALGORITHMS.md T8) and beside plain fine-tuning for the same
                     steps on the same data (the control: what MOTH's stamping adds), the class distance
                     before/after and its mean enlargement, and the wall time of the hardening (the issue's
                     floor: 30 min on 2 cores). Rows of scratch victims are named ATTACK-scratch; --attack-opt
                     KEY=VALUE changes an attack option for every row (a victim of its own, cached like the
                     others) and joins the row's name (sig-scratch-budget0.1); --test-opt KEY=VALUE also measures
                     every ASR with that test-time trigger option (SIG's test_delta: an amplified signal).
                     The row `clean` hardens the same recipe trained on the clean training set (victims.CLEAN,
                     no backdoor): MOTH's accuracy cost and distance enlargement where there is nothing to
                     remove, beside the control's (ALGORITHMS.md D9: 0.13 % accuracy drop on TrojAI models).
Models:   CIFAR ResNet-20 (data/weights/resnet20-12fca82f.th); Table 8 has ResNet-20 rows for Blend and SIG, a
          ResNet-18 row for WaNet and a ResNet-32 row for DFST (the real DFST; guard's is a colour-style
          substitute) — the numbers are beside them, not the same experiment.
Hardware: CPU threads = --threads (default 2, the project's machine); CUDA when available. The moth rows are
          guard.sweep jobs of --threads CPUs (one GPU each with CUDA) on a local Ray, --address, or --serial.
Output:   benchmarks/results/moth_cifar10.json and moth_cifar10.png (distance heat maps, ASR/CDA before/after)
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/moth_cifar10.py [--part distance|moth] [--reference]
          python benchmarks/moth_cifar10.py --quick   # minutes: a few pairs and steps, one quickly made victim
                                                      # (no victim cache), results to moth_cifar10_quick.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

import guard
from guard.attacks import create_attack, load_record, parse_options
from guard.data import load_dataset
from guard.detect import ClassDistance, ClassDistanceConfig
from guard.metrics import evaluate_backdoor
from guard.models import create
from guard.repair import MothConfig, create_defense, split_trusted
from guard.repair.base import DEFENSES
from guard.sweep import Grid
from guard.train import TrainConfig, evaluate, train
from victims import (CLEAN, DEFENSE_VICTIMS, RECIPES, WEIGHTS, add_sweep_arguments,  # benchmarks/victims.py
                     job_resources, results_name, run_grid, victim)

# ----------------------------------------------------------------------------------------- parameters
SEED = 0
MODEL = "resnet20"
HELDOUT_IMAGES = 1000          # the first 1000 test images (lossless): MOTH's K·100 for the distances
TRUSTED_FRACTION = 0.1         # MOTH trains on the defender's clean data: 10 % of CIFAR-10's training set
PUBLISHED_DISTANCE = (61.31, 4.50)  # CIFAR-10 ResNet-20, MOTH Supplementary.md (100 sets of 200 samples)
ATTACKS = {  # Table 8 settings (moth_supplementary.txt §1.3): target 0; options beyond them are the defaults
    "blend": {"alpha": 0.2}, "sig": {"delta": 20.0, "frequency": 6.0}, "wanet": {}, "dfst": {},
}
TABLE8 = {  # (model, orig acc, orig ASR, MOTH acc, MOTH ASR), CIFAR-10 rows of Table 8
    "blend": ("ResNet20", 0.9096, 0.9996, 0.8908, 0.0000), "sig": ("ResNet20", 0.8338, 0.9330, 0.8691, 0.0397),
    "wanet": ("ResNet18", 0.9415, 0.9955, 0.9112, 0.0064), "dfst": ("ResNet32 Detox1", 0.8995, 0.9760, 0.8822, 0.1422),
}
ROWS = (*ATTACKS, CLEAN)  # the moth rows: Table 8's attacks, and the clean control (no backdoor, no ASR)
QUICK = {  # --quick: every step of both parts at a few seconds' budget
    "pairs": ((0, 1), (1, 0), (3, 5), (5, 3)), "distance": {"steps": 3, "images_per_class": 8, "batch_size": 8},
    "attacks": ("blend", CLEAN), "victim_images": 1000, "victim_epochs": 1, "trusted_fraction": 0.01,
    "moth": {"epochs": 1, "warmup_steps": 2, "pair_steps": 2, "quick_steps": 1, "eval_every": 5},
}
PASS_SIZES = (32, 128, 512, 2048)  # images per forward/backward pass timed by the distance part
OUT = Path(__file__).parent / "results"


def data_root() -> Path:
    root = os.environ.get("GUARD_DATA_DIR")
    if not root or not Path(root, WEIGHTS).is_file():
        raise SystemExit(f"set GUARD_DATA_DIR to a directory with cifar10/ and {WEIGHTS}")
    return Path(root)


def distance_part(root: Path, heldout, device, quick: bool, reference: bool) -> dict:
    model = create(MODEL, weights=root / WEIGHTS).to(device)
    configs = {"default": ClassDistanceConfig()}
    if reference:
        configs["reference"] = ClassDistanceConfig.reference()
    if quick:
        configs = {"quick": ClassDistanceConfig(**QUICK["distance"], pairs=QUICK["pairs"])}
    out = {"published": {"mean": PUBLISHED_DISTANCE[0], "std": PUBLISHED_DISTANCE[1]}}
    if not quick:
        out["pass_size"] = pass_sizes(model, heldout, device)
    for name, config in configs.items():
        started = time.perf_counter()
        result = ClassDistance(config).measure(model, heldout, generator=torch.Generator().manual_seed(SEED),
                                               device=device)
        sync(device)
        out[name] = {**result.to_dict(), "wall_seconds": round(time.perf_counter() - started, 1)}
        print(f"distance ({name}): mean {result.mean:.2f} over {int(result.found.sum())} pairs in "
              f"{out[name]['wall_seconds']:.0f}s (published {PUBLISHED_DISTANCE[0]} ± {PUBLISHED_DISTANCE[1]})",
              flush=True)
    return out


def pass_sizes(model, heldout, device, sizes=PASS_SIZES, steps: int = 3) -> dict:
    """Images/s of the distance's inversion (all 90 pairs, ``steps`` passes without early stop) per forward/
    backward pass size: what guard.detect.inversion.default_chunk_size is chosen from."""
    k = model.num_classes
    per_class = torch.bincount(heldout.labels, minlength=k).clamp(max=ClassDistanceConfig.images_per_class)
    images = steps * (k - 1) * int(per_class.sum())  # every ordered pair's source images, per pass
    rates = {}
    for size in (*sizes, None):
        config = ClassDistanceConfig(steps=steps, early_stop_patience=None, chunk_size=size)
        started = time.perf_counter()
        ClassDistance(config).measure(model, heldout, generator=torch.Generator().manual_seed(SEED), device=device)
        sync(device)
        rates["default" if size is None else str(size)] = round(images / (time.perf_counter() - started), 1)
    print(f"distance inversion, images/s by pass size: {rates}", flush=True)
    return rates


def strong_victim(root: Path, name: str, train_set, device, quick: bool, recipe: str = "finetune",
                  options: dict | None = None):
    """(model, attack): the ``recipe`` victim with Table 8's settings updated by ``options`` from the shared cache,
    or with --quick one fine-tuned here for seconds; the clean row's attack is None."""
    if quick:
        attack = None if name == CLEAN else create_attack(name, target=0, **attack_settings(name, options))
        subset = train_set.subset(torch.randperm(len(train_set), generator=torch.Generator().manual_seed(SEED))
                                  [:QUICK["victim_images"]])
        poisoned = subset if attack is None else attack.poison(subset, torch.Generator().manual_seed(SEED)).dataset
        model = create(MODEL, weights=root / WEIGHTS).to(device)
        train(model, poisoned, TrainConfig.finetune(epochs=QUICK["victim_epochs"], lr=0.01, weight_decay=5e-4),
              generator=torch.Generator().manual_seed(SEED), device=device, progress=False)
        return model, attack
    v = cached_victim(name, recipe, options)
    return create(MODEL, weights=v.weights).to(device), None if name == CLEAN else load_record(v.record)


def cached_victim(name: str, recipe: str, options: dict | None = None):
    """The shared cache's ``recipe`` victim of ``name`` with Table 8's settings updated by ``options``, built now
    if missing; a fine-tuned victim trains for the epochs the defense benchmarks' victim of that attack takes
    (DEFENSE_VICTIMS). The clean row's model is the recipe on the clean training set (no options)."""
    if name == CLEAN:
        return victim(CLEAN, recipe=recipe)
    epochs = DEFENSE_VICTIMS.get(name, {}).get("epochs") if recipe == "finetune" else None
    return victim(name, recipe=recipe, epochs=epochs, target=0, **attack_settings(name, options))


def attack_settings(name: str, options: dict | None) -> dict:
    """Table 8's settings of ``name`` (ATTACKS) updated by ``options`` (--attack-opt)."""
    return {**ATTACKS[name], **(options or {})}


def row_name(attack: str, recipe: str, options: dict | None = None) -> str:
    """A row's key in the JSON: the attack, suffixed by the victim recipe unless it is the default and by the
    options that change Table 8's settings (``sig-scratch-budget0.1``; the clean row takes none)."""
    name = attack if recipe == "finetune" else f"{attack}-{recipe}"
    changed = {} if attack == CLEAN else options or {}
    return name + "".join(f"-{k}{v}" for k, v in sorted(changed.items()))


def with_test_options(attack, options: dict):
    """``attack`` (its state kept) with test-time trigger options such as SIG's ``test_delta`` replaced: the
    poisoned training set is unchanged, only ``triggered`` differs."""
    changed = type(attack)(dataclasses.replace(attack.config, **options))
    changed.load_state_dict(attack.state_dict())
    return changed


def trusted_fraction(args) -> float:
    """The share of the training set MOTH hardens on in this run (--trusted-fraction, or --quick's)."""
    return QUICK["trusted_fraction"] if args.quick else args.trusted_fraction


def moth_config(args) -> MothConfig:
    """The MOTH configuration of this run: --quick's, the MOTH code's (--moth reference) or the default, with
    --epochs, then the fields --moth-opt sets."""
    if args.quick:
        config = MothConfig(**QUICK["moth"])
    elif args.moth == "reference":
        config = MothConfig.reference(epochs=args.epochs)
    else:
        config = MothConfig(epochs=args.epochs)
    return dataclasses.replace(config, **args.moth_opts)


def moth_row(name: str, root: Path, train_set, heldout, device, args) -> dict:
    """One attack's row: its strong victim hardened by MOTH, before/after CDA, ASR and class distance (the
    clean row: no attack, the ASR fields None)."""
    quick = args.quick
    fraction = trusted_fraction(args)
    trusted = train_set if fraction == 1 else split_trusted(train_set, fraction, torch.Generator().manual_seed(SEED))
    config = moth_config(args)
    distance = (ClassDistanceConfig(**QUICK["distance"], pairs=QUICK["pairs"]) if quick else ClassDistanceConfig())
    model, attack = strong_victim(root, name, train_set, device, quick, args.victims, args.attack_opts)
    amplified = with_test_options(attack, args.test_opts) if args.test_opts and attack is not None else None

    def asr_with_test_options(m) -> float:
        return evaluate_backdoor(m, amplified, heldout, device=device)["asr_nontarget"]

    before = backdoor_metrics(model, attack, heldout, device)
    started = time.perf_counter()
    result = create_defense("moth", config=config).defend(model, trusted, eval_set=heldout,
                                                          generator=torch.Generator().manual_seed(SEED),
                                                          device=device)
    sync(device)
    seconds = time.perf_counter() - started
    after = backdoor_metrics(result.model, attack, heldout, device)
    # the control: the same steps, data and optimizer, nothing stamped; evaluated once at the end and, like MOTH
    # here, never stopped for CDA (max_cda_drop 0.99)
    steps = result.details["hardening_steps"]
    control = create_defense("fine-tune", steps=steps, eval_every=steps, lr=config.lr, batch_size=config.batch_size,
                             augment=config.augment, max_cda_drop=0.99).defend(
        model, trusted, eval_set=heldout, generator=torch.Generator().manual_seed(SEED), device=device)
    tuned = backdoor_metrics(control.model, attack, heldout, device)
    test_options = ({"options": args.test_opts, "asr_before": asr_with_test_options(model),
                     "asr_after": asr_with_test_options(result.model),
                     "fine_tune_control_asr_after": asr_with_test_options(control.model)} if amplified else None)
    measure = ClassDistance(distance)
    d_before = measure.measure(model, heldout, generator=torch.Generator().manual_seed(SEED), device=device)
    d_after = measure.measure(result.model, heldout, generator=torch.Generator().manual_seed(SEED), device=device)
    paper = TABLE8.get(name)
    enlargement = d_after.enlargement(d_before)
    return {
        "attack": attack and attack.name,
        "config": attack and json.loads(json.dumps(dataclasses.asdict(attack.config), default=str)),
        "victim_recipe": "quick" if quick else args.victims,
        "cda_before": before["cda"], "asr_before": before["asr_nontarget"],
        "cda_after": after["cda"], "asr_after": after["asr_nontarget"],
        "fine_tune_control": {"steps": steps, "lr": config.lr, "cda_after": tuned["cda"],
                              "asr_after": tuned["asr_nontarget"]},
        "strong_victim": attack is not None and before["asr_nontarget"] >= 0.9, "test_options": test_options,
        "table8": paper and {"model": paper[0], "acc_before": paper[1], "asr_before": paper[2],
                             "acc_after": paper[3], "asr_after": paper[4]},
        "moth_config": args.moth, "moth_opts": args.moth_opts, "moth_epochs": config.epochs, "device": str(device),
        "moth_seconds": round(seconds, 1), "moth_steps": result.details["hardening_steps"],
        "trusted_images": len(trusted), "history": [dataclasses.asdict(p) for p in result.history],
        "distance_before": d_before.to_dict(), "distance_after": d_after.to_dict(),
        "distance_mean_before": d_before.to_dict()["mean"], "distance_mean_after": d_after.to_dict()["mean"],
        "enlargement": enlargement if math.isfinite(enlargement) else None,
        "pair_counts": result.details["pair_counts"]}


def backdoor_metrics(model, attack, heldout, device) -> dict:
    """CDA and non-target ASR of ``model`` on ``heldout`` (``attack`` None, the clean row: CDA only)."""
    if attack is None:
        return {"cda": evaluate(model, heldout, device=device), "asr_nontarget": None}
    return evaluate_backdoor(model, attack, heldout, device=device)


def moth_job(attack: str, settings: dict) -> dict:
    """One row, run by the sweep (guard.sweep; a Ray task or the serial loop)."""
    args = argparse.Namespace(**settings)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    root = data_root()
    train_set = load_dataset("cifar10", root, split="train")
    heldout = load_dataset("cifar10", root, split="test-lossless").subset(range(HELDOUT_IMAGES))
    return moth_row(attack, root, train_set, heldout, device, args)


def moth_part(args, device, results: dict, save) -> None:
    """Every attack's row as a guard.sweep job (victims built first, here, since rows share the cache)."""
    rows = results.setdefault("moth", {})
    names = [n for n in (QUICK["attacks"] if args.quick else args.attacks)
             if row_name(n, args.victims, args.attack_opts) not in rows]
    if not args.quick:
        for name in names:
            cached_victim(name, args.victims, args.attack_opts)
    settings = {k: getattr(args, k) for k in ("quick", "trusted_fraction", "moth", "moth_opts", "epochs", "device",
                                              "victims", "attack_opts", "test_opts")}
    grid = Grid(name="moth", function=f"{Path(__file__).resolve()}:moth_job", params={"settings": settings},
                points=[{"attack": n} for n in names],
                resources=job_resources(args.threads, device))
    for done in run_grid(grid, args):
        name = row_name(done.job.params["attack"], args.victims, args.attack_opts)
        if not done.ok:
            print(f"FAILED {name}: {done.record['error']}", flush=True)
            continue
        row = rows[name] = done.result
        print(f"{name}: {row_summary(row)}", flush=True)
        save()


def row_summary(row: dict) -> str:
    """A moth row in one line: CDA and ASR (none in the clean row) before/after beside Table 8 and the control,
    the mean class distance and MOTH's wall time."""
    control, paper, tested = row["fine_tune_control"], row["table8"], row["test_options"]
    line = f"CDA {row['cda_before']:.3f} -> {row['cda_after']:.3f} (fine-tuning alone: {control['cda_after']:.3f})"
    if row["asr_before"] is not None:
        line += (f", ASR {row['asr_before']:.3f} -> {row['asr_after']:.3f} (Table 8 {paper['model']}: "
                 f"{paper['asr_before']:.3f} -> {paper['asr_after']:.3f}; "
                 f"fine-tuning alone: {control['asr_after']:.3f})")
    if tested:
        line += f"; with {tested['options']}: ASR {tested['asr_before']:.3f} -> {tested['asr_after']:.3f}"
    return (line + f"; distance {row['distance_mean_before']:.1f} -> {row['distance_mean_after']:.1f}; "
            f"MOTH {row['moth_seconds']:.0f}s")


def sync(device: torch.device) -> None:
    """Wait for queued GPU work before reading a wall clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distance = results.get("distance", {})
    maps = [(k, v) for k, v in distance.items() if isinstance(v, dict) and "matrix" in v]
    rows = results.get("moth", {})
    bars = max(4.6, 0.9 * len(rows))  # the MOTH panel widens with its rows
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(4.6 * len(maps) + bars, 4.4), squeeze=False,
                             width_ratios=[4.6] * len(maps) + [bars])
    for ax, (name, d) in zip(axes[0], maps):
        matrix = torch.tensor([[float("nan") if v is None else v for v in row] for row in d["matrix"]])
        image = ax.imshow(matrix.numpy(), cmap="viridis")
        fig.colorbar(image, ax=ax, fraction=0.046)
        ax.set_title(f"{MODEL} class distance ({name}): mean {d['mean'] or float('nan'):.1f}\n"
                     f"published {PUBLISHED_DISTANCE[0]} ± {PUBLISHED_DISTANCE[1]}", fontsize=8)
        ax.set_xlabel("target")
        ax.set_ylabel("source")
    ax = axes[0][-1]
    names = list(rows)
    x = torch.arange(len(names)).float()
    for offset, key, label in ((-0.3, "asr_before", "ASR before"), (-0.1, "asr_after", "ASR after MOTH"),
                               (0.1, "cda_before", "CDA before"), (0.3, "cda_after", "CDA after MOTH")):
        ax.bar((x + offset).tolist(), [math.nan if rows[n][key] is None else rows[n][key] for n in names], width=0.2,
               label=label)  # the clean row has no ASR
    published = [i for i, n in enumerate(names) if rows[n]["table8"]]
    ax.scatter([x[i].item() - 0.1 for i in published], [rows[names[i]]["table8"]["asr_after"] for i in published],
               marker="*", color="k", zorder=3, label="Table 8 ASR after")
    controlled = [i for i, n in enumerate(names) if "fine_tune_control" in rows[n]]
    for offset, key, color in ((-0.1, "asr_after", "r"), (0.3, "cda_after", "b")):
        marked = [i for i in controlled if rows[names[i]]["fine_tune_control"][key] is not None]  # clean: no ASR
        ax.scatter([x[i].item() + offset for i in marked],
                   [rows[names[i]]["fine_tune_control"][key] for i in marked], marker="_", s=300, color=color,
                   zorder=3, label=f"{key.split('_')[0].upper()} after fine-tuning alone")
    ax.set_xticks(x.tolist(), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3)
    ax.set_title("MOTH on the victims (non-target ASR)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("distance", "moth"), action="append", help="default: both")
    parser.add_argument("--quick", action="store_true", help="a few pairs, steps and one quick victim")
    parser.add_argument("--reference", action="store_true", help="also measure at the MOTH code's budget (GPU)")
    parser.add_argument("--attacks", default=",".join(ROWS), help=f"moth rows (default: {','.join(ROWS)})")
    parser.add_argument("--moth", choices=("default", "reference"), default="default",
                        help="MothConfig() (a CPU budget) or MothConfig.reference() (the MOTH code's, a GPU budget)")
    parser.add_argument("--epochs", type=int, default=MothConfig.epochs, help="MOTH epochs over the trusted set")
    parser.add_argument("--moth-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="a MothConfig field set on top of --moth's (e.g. lr=0.001 with --moth reference)")
    parser.add_argument("--victims", choices=sorted(RECIPES), default="finetune",
                        help="the victims' recipe (benchmarks/victims.py): fine-tuned from the pretrained ResNet-20 "
                             "(default) or trained from scratch as Table 8's")
    parser.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="an attack option beyond Table 8's settings for every row (e.g. budget=0.1 for SIG); "
                             "it joins the row's name")
    parser.add_argument("--test-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="a test-time trigger option (e.g. test_delta=25 for SIG): every row also reports its "
                             "ASR before/after with it")
    parser.add_argument("--trusted-fraction", type=float, default=TRUSTED_FRACTION,
                        help=f"class-stratified share of the training set MOTH trains on (default {TRUSTED_FRACTION}; "
                             "the MOTH code: 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    add_sweep_arguments(parser)
    parser.add_argument("--out", type=results_name,
                        default=None, help="results name (default moth_cifar10[_quick]; .json/.png)")
    args = parser.parse_args()
    args.attacks = [a for a in args.attacks.split(",") if a]
    unknown = [a for a in args.attacks if a not in ROWS]
    if unknown or not 0 < args.trusted_fraction <= 1:
        parser.error(f"expected --attacks from {list(ROWS)} and 0 < --trusted-fraction <= 1, got {args.attacks} "
                     f"and {args.trusted_fraction}")
    for flag, given in (("--attack-opt", args.attack_opt), ("--test-opt", args.test_opt)):
        if any("=" not in o for o in given):
            parser.error(f"expected {flag} KEY=VALUE, got {given}")
    if any(not o.startswith("test_") for o in args.test_opt):
        parser.error(f"expected --test-opt options of the test-time trigger (test_delta, test_alpha, ...), got "
                     f"{args.test_opt}")
    try:
        given = DEFENSES.parse("moth", args.moth_opt)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    keys = [o.split("=", 1)[0].strip() for o in args.moth_opt]
    args.moth_opts = {k: getattr(given, k) for k in keys}
    texts = dict(o.split("=", 1) for o in args.attack_opt)
    tests = dict(o.split("=", 1) for o in args.test_opt)
    args.attack_opts, args.test_opts = {}, {}
    # validated per attack (the clean row takes none); the values typed as the attack's config reads them
    for name in [a for a in args.attacks if a != CLEAN]:
        try:
            config = parse_options(name, [f"{k}={v}" for k, v in {**ATTACKS[name], **texts, **tests}.items()])
        except (TypeError, ValueError) as err:
            parser.error(f"--attack-opt/--test-opt for {name}: {err}")
        args.attack_opts.update({k: getattr(config, k) for k in texts})
        args.test_opts.update({k: getattr(config, k) for k in tests})
    torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    root = data_root()
    heldout = load_dataset("cifar10", root, split="test-lossless").subset(range(HELDOUT_IMAGES))
    stem = args.out or ("moth_cifar10_quick" if args.quick else "moth_cifar10")
    out_json = OUT / f"{stem}.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() and not args.quick else {}
    results.update({"what": __doc__.splitlines()[0], "device": str(device), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "guard": guard.__version__, "platform": platform.platform(),
                    "quick": args.quick,
                    "params": {"trusted_fraction": trusted_fraction(args), "heldout_images": HELDOUT_IMAGES,
                               "moth": dataclasses.asdict(moth_config(args)),
                               "distance": dataclasses.asdict(ClassDistanceConfig())}})
    OUT.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out_json.write_text(json.dumps(results, indent=2))

    parts = args.part or ["distance", "moth"]
    if "distance" in parts:
        results["distance"] = distance_part(root, heldout, device, args.quick, args.reference)
        save()
    if "moth" in parts:
        moth_part(args, device, results, save)
    save()
    plot(results, OUT / f"{stem}.png")
    print(f"wrote {out_json} and {OUT / f'{stem}.png'}")


if __name__ == "__main__":
    main()
