"""A sweep on a local Ray vs the serial loop: the same grid of jobs, the wall time of each, the results compared.

What:     the victim zoo scan — for every cached victim of benchmarks/victims.py (--attacks; default all that are
          built), `guard eval --attack-record --rescaler --limit IMAGES --json`: CDA and ASR with and without
          ReScaler — run as one grid (guard.sweep, the built-in `commands` job) twice: serially in this process
          (each job on --threads threads, one after the other: the single-machine loop) and as Ray tasks on a
          local Ray (each job declares `cpus` = --threads / --parallel, --parallel jobs at a time).
Measures: wall seconds and jobs per minute of each, their ratio, and whether both give the same results (CDA,
          ASR, defended CDA and ASR per victim; the largest difference).
Hardware: the machine's cores (2 on the project's machine); CPU only.
Output:   benchmarks/results/sweep_throughput.json and .png; the two runs' stores under
          benchmarks/results/sweep_throughput/ (deleted first: every run measures from scratch).
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/sweep_throughput.py [--attacks badnets,blend]
          [--images 1000] [--threads 2] [--parallel 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

import guard
from guard.sweep import Grid, Resources, run_sweep
# benchmarks/victims.py: the shared cache of strong victims and the benchmarks' helpers
from victims import CACHE, DEFENSE_VICTIMS, data_root, results_name

OUT = Path(__file__).parent / "results"
METRICS = ("accuracy", "defended_accuracy")
ATTACK_METRICS = ("cda", "asr")


def zoo(attacks: list[str] | None) -> list[dict]:
    """The cached victims (weights + record) to scan, one grid point each."""
    points = []
    for record in sorted(CACHE.glob("*.pt.json")):
        data = json.loads(record.read_text())
        if "cda" not in data or (attacks and data["attack"] not in attacks):
            continue
        points.append({"victim": record.name[: -len(".pt.json")], "weights": str(record.with_suffix("")),
                       "record": str(record)})
    return points


def grid(points: list[dict], images: int, cpus: float, out: Path) -> Grid:
    command = ["eval", "--model", "resnet20", "--weights", "{weights}", "--attack-record", "{record}",
               "--data-dir", str(data_root()), "--split", "test-lossless", "--limit", str(images), "--rescaler",
               "--json"]
    return Grid(name="victim-zoo-scan", function="guard.sweep:commands", params={"commands": [command]},
                points=points, resources=Resources(cpus=cpus), out=out)


def summary(report) -> dict:
    rows = {}
    for record in report.results.values():
        r = record["result"] or {}
        attack = r.get("attack", {})
        rows[record["params"]["victim"]] = {
            **{m: r.get(m) for m in METRICS}, **{m: attack.get(m) for m in ATTACK_METRICS},
            **{f"defended_{m}": attack.get("defended", {}).get(m) for m in ATTACK_METRICS},
            "job_seconds": record["seconds"], "status": record["status"]}
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    names = list(runs)
    ax.bar(names, [runs[n]["wall_seconds"] for n in names], color=["tab:gray", "tab:blue"])
    for i, n in enumerate(names):
        ax.text(i, runs[n]["wall_seconds"], f"{runs[n]['jobs_per_minute']:.1f} jobs/min", ha="center", va="bottom")
    ax.set_ylim(0, 1.15 * max(runs[n]["wall_seconds"] for n in names))
    ax.set_ylabel("wall seconds")
    ax.set_title(f"{report['jobs']} jobs: Ray / serial throughput {report['ratio_ray_over_serial']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default=None, help="comma-separated attacks (default: every cached victim)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="threads of the machine (serial jobs use them all)")
    parser.add_argument("--parallel", type=int, default=2, help="Ray jobs at a time (each on threads/parallel)")
    parser.add_argument("--out", type=results_name, default="sweep_throughput")
    args = parser.parse_args()
    points = zoo(args.attacks.split(",") if args.attacks else None)
    if not points:
        raise SystemExit(f"no cached victims in {CACHE}; build some with: python benchmarks/victims.py badnets "
                         f"{' '.join(f'{k}={v}' for k, v in DEFENSE_VICTIMS['badnets'].items())}")
    stores = OUT / args.out
    shutil.rmtree(stores, ignore_errors=True)
    torch.set_num_threads(args.threads)
    runs, results = {}, {}
    for backend, cpus in (("serial", args.threads), ("ray", args.threads / args.parallel)):
        started = time.perf_counter()
        report = run_sweep(grid(points, args.images, cpus, stores / f"{backend}.json"), backend=backend,
                           num_cpus=args.threads, progress=True)
        wall = time.perf_counter() - started
        runs[backend] = {"wall_seconds": round(wall, 1), "jobs_per_minute": round(60 * report.ran / wall, 2),
                         "cpus_per_job": cpus, "failed": len(report.failed)}
        results[backend] = summary(report)
        print(f"{backend:6s} {report.ran} jobs in {wall:.1f} s ({runs[backend]['jobs_per_minute']:.2f} jobs/min), "
              f"{len(report.failed)} failed", flush=True)
    keys = ("accuracy", "defended_accuracy", "cda", "asr", "defended_cda", "defended_asr")
    differences = [abs(results["ray"][v][k] - results["serial"][v][k]) for v in results["serial"] for k in keys
                   if results["serial"][v][k] is not None and results["ray"].get(v, {}).get(k) is not None]
    out = {"what": __doc__.splitlines()[0], "torch": torch.__version__, "guard": guard.__version__,
           "platform": platform.platform(), "jobs": len(points), "images": args.images, "threads": args.threads,
           "parallel": args.parallel, "runs": runs,
           "ratio_ray_over_serial": round(runs["ray"]["jobs_per_minute"] / runs["serial"]["jobs_per_minute"], 3),
           "max_result_difference": max(differences, default=None), "results": results}
    (OUT / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    plot(out, OUT / f"{args.out}.png")
    print(f"Ray / serial: {out['ratio_ray_over_serial']:.2f}x; largest result difference "
          f"{out['max_result_difference']}; wrote {OUT / args.out}.json and .png")


if __name__ == "__main__":
    main()
