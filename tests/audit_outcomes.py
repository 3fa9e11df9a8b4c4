"""Rerun the ``outcome``-marked tests over several seeds and both OpenMP wait policies; tabulate margins.

    python tests/audit_outcomes.py --seeds 0 1 2 3 4 --jobs 2 --out benchmarks/results/outcome_audit.json

Each run is ``pytest -m outcome`` with ``GUARD_TEST_SEED`` and ``OMP_WAIT_POLICY`` set (see tests/outcomes.py);
the table lists, per check, the smallest margin over all runs and how many runs failed it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(seed: int, policy: str, log: Path, threads: int, extra: list[str]) -> tuple[int, int, str, str]:
    env = dict(os.environ, GUARD_TEST_SEED=str(seed), OMP_WAIT_POLICY=policy, GUARD_MARGIN_LOG=str(log),
               OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "outcome", "-q", "-p", "no:cacheprovider", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    return seed, proc.returncode, policy, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--policies", nargs="+", default=["PASSIVE", "ACTIVE"])
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cores/jobs threads)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "outcome_audit.json")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. a test file)")
    args = parser.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with tempfile.TemporaryDirectory() as tmp:
        runs = list(itertools.product(args.seeds, args.policies))
        logs = [Path(tmp) / f"{s}-{p}.jsonl" for s, p in runs]
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda r: run(*r[0], r[1], threads, args.pytest_args), zip(runs, logs)))
        rows = [json.loads(line) for log in logs if log.exists() for line in log.read_text().splitlines()]
    for seed, code, policy, tail in results:
        print(f"seed {seed} {policy:7s} exit {code}: {tail}")
    table = defaultdict(list)
    for row in rows:
        table[(row["test"], row["check"])].append(row)
    summary = []
    for (test, what), checks in sorted(table.items()):
        worst = min(checks, key=lambda r: r["margin"])
        summary.append({"test": test, "check": what, "runs": len(checks),
                        "failed": sum(r["margin"] < 0 for r in checks), "min_margin": worst["margin"],
                        "value_at_min": worst["value"], "low": worst["low"], "high": worst["high"],
                        "worst_seed": worst["seed"], "worst_policy": worst["omp_wait_policy"]})
    width = max((len(f"{r['test']} [{r['check']}]") for r in summary), default=10)
    for r in summary:
        bound = f">= {r['low']}" if r["low"] is not None else f"<= {r['high']}"
        print(f"{r['test'] + ' [' + r['check'] + ']':{width}s}  runs {r['runs']:2d}  failed {r['failed']}  "
              f"min margin {r['min_margin']:+.3f} (value {r['value_at_min']:.3f} {bound})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "policies": args.policies,
                                    "runs": [dict(zip(("seed", "exit", "policy", "tail"), r)) for r in results],
                                    "checks": summary}, indent=2))
    sys.exit(1 if any(code for _, code, _, _ in results) else 0)


if __name__ == "__main__":
    main()
