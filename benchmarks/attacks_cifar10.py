"""Attack suite on real CIFAR-10 at CPU scale: CDA/ASR of every backdoor.

What:     every data-poisoning backdoor of guard.attacks (and PCB) implanted by fine-tuning the pretrained
          CIFAR ResNet-20 (all weights) on a poisoned subset of the CIFAR-10 training set; CDA and ASR (PyP form
          and non-target form; Xiang's source-class form for the A-F patterns) on the 1000 lossless test images,
          beside the undefended numbers of pick_your_poison.txt Table 2 and reverse_engineering_cleansing.txt
          Table 1 (ALGORITHMS.md T2, T9).
          The clean-label transfer attacks (FC / CP / BP / CLBD / HTBD) are measured over attack goals by
          rescaler_cifar10.py (its SA column), with ReScaler's defense beside them.
Scale:    reduced for 2 CPU cores, see the parameters below: the numbers are not the papers' protocol (120-epoch
          training from scratch) and are not expected to match them.
Hardware: one guard.sweep job per row, of --threads CPUs (default 2, the project's machine; one GPU each when
          CUDA is available), on a local Ray, --address, or --serial in this process.
Output:   benchmarks/results/attacks_cifar10.json and attacks_cifar10.png (example poisoned images per attack)
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/attacks_cifar10.py [--quick] [--only NAME] [--serial]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import guard
from guard.attacks import SupplyChainAttack, create_attack, list_attacks
from guard.data import load_dataset
from guard.metrics import evaluate_backdoor
from guard.models import create
from guard.sweep import Grid
from guard.train import TrainConfig, train
from victims import WEIGHTS, add_sweep_arguments, data_root, job_resources, pick_device, run_grid  # shared helpers

# ----------------------------------------------------------------------------------------- parameters
TORCH_THREADS = 2
SEED = 0
# (1) backdoors: fine-tune all weights of the pretrained ResNet-20 on a poisoned subset
BACKDOOR_TRAIN_IMAGES = 2000
BACKDOOR_EPOCHS = 2
BACKDOOR_CONFIG = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=64, schedule="none", mode="finetune")
POISON_RATE = 0.05        # poison-label attacks: 5 % of the subset (PyP uses m = 50 of 50,000 from scratch)
CLEAN_LABEL_RATE = 0.5    # clean-label attacks: half of the target class
OVERRIDES = {             # per attack: options beyond the rate (everything else is the attack's default)
    "badnets": {"patch_size": 3}, "adaptive-patch": {"patch_size": 4},
    "xiang-A": {"pattern": "A", "num_sources": 3, "per_source": 60},
    "xiang-C": {"pattern": "C", "num_sources": 3, "per_source": 60},
    "issba": {"steps": 300},
    # the independent model of PyP's Adv (an ImageNet ResNet) is not reachable: the pretrained ResNet-56,
    # pushing toward frog (6) rather than the target, so that ASR is the backdoor's, not plain transfer
    "adv": {"surrogate": "resnet56", "surrogate_weights": "weights/resnet56-4bfd9763.th", "adv_class": 6},
}
PAPER = {  # undefended (CDA, ASR) from pick_your_poison.txt Table 2 and Xiang Table 1 (wide, 3SC)
    "badnets": (0.952, 1.00), "adaptive-blend": (0.952, 0.94), "adaptive-patch": (0.951, 1.00),
    "refool": (0.954, 0.38), "wanet": (0.954, 0.29), "adv": (0.947, 0.98), "xiang-A": (0.916, 0.995),
    "xiang-C": (0.918, 0.993),
}
OUT = Path(__file__).parent / "results"


def pretrained(root: Path, device: torch.device):
    return create("resnet20", weights=root / WEIGHTS).to(device)


def attack_names(quick: bool, only: list[str] | None) -> list[str]:
    """The rows: the clean fine-tune, then every data-poisoning backdoor and PCB (Xiang's patterns A and C)."""
    names = [n for n in list_attacks("backdoor") + list_attacks("supply-chain") if n != "xiang"]
    names += ["xiang-A", "xiang-C"]
    if quick:
        names = ["badnets", "blend", "sig"]
    return [n for n in names if n in only] if only else ["clean", *names]


def attack_job(name: str, quick: bool) -> dict:
    """One row, run by the sweep (guard.sweep; a Ray task or the serial loop): the pretrained ResNet-20
    fine-tuned on the subset poisoned by ``name`` (``clean``: unpoisoned), its CDA and ASR, and one training
    image before / after poisoning (for the plot)."""
    root = data_root()
    device = pick_device("auto")
    train_full = load_dataset("cifar10", root, split="train")
    test = load_dataset("cifar10", root, split="test-lossless")
    g = torch.Generator().manual_seed(SEED)
    subset = train_full.subset(torch.randperm(len(train_full), generator=g)[:BACKDOOR_TRAIN_IMAGES])
    per_class = int((subset.labels == 0).sum())
    config = TrainConfig(epochs=1 if quick else BACKDOOR_EPOCHS, **BACKDOOR_CONFIG)
    model = pretrained(root, device)
    started = time.perf_counter()
    if name == "clean":
        train(model, subset, config, generator=torch.Generator().manual_seed(SEED), device=device, progress=False)
        return {"row": {"attack": "clean", "cda": evaluate_backdoor(model, create_attack("badnets"), test)["cda"],
                        "seconds": round(time.perf_counter() - started, 1)}}
    registered = "xiang" if name.startswith("xiang") else name
    options = dict(OVERRIDES.get(name, {}))
    if "surrogate_weights" in options:
        options["surrogate_weights"] = str(root / options["surrogate_weights"])
    if registered != "xiang":
        clean_label = create_attack(registered).clean_label
        options["num_poisons"] = round((CLEAN_LABEL_RATE * per_class) if clean_label else POISON_RATE * len(subset))
    attack = create_attack(registered, **options)
    gen = torch.Generator().manual_seed(SEED)
    example = None
    if isinstance(attack, SupplyChainAttack):
        attack.train(model, subset, config, generator=gen, device=device, progress=False)
        poisons = 0
    else:
        result = attack.poison(subset, gen)
        poisons = int(result.indices.numel())
        example = [subset.images[result.indices[0]].tolist(), result.dataset.images[result.indices[0]].tolist()]
        train(model, result.dataset, config, generator=gen, device=device, progress=False)
    scores = evaluate_backdoor(model, attack, test)
    row = {"attack": name, "poisons": poisons, **{k: round(v, 4) for k, v in scores.items()},
           "seconds": round(time.perf_counter() - started, 1), "paper_cda_asr": PAPER.get(name),
           "config": json.loads(json.dumps(vars(attack.config), default=str))}
    return {"row": row, "example": example}


def backdoor_runs(args) -> tuple[list[dict], dict]:
    """Every row as a guard.sweep job; the rows in attack_names' order and the plot's examples."""
    names = attack_names(args.quick, args.only)
    grid = Grid(name="attacks", function=f"{Path(__file__).resolve()}:attack_job", params={"quick": args.quick},
                points=[{"name": n} for n in names], resources=job_resources(args.threads, pick_device("auto")))
    rows, examples = {}, {}
    for done in run_grid(grid, args):
        name = done.job.params["name"]
        if not done.ok:
            print(f"FAILED {name}: {done.record['error']}", flush=True)
            continue
        row = rows[name] = done.result["row"]
        if done.result.get("example") is not None:
            examples[name] = tuple(torch.tensor(image, dtype=torch.uint8) for image in done.result["example"])
        if name == "clean":
            print(f"clean fine-tune: CDA {row['cda']:.3f}", flush=True)
        else:
            source = f", source {row['asr_source']:.3f}" if "asr_source" in row else ""
            print(f"{name:<15} m={row['poisons']:<4} CDA {row['cda']:.3f}  ASR {row['asr']:.3f} "
                  f"(non-target {row['asr_nontarget']:.3f}{source})  paper {PAPER.get(name)}  {row['seconds']}s",
                  flush=True)
    return [rows[n] for n in names if n in rows], {n: examples[n] for n in names if n in examples}


def plot(examples: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(examples)
    fig, axes = plt.subplots(2, len(names), figsize=(1.6 * len(names), 3.6))
    for j, name in enumerate(names):
        for i, image in enumerate(examples[name]):
            ax = axes[i, j] if len(names) > 1 else axes[i]
            ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
        (axes[0, 0] if len(names) > 1 else axes[0]).set_ylabel("clean", fontsize=7)
        (axes[1, 0] if len(names) > 1 else axes[1]).set_ylabel("poisoned", fontsize=7)
    fig.suptitle("guard.attacks on CIFAR-10: a training image before / after poisoning", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=140)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few attacks, one epoch (smoke run)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only these backdoors (repeatable); the other rows keep their previous results")
    parser.add_argument("--threads", type=int, default=TORCH_THREADS, help="CPU threads of each row's job")
    add_sweep_arguments(parser)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    OUT.mkdir(exist_ok=True)
    out_json = OUT / "attacks_cifar10.json"
    previous = json.loads(out_json.read_text()) if out_json.exists() else {}
    report = {"guard": guard.__version__, "torch": torch.__version__, "python": platform.python_version(),
              "device": str(device), "threads": args.threads, "quick": args.quick,
              "parameters": {"backdoor_train_images": BACKDOOR_TRAIN_IMAGES, "backdoor_epochs": BACKDOOR_EPOCHS,
                             "backdoor_config": BACKDOOR_CONFIG, "poison_rate": POISON_RATE,
                             "clean_label_rate": CLEAN_LABEL_RATE},
              "test_set": "CIFAR-10 first 1000 test images (lossless)"}
    rows, examples = backdoor_runs(args)
    if args.only:  # merge: the rows run now replace their previous results, the plot keeps its panels
        fresh = {row["attack"] for row in rows}
        rows = [row for row in previous.get("backdoors", []) if row["attack"] not in fresh] + rows
    report["backdoors"] = rows
    if not args.only:
        plot(examples, OUT / "attacks_cifar10.png")
    out_json.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
