"""Serving load: the guarded endpoint vs the same model served unguarded, under the same batching.

What:     CLIENTS concurrent HTTP clients (threads, one keep-alive session each) post CIFAR-10 test PNGs
          for SECONDS to each endpoint; requests/s, p50/p99 latency, and the worker's resident memory
          before the first request and after the last.
Setup:    one TorchServe (real server, loopback) serving two archives of the same CIFAR ResNet-20
          weights — ReScaler on (eps 0.15, alpha 1, one step) and off — each with one worker, batch
          size BATCH_SIZE and MAX_BATCH_DELAY_MS; the clients run on the same machine and share its CPUs.
Method:   WARMUP_SECONDS of untimed load per endpoint, then ROUNDS timed rounds alternating between the
          endpoints; requests/s is the median over rounds, latencies are pooled over rounds.
Floors:   guarded >= 0.3x unguarded requests/s, guarded p99 <= 3x unguarded p99.
Measured: 2 shared CPU cores (load average ~4 from other jobs), torch 2.14, TorchServe 0.12, pretrained
          ResNet-20, CIFAR PNGs, 16 clients x 3 rounds x 15 s: guarded 171.5 req/s (p50 74 ms, p99 231 ms),
          unguarded 437.1 req/s (p50 35 ms, p99 84 ms): 0.39x throughput, 2.74x p99; mean server batch
          15.5 / 15.8; worker RSS 683 -> 767 MB guarded, 683 -> 713 MB unguarded; no non-200 answers.
Workers:  --parts workers: the guarded endpoint alone with 1 and 2 worker processes (--workers), the cores
          divided between them (guard serve --workers), same clients and rounds: requests/s and p99 per count.
Output:   benchmarks/results/serve_load.json and .png; the workers part adds its rows under "workers"
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/serve_load.py [--quick] [--parts endpoints,workers]
          (without the data directory: random weights and random images; speed does not depend on them)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests
import torch
from PIL import Image

import guard
from guard import data, models
from guard.serving import GuardConfig, ServerSettings, TorchServe, build_archive, free_ports

MODEL = "resnet20"
CLIENTS = 16
SECONDS = 15.0
WARMUP_SECONDS = 3.0
ROUNDS = 3
BATCH_SIZE = 16
MAX_BATCH_DELAY_MS = 20
IMAGES = 256
OUT = Path(__file__).parent / "results"
ENDPOINTS = {"guarded": True, "unguarded": False}


def pngs(count: int) -> tuple[list[bytes], str]:
    root = data.data_dir()
    try:
        images = data.load_dataset("cifar10", root, split="test-lossless").images[:count]
        source = "CIFAR-10 lossless test images"
    except FileNotFoundError:
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
        source = "random images"
    out = []
    for image in images.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")
        out.append(buf.getvalue())
    return out, source


def weights_file(tmp: Path) -> tuple[Path, str]:
    pretrained = data.data_dir() / "weights" / "resnet20-12fca82f.th"
    if pretrained.is_file():
        return pretrained, "pretrained"
    return models.save_weights(models.create(MODEL), tmp / "random.pt"), "random"


def load(url: str, headers: dict, bodies: list[bytes], seconds: float, clients: int) -> tuple[int, list[float], int]:
    """``clients`` threads posting for ``seconds``: (completed 200s, their latencies in s, non-200 count)."""
    deadline = time.perf_counter() + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures = [0] * clients

    def client(k: int) -> None:
        session = requests.Session()
        session.headers.update({**headers, "Content-Type": "image/png"})
        i = k
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            response = session.post(url, data=bodies[i % len(bodies)], timeout=120)
            if response.status_code == 200:
                latencies[k].append(time.perf_counter() - start)
            else:
                failures[k] += 1
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pooled = [v for per in latencies for v in per]
    return len(pooled), pooled, sum(failures)


def rss_mb(server: TorchServe, model: str) -> float:
    return sum(psutil.Process(pid).memory_info().rss for pid in server.worker_pids(model)) / 2**20


def measure_workers(counts: list[int], bodies: list[bytes], seconds: float, warmup: float, rounds: int) -> dict:
    """The guarded endpoint served alone by each worker count (threads: cores / workers), one server each."""
    rows = {}
    with tempfile.TemporaryDirectory(prefix="serve-workers-") as tmp:
        tmp = Path(tmp)
        weights, _ = weights_file(tmp)
        mar = build_archive(MODEL, weights, tmp / "store" / f"{MODEL}.mar",
                            GuardConfig(class_names=data.CIFAR10_CLASSES))
        for workers in counts:
            settings = ServerSettings(*free_ports(5), token_auth=False, batch_size=BATCH_SIZE,
                                      max_batch_delay_ms=MAX_BATCH_DELAY_MS, workers=workers)
            with TorchServe(tmp / f"run{workers}", mar.parent, {MODEL: mar.name}, settings) as server:
                url = server.inference_url(MODEL)
                load(url, {}, bodies, warmup, CLIENTS)
                per_round, latencies, failures = [], [], 0
                for _ in range(rounds):
                    done, lat, failed = load(url, {}, bodies, seconds, CLIENTS)
                    per_round.append(done / seconds)
                    latencies += lat
                    failures += failed
                rows[str(workers)] = {"workers": workers, "threads_per_worker": server.worker_threads,
                                      "requests_per_s": statistics.median(per_round),
                                      "rounds_requests_per_s": per_round,
                                      "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
                                      "p99_ms": 1e3 * float(np.percentile(latencies, 99)), "non_200": failures,
                                      "worker_rss_mb": rss_mb(server, MODEL)}
                print(f"guarded, {workers} worker(s) x {server.worker_threads} thread(s): "
                      f"{rows[str(workers)]['requests_per_s']:.1f} req/s, p99 {rows[str(workers)]['p99_ms']:.0f} ms",
                      flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short rounds (a smoke run, not a measurement)")
    parser.add_argument("--parts", default="endpoints,workers", help="endpoints (guarded vs unguarded), workers")
    parser.add_argument("--workers", default="1,2", help="worker counts of the workers part")
    args = parser.parse_args()
    seconds, warmup, rounds = (3.0, 1.0, 1) if args.quick else (SECONDS, WARMUP_SECONDS, ROUNDS)
    bodies, source = pngs(IMAGES)
    parts = args.parts.split(",")
    if "workers" in parts:
        counts = [int(w) for w in args.workers.split(",")]
        rows = measure_workers(counts, bodies, seconds, warmup, rounds)
        out = OUT / "serve_load.json"
        report = json.loads(out.read_text()) if out.is_file() else {"benchmark": "serve_load"}
        report["workers"] = {"clients": CLIENTS, "batch_size": BATCH_SIZE, "seconds_per_round": seconds,
                             "rounds": rounds, "quick": args.quick, "cpu_count": os.cpu_count(), "rows": rows}
        if len(counts) > 1:
            report["workers"]["throughput_ratio"] = (rows[str(counts[-1])]["requests_per_s"]
                                                     / rows[str(counts[0])]["requests_per_s"])
        OUT.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    if "endpoints" not in parts:
        return
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        weights, weights_kind = weights_file(tmp)
        store = tmp / "store"
        mars = {name: build_archive(MODEL, weights, store / f"{MODEL}_{name}.mar",
                                    GuardConfig(enabled=enabled, class_names=data.CIFAR10_CLASSES)).name
                for name, enabled in ENDPOINTS.items()}
        settings = ServerSettings(*free_ports(5), token_auth=False, batch_size=BATCH_SIZE,
                                  max_batch_delay_ms=MAX_BATCH_DELAY_MS, workers=1)
        names = {name: mar.removesuffix(".mar") for name, mar in mars.items()}
        with TorchServe(tmp / "run", store, {names[n]: mars[n] for n in ENDPOINTS}, settings) as server:
            rss_before = {n: rss_mb(server, names[n]) for n in ENDPOINTS}
            for n in ENDPOINTS:
                load(server.inference_url(names[n]), {}, bodies, warmup, CLIENTS)
            per_round: dict[str, list[float]] = {n: [] for n in ENDPOINTS}
            latencies: dict[str, list[float]] = {n: [] for n in ENDPOINTS}
            failures = {n: 0 for n in ENDPOINTS}
            for r in range(rounds):
                for n in ENDPOINTS:
                    done, lat, failed = load(server.inference_url(names[n]), {}, bodies, seconds, CLIENTS)
                    per_round[n].append(done / seconds)
                    latencies[n] += lat
                    failures[n] += failed
                    print(f"round {r + 1}/{rounds} {n:9s}: {done / seconds:7.1f} req/s, "
                          f"p50 {1e3 * np.percentile(lat, 50):6.1f} ms, p99 {1e3 * np.percentile(lat, 99):6.1f} ms")
            rss_after = {n: rss_mb(server, names[n]) for n in ENDPOINTS}
            batch_mean = _mean_batch(requests.get(server.metrics_url, timeout=10).text)

    results = {n: {"requests_per_s": statistics.median(per_round[n]), "rounds_requests_per_s": per_round[n],
                   "p50_ms": 1e3 * float(np.percentile(latencies[n], 50)),
                   "p99_ms": 1e3 * float(np.percentile(latencies[n], 99)),
                   "requests": len(latencies[n]), "non_200": failures[n],
                   "worker_rss_mb_before": rss_before[n], "worker_rss_mb_after": rss_after[n],
                   "mean_server_batch": batch_mean.get(names[n])}
               for n in ENDPOINTS}
    g, u = results["guarded"], results["unguarded"]
    ratios = {"throughput_guarded_over_unguarded": g["requests_per_s"] / u["requests_per_s"],
              "p99_guarded_over_unguarded": g["p99_ms"] / u["p99_ms"]}
    floors = {"throughput >= 0.3x": ratios["throughput_guarded_over_unguarded"] >= 0.3,
              "p99 <= 3x": ratios["p99_guarded_over_unguarded"] <= 3.0}
    report = {
        "benchmark": "serve_load", "quick": args.quick, "model": MODEL, "weights": weights_kind, "images": source,
        "clients": CLIENTS, "seconds_per_round": seconds, "warmup_seconds": warmup, "rounds": rounds,
        "batch_size": BATCH_SIZE, "max_batch_delay_ms": MAX_BATCH_DELAY_MS,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "guard": guard.__version__},
        "results": results, "ratios": ratios, "floors_met": floors,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    previous = OUT / "serve_load.json"
    if previous.is_file() and "workers" in json.loads(previous.read_text()):
        report["workers"] = json.loads(previous.read_text())["workers"]
    (OUT / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, OUT / "serve_load.png")
    print(json.dumps({"results": results, "ratios": ratios, "floors_met": floors}, indent=2))


def _mean_batch(metrics: str) -> dict[str, float]:
    sums, counts = {}, {}
    for line in metrics.splitlines():
        for suffix, into in (("_sum", sums), ("_count", counts)):
            if line.startswith(f"guard_batch_size{suffix}{{"):
                model = line.split('model_name="', 1)[1].split('"', 1)[0]
                into[model] = float(line.rsplit(" ", 1)[1])
    return {m: sums[m] / counts[m] for m in sums if counts.get(m)}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    res = [report["results"][n] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(names, [r["requests_per_s"] for r in res], color=["tab:blue", "tab:gray"])
    left.set_ylabel("requests / s (median over rounds)")
    left.set_title(f"{report['clients']} clients, batch {report['batch_size']}")
    x = np.arange(len(names))
    right.bar(x - 0.2, [r["p50_ms"] for r in res], 0.4, label="p50")
    right.bar(x + 0.2, [r["p99_ms"] for r in res], 0.4, label="p99")
    right.set_xticks(x, names)
    right.set_ylabel("latency (ms)")
    right.legend()
    ratio = report["ratios"]
    fig.suptitle(f"{report['model']} on TorchServe: guarded/unguarded throughput "
                 f"{ratio['throughput_guarded_over_unguarded']:.2f}x, p99 {ratio['p99_guarded_over_unguarded']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
