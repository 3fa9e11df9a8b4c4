"""Attacks aimed at the guard itself: what an attacker gains by knowing guard's scan, repair and endpoint.

What:     strong victims from the shared cache (benchmarks/victims.py: the pretrained ResNet-20 fine-tuned 3
          epochs on the full CIFAR-10 training set), each adaptive attack beside the non-adaptive one it adapts,
          BadNets (the same 3×3 checkerboard patch, target 0, 1 % poisons):
          pcb                   Pick your Poison's PCB (Alg. 5; A17): the backdoor gradient on a fixed 10 % of
                                every weight tensor — aimed at Pivotal Tuning's repair
          tsb                   PyP's TSB (Alg. 7; A16): 8 scattered noise triggers, all 8 at test time — aimed
                                at CNC's trigger inversion (and Pivotal Tuning)
          rescaler-aware        the attacker the endpoint invites: the backdoor trained through ReScaler's
                                adaptation (first order, at the served ε, α) — aimed at ReScaler's label; the
                                JSON's failed_runs keeps an earlier run with the detector term (evade_weight 1),
                                whose clean accuracy collapsed
Parts:    (--parts; the JSON accumulates per victim and part, so a run resumes where it stopped)
          victim    clean accuracy, undefended ASR and the attacker's training seconds (the cost of adapting)
          endpoint  the client's view through a real TorchServe (guard_end_to_end.py's measure: policies plain,
                    rescaler, detect-refuse, rescaler-refuse; detector calibrated at --fpr on lossless test images
                    0-699, traffic images 700-999)
          repair    Pivotal Tuning with 1 % trusted data at the configuration pivotal_cifar10.py found best on the
                    BadNets victim (lr 0.01, λ_S 0.01, λ_R 500, 500 steps): remaining ASR at the first 2-point CDA
                    breach (v_1%, M10) and the best point within the budget
          scan      CNC (5 inversion steps per class, guard scan's default) over the Pivotal Tuning of the repair
                    part cut at 150 steps (guard scan's default repair, 100 steps at λ_S 0.05, λ_R 20,000, breaks
                    the CDA budget at its first evaluation on these victims and then detects nothing): verdict,
                    flagged class, the target's calibrated score, its margin under the threshold and its rank
Clean-label (--clean-label): FC and BP poisons crafted through ReScaler's adaptation (rescaler_cifar10.ADAPTED:
          TransferConfig.adapted_aim 1, the saturated step), each beside the plain attack on the same goals, bases
          and victim seeds, in rescaler_cifar10.py's transfer setting and goal cache (its MODELS: backbones and
          goals): success without the defense, Table 1's defended ASR over the successes, and the served ASR —
          the share of ALL goals ReScaler answers with the poison class, the client's view — with the crafting
          seconds and the victims' validation accuracy (the attacker's cost).
Hardware: one guard.sweep job per (victim, part) of --threads CPUs (default 2; one GPU each with CUDA for the
          offline parts) on a local Ray, --address, or --serial in this process.
Output:   benchmarks/results/adaptive_cifar10.json and .png (per defense: non-adaptive beside adaptive).
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/adaptive_cifar10.py [--victims badnets,pcb]
          [--parts victim,endpoint,repair,scan]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

import guard
from defenses_cifar10 import SEED, defender_data, victim_model
from guard.data import load_dataset
from guard.detect import CalibratedTriggerInversion, CNCConfig
from guard.repair import PivotalTuningConfig, create_defense
from guard.sweep import Grid
from guard_end_to_end import measure
from pivotal_cifar10 import summarize
from rescaler_cifar10 import MODELS as TRANSFER_MODELS
from rescaler_cifar10 import ADAPTED, CHUNK, goal_path, pending_chunks, table_row
from victims import (DEFENSE_VICTIMS, add_sweep_arguments, data_root, job_resources, pick_device, run_grid,
                     results_name, victim)

#: label -> (attack, options); the first is the non-adaptive baseline every other row is compared with
VICTIMS = {"badnets": ("badnets", DEFENSE_VICTIMS["badnets"]),
           "pcb": ("pcb", {"target": 0}),
           "tsb": ("tsb", {"target": 0}),
           "rescaler-aware": ("rescaler-aware", {"target": 0})}
BASELINE = "badnets"
#: (adaptive attack, the defense it is aimed at, how it is read; higher = the attacker gains)
AIMED_AT = (("pcb", "repair", "Pivotal Tuning: remaining ASR (v_1%)"),
            ("pcb", "scan", "CNC: threshold − target's calibrated score (> 0: passes)"),
            ("tsb", "scan", "CNC: threshold − target's calibrated score (> 0: passes)"),
            ("tsb", "endpoint:detect-refuse", "endpoint, detector alone: attack success"),
            ("rescaler-aware", "endpoint:rescaler", "endpoint, ReScaler's label: attack success"),
            ("rescaler-aware", "endpoint:detect-refuse", "endpoint, detector alone: attack success"),
            ("rescaler-aware", "endpoint:rescaler-refuse", "endpoint, ReScaler + detector: attack success"))
PIVOTAL = {"lr": 0.01, "slol_lambda": 0.01, "param_lambda": 500.0, "steps": 500}
CNC = CNCConfig(repair=PivotalTuningConfig(**{**PIVOTAL, "steps": 150}))
OUT = Path(__file__).parent / "results"


def part_victim(label: str, device, fpr: float) -> dict:
    attack, options = VICTIMS[label]
    v = victim(attack, progress=False, **options)
    record = json.loads(v.record.read_text())
    return {"attack": attack, "options": options, "cda": v.cda, "asr": v.asr, "asr_nontarget": v.asr_nontarget,
            "train_seconds": record["train_seconds"]}


def part_endpoint(label: str, device, fpr: float) -> dict:
    attack, options = VICTIMS[label]
    test = load_dataset("cifar10", data_root(), split="test-lossless")
    return measure(attack, test, fpr, options=options, label=f"adaptive-{label}")


def part_repair(label: str, device, fpr: float) -> dict:
    attack, options = VICTIMS[label]
    trusted, heldout = defender_data(0.01)
    model, probe = victim_model(attack, heldout, device, options=options)
    config = PivotalTuningConfig(**{**PIVOTAL, "max_cda_drop": 0.5})  # the whole curve; the budget is cut below
    started = time.perf_counter()
    result = create_defense("pivotal", config=config).defend(
        model, trusted, eval_set=heldout, asr=probe, generator=torch.Generator().manual_seed(SEED), device=device)
    history = [dataclasses.asdict(p) for p in result.history]
    return {"config": PIVOTAL, "history": history, "summary": summarize(history, history[0]["cda"]),
            "seconds": round(time.perf_counter() - started, 1)}


def part_scan(label: str, device, fpr: float) -> dict:
    attack, options = VICTIMS[label]
    trusted, heldout = defender_data(0.01)
    model, _ = victim_model(attack, heldout, device, options=options)
    target = options["target"]
    started = time.perf_counter()
    scan = CalibratedTriggerInversion(CNC).scan(model, trusted, heldout, device=device,
                                                generator=torch.Generator().manual_seed(SEED))
    r = scan.report
    ranked = sorted(r.scores, key=r.scores.get, reverse=True)
    return {"backdoored": r.backdoored, "flagged_class": r.flagged_class, "threshold": r.threshold,
            "target_score": r.scores[target], "target_rank": ranked.index(target) + 1,
            "max_score": max(r.scores.values()), "scores": {str(c): s for c, s in r.scores.items()},
            "seconds": round(time.perf_counter() - started, 1)}


#: each part's measurement: (label, device, fpr) -> its JSON row
PARTS = {"victim": part_victim, "endpoint": part_endpoint, "repair": part_repair, "scan": part_scan}


def part_job(label: str, part: str, fpr: float, device: str) -> dict:
    """One (victim, part) cell, run by the sweep (guard.sweep; a Ray task or the serial loop)."""
    return PARTS[part](label, pick_device(device), fpr)


def headline(rows: dict) -> dict:
    """Per adaptive attack: the number of AIMED_AT for the baseline and for the attack, and the attacker's cost."""
    def value(row: dict, where: str):
        part, _, policy = where.partition(":")
        if part not in row:
            return None
        if part == "repair":
            return row["repair"]["summary"]["v_p4"]
        if part == "scan":
            return round(row["scan"]["threshold"] - row["scan"]["target_score"], 4)
        return row["endpoint"]["policies"][policy]["attack_success"]

    base = rows.get(BASELINE, {})
    table = {}
    for label, where, what in AIMED_AT:
        row = rows.get(label, {})
        entry = {"attack": label, "defense": what, "baseline": value(base, where), "adaptive": value(row, where)}
        if "victim" in row and "victim" in base:
            entry["cda_cost"] = round(base["victim"]["cda"] - row["victim"]["cda"], 4)
            entry["train_seconds"] = (base["victim"]["train_seconds"], row["victim"]["train_seconds"])
        table[f"{label} vs {where}"] = entry
    return table


def clean_label_rows(models: list[str], labels: list[str]) -> dict:
    """model -> adapted label -> Table 1's row (rescaler_cifar10.table_row) of the adapted attack and of the plain
    one, from the goal cache."""
    rows = {}
    for model in models:
        n = TRANSFER_MODELS[model][1]
        for label in labels:
            pair = {}
            for which, name in (("plain", ADAPTED[label][0]), ("adapted", label)):
                paths = [goal_path(model, name, i) for i in range(n)]
                pair[which] = table_row(model, name, [json.loads(p.read_text()) for p in paths if p.is_file()])
            rows.setdefault(model, {})[label] = pair
    return rows


def clean_label_headline(rows: dict) -> dict:
    """Per (adapted attack, backbone): the served ASR of the plain attack and of the adapted one, and the cost."""
    table = {}
    for model, labels in rows.items():
        for label, pair in labels.items():
            plain, adapted = pair["plain"], pair["adapted"]
            table[f"{label} ({model}) vs endpoint:rescaler"] = {
                "attack": label, "defense": f"{model}, ReScaler's label: served ASR over {adapted['goals']} goals",
                "baseline": plain["served_asr"], "adaptive": adapted["served_asr"],
                "success_undefended": (plain["sa_rate"], adapted["sa_rate"]),
                "craft_seconds": (plain["craft_seconds_median"], adapted["craft_seconds_median"]),
                # the victims' validation accuracy (%, over the successful goals), plain minus adapted
                "val_acc_cost": (round(plain["undefended_val_acc"][0] - adapted["undefended_val_acc"][0], 2)
                                 if "undefended_val_acc" in plain and "undefended_val_acc" in adapted else None)}
    return table


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["headline"]
    shown = [k for k, e in table.items() if e["adaptive"] is not None and e["baseline"] is not None]
    panels = [(f"supply-chain victims, ResNet-20 (baseline: {BASELINE})", f"{BASELINE} (not adaptive)",
               [k for k in shown if "success_undefended" not in table[k]]),
              ("clean-label, transfer setting: served ASR (baseline: the plain attack)", "plain attack",
               [k for k in shown if "success_undefended" in table[k]])]
    panels = [p for p in panels if p[2]]
    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(sum(1.5 * len(p[2]) + 1.5 for p in panels), 4.6),
                             gridspec_kw={"width_ratios": [len(p[2]) for p in panels]})
    for ax, (title, baseline, labels) in zip(axes[0], panels):
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [table[k]["baseline"] for k in labels], 0.4, label=baseline)
        ax.bar([x + 0.2 for x in xs], [table[k]["adaptive"] for k in labels], 0.4, label="adaptive attack")
        ax.set_xticks(list(xs), [f"{table[k]['attack']}\n{table[k]['defense']}".replace(": ", ":\n", 1)
                                 for k in labels], fontsize=5)
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=8)
    axes[0][0].set_ylabel("attacker's number (higher = the attack gains)")
    fig.suptitle("attacks aimed at guard, CIFAR-10 (CPU scale)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victims", default=",".join(VICTIMS))
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--fpr", type=float, default=0.01, help="the endpoint detector's false-positive rate")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    add_sweep_arguments(parser)
    parser.add_argument("--clean-label", default=",".join(ADAPTED),
                        help="adapted clean-label attacks to measure ('' for none; see the header)")
    parser.add_argument("--clean-label-models", default=",".join(TRANSFER_MODELS))
    parser.add_argument("--out", type=results_name,
                        default="adaptive_cifar10", help="results name in benchmarks/results/")
    args = parser.parse_args()
    labels, parts = [v for v in args.victims.split(",") if v], [p for p in args.parts.split(",") if p]
    clean_labels = [a for a in args.clean_label.split(",") if a]
    clean_models = [m for m in args.clean_label_models.split(",") if m]
    bad = ([v for v in labels if v not in VICTIMS] + [p for p in parts if p not in PARTS]
           + [a for a in clean_labels if a not in ADAPTED] + [m for m in clean_models if m not in TRANSFER_MODELS])
    if bad:
        raise SystemExit(f"unknown {bad}; victims: {list(VICTIMS)}, parts: {list(PARTS)}, clean-label attacks: "
                         f"{list(ADAPTED)}, models: {list(TRANSFER_MODELS)}")
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    out_json = OUT / f"{args.out}.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    results.update({"what": __doc__.splitlines()[0], "device": str(device), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "guard": guard.__version__, "platform": platform.platform(),
                    "params": {"fpr": args.fpr, "pivotal": PIVOTAL, "cnc": dataclasses.asdict(CNC),
                               "trusted_fraction": 0.01, "seed": SEED}})
    rows = results.setdefault("victims", {})
    for label in labels:  # victims are built here, once, before the cells that share them run in parallel
        victim(VICTIMS[label][0], progress=False, **VICTIMS[label][1])
    grid = Grid(name=args.out, function=f"{Path(__file__).resolve()}:part_job",
                params={"fpr": args.fpr, "device": args.device},
                points=[{"label": label, "part": part} for label in labels for part in parts
                        if part not in rows.get(label, {})],  # else measured by an earlier run
                resources=job_resources(args.threads, device))
    for done in run_grid(grid, args):
        label, part = done.job.params["label"], done.job.params["part"]
        if not done.ok:
            print(f"FAILED {label} {part}: {done.record['error']}", flush=True)
            continue
        rows.setdefault(label, {})[part] = done.result
        print(f"{label:22s} {part:9s} {done.record['seconds']:6.0f} s", flush=True)
        results["headline"] = headline(rows)
        out_json.write_text(json.dumps(results, indent=1, default=str))
    if clean_labels:  # rescaler_cifar10's goal chunks: the adapted attacks and, where not cached yet, the plain ones
        wanted = clean_labels + sorted({ADAPTED[a][0] for a in clean_labels})
        chunks = [c for m in clean_models for c in pending_chunks(m, wanted, TRANSFER_MODELS[m][1], CHUNK)]
        grid = Grid(name=f"{args.out}-clean-label", points=chunks, resources=job_resources(args.threads, device),
                    function=f"{Path(__file__).resolve().parent / 'rescaler_cifar10.py'}:chunk_job")
        for done in run_grid(grid, args):
            p = done.job.params
            status = f"{done.result['successes']} successes" if done.ok else f"FAILED: {done.record['error']}"
            print(f"{p['model']} {p['attack']} goals {p['indices'][0]}-{p['indices'][-1]}: {status}", flush=True)
        for model, pairs in clean_label_rows(clean_models, clean_labels).items():
            results.setdefault("clean_label", {}).setdefault(model, {}).update(pairs)
    results["headline"] = {**headline(rows), **clean_label_headline(results.get("clean_label", {}))}
    out_json.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results["headline"], indent=1))
    plot(results, OUT / f"{args.out}.png")
    print(f"wrote {out_json} and .png")


if __name__ == "__main__":
    main()
