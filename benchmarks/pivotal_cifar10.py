"""Pivotal Tuning's hyper-parameter search on a CIFAR ResNet-20: trade-off curves over Table 5's search ranges.

What:     pick_your_poison.txt chose Table 5's CIFAR-10 values (lr 0.01, λ_S 0.05, λ_R 20,000) by a grid search
          on a self-poisoned BadNets ResNet-18 (11M parameters; ALGORITHMS.md S2, T5). This script repeats that
          search on the shared strong BadNets victim (benchmarks/victims.py, ResNet-20, 0.27M parameters): every
          point of --grid (a product over lr, slol_lambda, param_lambda and any other PivotalTuningConfig field)
          runs --steps steps on the 1 % trusted split of defenses_cifar10.py, WITHOUT the CDA stop, so the whole
          (CDA, ASR) curve is recorded every eval_every steps. From each curve: v_1% as the P4 loop reports it
          (the curve cut at the first point below CDA_0 − 2; M10), the lowest ASR anywhere within the budget
          (what a later evaluation would have found), and the CDA dip. Table 5's own point is always included.
          --recipe scratch searches on the victim trained from scratch on the same poisoned set instead (the
          paper's setting; RECIPES in benchmarks/victims.py), to tell the model's capacity from the victim's;
          --model resnet32|44|56 runs it on the same attack fine-tuned into a deeper pretrained CIFAR ResNet
          (0.46M-0.85M parameters), the capacity axis itself; --compare NAME,NAME,... puts finished results
          side by side (per configuration: v_1% against the model's parameters, and the curves; no run).
Hardware: one job per configuration, run as a guard.sweep grid: Ray tasks of --threads CPUs each (one GPU each
          when CUDA is available) on a local Ray or --address; --serial runs them here one by one.
Output:   benchmarks/results/pivotal_cifar10.json and .png (curves per lr; v_1% over λ_S × λ_R); the JSON
          accumulates: a configuration already measured is not run again. With --compare: --out's JSON holds each
          result's victim and summaries, its PNG the comparison.
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/pivotal_cifar10.py
          [--grid "lr=0.01,0.001;slol_lambda=0.05,0;param_lambda=20000"] [--steps 500] [--attack badnets]
          [--recipe scratch --out pivotal_cifar10_scratch] [--model resnet56 --out pivotal_cifar10_resnet56]
          --compare pivotal_cifar10_depth_resnet20,pivotal_cifar10_depth_resnet56 --out pivotal_cifar10_depth
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import guard
from defenses_cifar10 import (ATTACKS, HELDOUT_IMAGES, SEED,  # the same victims, split and held-out set
                              defender_data, victim_model, victim_options)
from guard.repair import PivotalTuningConfig, create_defense
from guard.sweep import Grid
from guard.train import evaluate
from victims import PRETRAINED, RECIPES, add_sweep_arguments, job_resources, pick_device, results_name, run_grid

OUT = Path(__file__).parent / "results"
DEFAULT_GRID = "lr=0.01,0.001;slol_lambda=0.1,0.01,0.001,0;param_lambda=20000,1000000"
BUDGET = 0.02


def parse_grid(spec: str) -> list[dict]:
    """``"a=1,2;b=3"`` -> every combination as ``[{"a": 1.0, "b": 3.0}, {"a": 2.0, "b": 3.0}]``."""
    fields = {f.name: f for f in dataclasses.fields(PivotalTuningConfig)}
    axes = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, values = part.partition("=")
        if name not in fields or not values:
            raise SystemExit(f"--grid: expected FIELD=v1,v2;... with FIELD one of {sorted(fields)}, got {part!r}")
        cast = type(getattr(PivotalTuningConfig(), name))
        axes[name] = [cast(float(v)) if cast in (int, float) else cast(v) for v in values.split(",")]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def summarize(history: list[dict], cda0: float) -> dict:
    """v_1% the P4 loop reports (curve cut at the first CDA breach), the best point anywhere in the budget."""
    floor = cda0 - BUDGET
    cut = next((i for i, p in enumerate(history) if p["cda"] <= floor), len(history))
    admissible = [p for p in history if p["cda"] > floor]
    p4 = min(history[:cut], key=lambda p: (p["asr"], -p["cda"]))
    best = min(admissible, key=lambda p: (p["asr"], -p["cda"]))
    return {"v_p4": p4["asr"], "cda_p4": p4["cda"], "step_p4": p4["step"], "stopped_at": history[cut]["step"]
            if cut < len(history) else None, "v_best": best["asr"], "cda_best": best["cda"], "step_best": best["step"],
            "min_cda": min(p["cda"] for p in history), "final": history[-1]}


def key(options: dict) -> str:
    return ",".join(f"{k}={options[k]:g}" if isinstance(options[k], float) else f"{k}={options[k]}"
                    for k in sorted(options))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    lrs = sorted({r["options"].get("lr", PivotalTuningConfig.lr) for r in runs.values()}, reverse=True)
    fig, axes = plt.subplots(1, len(lrs) + 1, figsize=(5.2 * (len(lrs) + 1), 4.2))
    cda0, asr0 = results["victim"]["cda"], results["victim"]["asr"]
    for ax, lr in zip(axes, lrs):
        for name, r in sorted(runs.items()):
            if r["options"].get("lr", PivotalTuningConfig.lr) != lr:
                continue
            label = ", ".join(f"{k.removesuffix('_lambda')} {v:g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in sorted(r["options"].items()) if k != "lr") or f"{r['steps']} steps"
            ax.plot([100 * p["cda"] for p in r["history"]], [100 * p["asr"] for p in r["history"]], marker=".",
                    label=label, lw=0.9)
        ax.axvline(100 * (cda0 - BUDGET), color="grey", ls="--", lw=0.8)
        ax.scatter([100 * cda0], [100 * asr0], color="k", zorder=5, s=20)
        ax.set(title=f"lr {lr:g}", xlabel="CDA % (1,000 held-out)", ylabel="ASR %")
        ax.invert_xaxis()
        ax.legend(fontsize=6)
    ax = axes[-1]
    names = sorted(runs, key=lambda n: runs[n]["summary"]["v_best"])
    ax.barh(range(len(names)), [100 * runs[n]["summary"]["v_best"] for n in names], color="tab:green",
            label="best point within 2 points CDA")
    ax.barh(range(len(names)), [100 * runs[n]["summary"]["v_p4"] for n in names], color="tab:red", alpha=0.4,
            label="P4 (stop at the first breach)")
    ax.set_yticks(range(len(names)), names, fontsize=5)
    ax.set(xlabel="remaining ASR % (v_1%)", title="v_1% per configuration")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(names: list[str], out: str) -> None:
    """Finished results side by side, grouped by victim (attack, recipe, model) over their seeds: per configuration
    measured in all of them, the best admissible ASR (v_1%) against the model's parameters (median, range and each
    seed), and every curve in CDA change; written to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = {}
    for name in names:
        path = OUT / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"--compare: expected finished results benchmarks/results/{name}.json, got no such file")
        loaded[name] = json.loads(path.read_text())
    shared = sorted(set.intersection(*(set(r["runs"]) for r in loaded.values())))
    if not shared:
        raise SystemExit(f"--compare: expected a configuration measured in all of {names}, got none in common")
    groups: dict[str, dict] = {}
    for name, r in loaded.items():
        label = f"{r.get('model', 'resnet20')} {r['attack']} ({r.get('recipe', 'finetune')})"
        g = groups.setdefault(label, {"parameters": r["params"]["model_parameters"], "victim": r["victim"],
                                      "results": [], "seeds": [], "summaries": {c: [] for c in shared}})
        g["results"].append(name)
        g["seeds"].append(r["params"]["seed"])
        for c in shared:
            g["summaries"][c].append(r["runs"][c]["summary"])
    for g in groups.values():
        for v in ("v_best", "v_p4"):
            g[v] = {c: {"median": statistics.median(s[v] for s in g["summaries"][c]),
                        "min": min(s[v] for s in g["summaries"][c]),
                        "max": max(s[v] for s in g["summaries"][c])} for c in shared}
    order = sorted(groups, key=lambda n: groups[n]["parameters"])
    fig, axes = plt.subplots(1, len(shared) + 1, figsize=(5 * (len(shared) + 1), 4.2))
    ax = axes[0]
    for config, marker in zip(shared, "osD^v"):
        x = [groups[n]["parameters"] / 1e6 for n in order]
        v = [groups[n]["v_best"][config] for n in order]
        line = ax.errorbar(x, [100 * m["median"] for m in v], marker=marker, capsize=3, label=f"{config} (median, "
                           "range over seeds)", yerr=[[100 * (m["median"] - m["min"]) for m in v],
                                                      [100 * (m["max"] - m["median"]) for m in v]])
        for n in order:
            ax.scatter([groups[n]["parameters"] / 1e6] * len(groups[n]["seeds"]),
                       [100 * s["v_best"] for s in groups[n]["summaries"][config]], s=10,
                       color=line[0].get_color(), alpha=0.5)
    ax.set(xlabel="model parameters (M)", ylabel="best ASR % within 2 points CDA (v_1%)", title="v_1% against capacity")
    ax.legend(fontsize=6)
    colors = dict(zip(order, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for ax, config in zip(axes[1:], shared):
        for n in order:
            for i, name in enumerate(groups[n]["results"]):
                history = loaded[name]["runs"][config]["history"]
                ax.plot([100 * (p["cda"] - history[0]["cda"]) for p in history], [100 * p["asr"] for p in history],
                        marker=".", lw=0.8, color=colors[n], label=n if i == 0 else None)
        ax.axvline(-100 * BUDGET, color="grey", ls="--", lw=0.8)
        ax.set(title=config, xlabel="CDA change (points)", ylabel="ASR %")
        ax.invert_xaxis()
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(OUT / f"{out}.png", dpi=120)
    plt.close(fig)
    (OUT / f"{out}.json").write_text(json.dumps({"what": "Pivotal Tuning's search compared across victims",
                                                 "configurations": shared, "groups": groups}, indent=1))
    for config in shared:
        print(config)
        for n in order:
            g, m = groups[n], groups[n]["v_best"][config]
            p4 = g["v_p4"][config]
            print(f"  {n:32s} {g['parameters'] / 1e6:.2f}M CDA {g['victim']['cda']:.3f} ASR {g['victim']['asr']:.3f}"
                  f" -> v_1% median {m['median']:.3f} (range {m['min']:.3f}-{m['max']:.3f}, seeds {g['seeds']}; steps "
                  f"{[s['step_best'] for s in g['summaries'][config]]}); P4 median {p4['median']:.3f} "
                  f"({p4['min']:.3f}-{p4['max']:.3f})")
    print(f"wrote {OUT / out}.json and .png")


def tune_job(attack: str, options: dict, steps: int, trusted_fraction: float, device: str,
             recipe: str = "finetune", model: str = "resnet20", seed: int = SEED) -> dict:
    """One configuration of the grid, run by the sweep (a Ray task or the serial loop): the whole curve."""
    device = pick_device(device)
    trusted, heldout = defender_data(trusted_fraction, seed)
    model, probe = victim_model(attack, heldout, device, recipe=recipe, model=model)
    config = PivotalTuningConfig(**{**options, "steps": steps, "max_cda_drop": 0.5})
    started = time.perf_counter()
    result = create_defense("pivotal", config=config).defend(
        model, trusted, eval_set=heldout, asr=probe, generator=torch.Generator().manual_seed(seed), device=device)
    history = [dataclasses.asdict(p) for p in result.history]
    return {"history": history, "summary": summarize(history, history[0]["cda"]),
            "wall_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default="badnets", choices=sorted(ATTACKS))
    parser.add_argument("--recipe", default="finetune", choices=sorted(RECIPES),
                        help="how the victim was trained (benchmarks/victims.py RECIPES; default finetune)")
    parser.add_argument("--model", default="resnet20", choices=sorted(PRETRAINED),
                        help="the victim's architecture (a pretrained CIFAR ResNet; default resnet20)")
    parser.add_argument("--grid", default=DEFAULT_GRID, help=f"FIELD=v1,v2;... (default {DEFAULT_GRID!r})")
    parser.add_argument("--steps", type=int, default=500, help="steps per configuration (Table 5: 2,000)")
    parser.add_argument("--trusted-fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=SEED, help=f"the trusted split's and the tuning's seed "
                        f"(default {SEED}, the defense table's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    add_sweep_arguments(parser)
    parser.add_argument("--out", type=results_name,
                        default="pivotal_cifar10", help="results name in benchmarks/results/")
    parser.add_argument("--compare", default=None, metavar="NAME,NAME,...",
                        help="put finished results side by side in --out instead of running")
    args = parser.parse_args()
    if args.compare:
        compare([results_name(n) for n in args.compare.split(",")], args.out)
        return
    grid = parse_grid(args.grid)
    table5 = {"lr": PivotalTuningConfig.lr, "slol_lambda": PivotalTuningConfig.slol_lambda,
              "param_lambda": PivotalTuningConfig.param_lambda}
    if not any(all(g.get(k, v) == v for k, v in table5.items()) for g in grid):
        grid.insert(0, dict(table5))
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    trusted, heldout = defender_data(args.trusted_fraction, args.seed)
    model, probe = victim_model(args.attack, heldout, device, recipe=args.recipe, model=args.model)

    out_json = OUT / f"{args.out}.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    stored = (results.get("attack", args.attack), results.get("recipe", "finetune" if results else args.recipe),
              results.get("model", "resnet20" if results else args.model),
              results.get("params", {}).get("seed", args.seed))
    if stored != (args.attack, args.recipe, args.model, args.seed):
        raise SystemExit(f"{out_json} holds the {' '.join(stored[:3])} victim tuned with seed {stored[3]}; pass --out "
                         f"for another attack, recipe, model or seed")
    results.update({
        "what": __doc__.splitlines()[0], "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "guard": guard.__version__, "platform": platform.platform(),
        "attack": args.attack, "recipe": args.recipe, "model": args.model,
        "victim": {"cda": evaluate(model, heldout, device=device), "asr": probe(model),
                   "options": victim_options(args.attack, args.recipe)},
        "params": {"trusted_fraction": args.trusted_fraction, "trusted_images": len(trusted),
                   "heldout_images": HELDOUT_IMAGES, "seed": args.seed, "budget": BUDGET,
                   "model_parameters": sum(p.numel() for p in model.parameters())},
        "table5": table5,
    })
    runs = results.setdefault("runs", {})
    sweep = Grid(name=args.out, function=f"{Path(__file__).resolve()}:tune_job",
                 params={"attack": args.attack, "steps": args.steps, "trusted_fraction": args.trusted_fraction,
                         "device": args.device, "recipe": args.recipe, "model": args.model,
                         "seed": args.seed},
                 points=[{"options": options} for options in grid if key({**options, "steps": args.steps}) not in runs],
                 resources=job_resources(args.threads, device),
                 out=OUT / f"{args.out}.sweep.json")
    for done in run_grid(sweep, args):
        if not done.ok:
            print(f"FAILED {done.job.params['options']}: {done.record['error']}", flush=True)
            continue
        options = done.job.params["options"]
        name = key({**options, "steps": args.steps})
        runs[name] = {"options": options, "steps": args.steps, **done.result}
        s = runs[name]["summary"]
        print(f"{name:60s} v_p4 {s['v_p4']:.3f} (stop {s['stopped_at']}) best {s['v_best']:.3f} "
              f"@{s['step_best']} (CDA {s['cda_best']:.3f}) min CDA {s['min_cda']:.3f} "
              f"{runs[name]['wall_seconds']:.0f}s", flush=True)
        out_json.write_text(json.dumps(results, indent=1))
    plot(results, OUT / f"{args.out}.png")
    out_json.write_text(json.dumps(results, indent=1))
    print(f"wrote {out_json} and .png")


if __name__ == "__main__":
    main()
