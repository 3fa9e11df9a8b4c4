"""Every defense of the registry on strong CIFAR-10 victims: remaining ASR within the CDA budget.

What:     per attack (--attacks) a strong victim from the shared cache (benchmarks/victims.py: the pretrained
          ResNet-20 fine-tuned on the full poisoned training set; undefended non-target ASR >= 0.9 for BadNets
          and Blend, A-Blend 0.80 by design, WaNet 0.78 after 8 epochs), defended by every defense of
          guard.repair (--defenses; default list_defenses(): the repairs and MOTH) with a class-stratified
          --trusted-fraction of the clean training set (1 %: v_1% of pick_your_poison.txt Table 3). Each defense
          runs its registry defaults (Table 5 / the original papers), its step budgets multiplied by --scale
          (MOTH's budget is its epochs over the trusted set, which --scale leaves; it keeps its final model); CDA
          is measured on the first HELDOUT_IMAGES lossless test images, ASR (PyP's M2) on the same images stamped
          with the trigger. Per defense: the remaining ASR at the chosen point
          within the 2-point CDA budget (v_r, M10), its CDA, the whole trade-off curve and the wall time; the
          papers' figures beside them: Table 3 (Ours = Pivotal Tuning, WD, FP, NAD, NC; BadNets, A-Blend and
          WaNet rows) and MOTH's Table 8 (FP, MCR, MOTH; Blend row, accuracy / ASR after repair on ResNet-20).
Hardware: one job per (attack, defense), run as a guard.sweep grid: Ray tasks of --threads CPUs each (and one
          GPU each when CUDA is available) on a local Ray or --address; --serial runs them here one by one.
Output:   benchmarks/results/defenses_cifar10.json and .png (trade-off curves per attack, v_r bars), or --out;
          the sweep's store defenses_cifar10.sweep.json keys every job by its config, so an interrupted run
          resumes where it stopped (a defense already measured with the same config is not run again).
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/defenses_cifar10.py [--attacks badnets,blend]
          [--defenses fine-pruning,nad] [--scale 0.25] [--opt anp.eps=0.1] [--threads 2] [--serial]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch

import guard
from guard.attacks import load_record
from guard.data import ImageTensorDataset, load_dataset
from guard.metrics import attack_success_rate
from guard.models import GuardModel, create
from guard.repair import create_defense, get_defense, list_defenses, split_trusted
from guard.sweep import Grid, run_sweep
from guard.train import evaluate, predict
# benchmarks/victims.py: the shared cache of strong victims and the helpers every benchmark uses
from victims import (DEFENSE_VICTIMS, add_sweep_arguments, data_root, job_resources,
                     pick_device, results_name, victim)

SEED = 0
HELDOUT_IMAGES = 1000
ATTACKS = {name: DEFENSE_VICTIMS[name] for name in ("badnets", "blend", "adaptive-blend", "wanet")}
#: pick_your_poison.txt Table 3, CIFAR-10, v_1% (ALGORITHMS.md T3); moth_supplementary.txt Table 8, CIFAR-10
#: ResNet-20 Blend, (accuracy, ASR) after repair (T8)
PAPER = {"badnets": {"table3_v1": {"pivotal": 0.03, "weight-decay": 0.13, "fine-pruning": 0.69, "nad": 0.98,
                                   "nc": 0.13}},
         "adaptive-blend": {"table3_v1": {"pivotal": 0.00, "weight-decay": 0.45, "fine-pruning": 1.00, "nad": 1.00,
                                          "nc": 0.72}},
         "wanet": {"table3_v1": {"pivotal": 0.04, "weight-decay": 0.14, "fine-pruning": 0.14, "nad": 0.28,
                                 "nc": 0.28}},
         "blend": {"table8_acc_asr": {"fine-pruning": (0.8775, 0.0363), "mcr": (0.8553, 0.6358),
                                      "moth": (0.8908, 0.0)}}}
#: the step budgets of each config that --scale shrinks (eval_every is kept; steps round to a multiple of it)
STEP_FIELDS = ("steps", "teacher_steps", "endpoint_steps")
OUT = Path(__file__).parent / "results"


def defender_data(trusted_fraction: float, seed: int = SEED) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """The defender's class-stratified trusted split (drawn by ``seed``) of the clean training set and the held-out
    images."""
    root = data_root()
    train_set = load_dataset("cifar10", root, split="train")
    heldout = load_dataset("cifar10", root, split="test-lossless").subset(range(HELDOUT_IMAGES))
    return split_trusted(train_set, trusted_fraction, torch.Generator().manual_seed(seed)), heldout


def victim_options(attack_name: str, recipe: str = "finetune", options: dict | None = None) -> dict:
    """The options ``attack_name``'s victim is built with (default ATTACKS'); the scratch recipe keeps its own
    epochs."""
    options = dict(ATTACKS[attack_name] if options is None else options)
    if recipe != "finetune":
        options.pop("epochs", None)
    return options


def victim_model(attack_name: str, heldout: ImageTensorDataset, device: torch.device, options: dict | None = None,
                 recipe: str = "finetune", model: str = "resnet20") -> tuple[GuardModel, Callable[[GuardModel], float]]:
    """The cached strong victim of ``attack_name`` (``model`` built by ``recipe`` with :func:`victim_options`)
    and its ASR probe on the triggered ``heldout``."""
    v = victim(attack_name, recipe=recipe, model=model, **victim_options(attack_name, recipe, options))
    attack = load_record(v.record)
    triggered = attack.triggered(heldout)

    def probe(m: GuardModel) -> float:
        return attack_success_rate(predict(m, triggered, device=device), triggered.labels, attack.config.target)

    return create(v.model, weights=v.weights).to(device), probe


def scaled(name: str, scale: float):
    """The defense's default config with its step budgets times ``scale``."""
    config = get_defense(name).config_class()
    if scale == 1:
        return config
    changes = {}
    for field in STEP_FIELDS:
        if hasattr(config, field):
            value = max(1, round(getattr(config, field) * scale))
            if field == "steps":
                value = max(config.eval_every, round(value / config.eval_every) * config.eval_every)
            changes[field] = value
    scan = getattr(config, "scan", None)   # NC unlearning's trigger reverse engineering
    if scan is not None and hasattr(scan, "steps"):
        changes["scan"] = dataclasses.replace(scan, steps=max(1, round(scan.steps * scale)))
    return dataclasses.replace(config, **changes)


def parse_overrides(opts: list[str], defenses: list[str]) -> dict[str, dict]:
    """``--opt DEFENSE.FIELD=VALUE`` (repeatable) as ``{defense: {field: value}}``, each value of its field's
    type; a defense not in ``defenses`` or a field its config lacks stops the run with both named."""
    overrides: dict[str, dict] = {}
    for opt in opts:
        target, _, value = opt.partition("=")
        name, _, field = target.partition(".")
        default = getattr(get_defense(name).config_class(), field, None) if name in defenses else None
        if not value or default is None:
            raise SystemExit(f"--opt {opt!r}: expected DEFENSE.FIELD=VALUE for a field of one of {defenses}")
        try:
            overrides.setdefault(name, {})[field] = (value.lower() in ("1", "true") if isinstance(default, bool)
                                                     else type(default)(value))
        except ValueError:
            raise SystemExit(f"--opt {opt!r}: {name}.{field} takes {type(default).__name__} values like "
                             f"{default!r}, got {value!r}") from None
    return overrides


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(results["attacks"])
    fig, axes = plt.subplots(1, len(attacks) + 1, figsize=(5.5 * (len(attacks) + 1), 4.2))
    axes = list(axes) if len(attacks) else [axes]
    for ax, attack in zip(axes, attacks):
        row = results["attacks"][attack]
        for name, r in row["defenses"].items():
            cda = [100 * p["cda"] for p in r["history"]]
            asr = [100 * p["asr"] for p in r["history"]]
            ax.plot(cda, asr, marker=".", label=name)
        ax.axvline(100 * (row["cda"] - 0.02), color="grey", ls="--", lw=0.8)
        ax.set(title=f"{attack} (victim CDA {row['cda']:.3f}, ASR {row['asr']:.3f})", xlabel="CDA %",
               ylabel="ASR %")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    ax = axes[-1]
    names = sorted({n for row in results["attacks"].values() for n in row["defenses"]})
    width = 0.8 / max(1, len(attacks))
    for i, attack in enumerate(attacks):
        values = [100 * results["attacks"][attack]["defenses"].get(n, {}).get("v", float("nan")) for n in names]
        ax.bar([j + i * width for j in range(len(names))], values, width, label=attack)
    ax.set_xticks([j + width * (len(attacks) - 1) / 2 for j in range(len(names))], names, rotation=30, fontsize=8)
    ax.set(title=f"remaining ASR within 2 points CDA (v_{results['params']['trusted_fraction']:.0%})",
           ylabel="ASR %")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def repair_job(attack: str, defense: str, overrides: dict, scale: float, trusted_fraction: float,
               device: str) -> dict:
    """One grid point, run by the sweep (guard.sweep; a Ray task or the serial loop): the cached victim of
    ``attack`` repaired by ``defense`` with its scaled registry config and ``overrides``."""
    device = pick_device(device)
    trusted, heldout = defender_data(trusted_fraction)
    model, probe = victim_model(attack, heldout, device)
    config = dataclasses.replace(scaled(defense, scale), **overrides)
    started = time.perf_counter()
    result = create_defense(defense, config=config).defend(model, trusted, eval_set=heldout, asr=probe,
                                                           generator=torch.Generator().manual_seed(SEED), device=device)
    return {**result.to_dict(), "v": result.chosen.asr, "cda_after": result.chosen.cda,
            "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "victim_cda": evaluate(model, heldout, device=device), "victim_asr": probe(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--defenses", default=",".join(list_defenses()))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step budget (default 1: Table 5)")
    parser.add_argument("--opt", action="append", default=[], metavar="DEFENSE.FIELD=VALUE",
                        help="override a defense's config field (repeatable), e.g. anp.eps=0.1")
    parser.add_argument("--trusted-fraction", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each job (its declared CPUs)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    add_sweep_arguments(parser)
    parser.add_argument("--out", type=results_name,
                        default="defenses_cifar10", help="results name in benchmarks/results/")
    args = parser.parse_args()
    attacks, defenses = args.attacks.split(","), args.defenses.split(",")
    unknown = [a for a in attacks if a not in ATTACKS] + [d for d in defenses if d not in list_defenses()]
    if unknown:
        raise SystemExit(f"unknown attacks/defenses {unknown}; attacks: {list(ATTACKS)}, defenses: {list_defenses()}")
    overrides = parse_overrides(args.opt, defenses)
    if not 0 < args.scale <= 1:
        raise SystemExit(f"--scale must be in (0, 1], got {args.scale}")
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    for attack_name in attacks:  # built here, once, before jobs that share them run in parallel
        victim(attack_name, **ATTACKS[attack_name])
    grid = Grid(name=args.out, function=f"{Path(__file__).resolve()}:repair_job",
                params={"scale": args.scale, "trusted_fraction": args.trusted_fraction, "device": args.device},
                points=[{"attack": a, "defense": d, "overrides": overrides.get(d, {})}
                        for a in attacks for d in defenses],
                resources=job_resources(args.threads, device),
                out=OUT / f"{args.out}.sweep.json")
    out_json = OUT / f"{args.out}.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    results.update({
        "what": __doc__.splitlines()[0], "device": str(device), "threads": args.threads,
        "torch": torch.__version__, "guard": guard.__version__, "platform": platform.platform(),
        "params": {"trusted_fraction": args.trusted_fraction, "heldout_images": HELDOUT_IMAGES, "scale": args.scale,
                   "seed": SEED},
        "sweep": {"store": str(grid.out.relative_to(OUT.parent)), "backend": "serial" if args.serial else "ray"},
    })
    results.setdefault("attacks", {})
    report = run_sweep(grid, backend="serial" if args.serial else "ray", address=args.address, progress=True)
    for record in report.results.values():  # finished now or by an earlier run (the sweep resumes)
        if record["status"] != "ok":
            continue
        attack_name, name, r = record["params"]["attack"], record["params"]["defense"], dict(record["result"])
        row = results["attacks"].setdefault(attack_name, {"defenses": {}})
        row.update({"options": ATTACKS[attack_name], "cda": r.pop("victim_cda"), "asr": r.pop("victim_asr"),
                    "paper": PAPER.get(attack_name, {})})
        row["defenses"][name] = r
        print(f"{attack_name:8s} {name:13s} ASR {row['asr']:.3f} -> {r['v']:.3f} (CDA {row['cda']:.3f} -> "
              f"{r['cda_after']:.3f}) {r['wall_seconds']:.0f}s", flush=True)
    for failure in report.failed:
        print(f"FAILED {failure.job.params}: {failure.record['error']}", flush=True)
    out_json.write_text(json.dumps(results, indent=1))
    plot(results, OUT / f"{args.out}.png")
    print(f"wrote {out_json} and .png")


if __name__ == "__main__":
    main()
