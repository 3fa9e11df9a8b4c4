"""Soak and faults: the guarded and the unguarded endpoint under sustained mixed traffic; a worker killed under load.

What:     one real TorchServe serving the same CIFAR ResNet-20 weights twice — ReScaler on and off — one worker
          each, batch 16, 20 ms delay. Soak: CLIENTS threads send REQUESTS requests each to one endpoint, then to the
          other: PNG, JPEG, JSON {"image": base64} and multipart bodies of CIFAR-10 test images, and a share
          MALFORMED of bad ones (random bytes, a truncated PNG, an empty body, a wrong content type), which must
          get a 4xx. Per quarter of each run (by send time): p50/p99 latency of the good requests, the worker's
          resident memory (sampled every second), unexpected answers. Kill: the guarded worker gets SIGKILL
          while the clients send; the answers in flight, the seconds until the first prediction after it.
          Out of memory: a ResNet-18 at 224² (random weights; about 30 MB per image through ReScaler's pass) served
          with batch OOM_BATCH and a long delay, so every batch is full, under a memory cap of OOM_LIMIT_MB
          (guard config memory_limit_mb) that a full batch exceeds: OOM_ROUNDS full batches, each answered in
          halves by the same worker; beside it the same archive uncapped (the cost of the retries).
Goal:     no unexpected answer; worker RSS growth < 10 % from the first to the last quarter; no request
          unanswered past its timeout; service back within 30 s; out of memory: every request answered, a log
          line per retry, no worker restart.
Output:   benchmarks/results/serve_soak.json and .png (the JSON keeps the parts not rerun)
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/serve_soak.py [--requests 2000] [--clients 16]
          [--parts soak,kill,oom]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests
import torch
from PIL import Image

import guard
from guard import data
from guard.models import create, save_weights
from guard.serving import GuardConfig, ServerSettings, TorchServe, build_archive, free_ports
from serve_load import rss_mb, weights_file  # benchmarks/serve_load.py: worker RSS; pretrained (else random) weights

MODEL = "resnet20"
MALFORMED = 0.05
IMAGES = 200
TIMEOUT = 60.0
OUT = Path(__file__).parent / "results"
ENDPOINTS = {"guarded": True, "unguarded": False}
OOM_MODEL, OOM_BATCH, OOM_LIMIT_MB, OOM_ROUNDS = "resnet18", 16, 200, 5


def bodies(count: int) -> list[tuple[str, dict, bool]]:
    """(kind, requests.post keyword arguments, well-formed) for ``count`` CIFAR test images in four encodings, and
    the malformed kinds."""
    images = data.load_dataset("cifar10", data.data_dir(), split="test-lossless").images[:count]
    good = []
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        png, jpeg = io.BytesIO(), io.BytesIO()
        Image.fromarray(image).save(png, "PNG")
        Image.fromarray(image).save(jpeg, "JPEG", quality=90)
        kind = ("png", "jpeg", "json", "multipart")[i % 4]
        if kind == "png":
            good.append((kind, {"data": png.getvalue(), "headers": {"Content-Type": "image/png"}}, True))
        elif kind == "jpeg":
            good.append((kind, {"data": jpeg.getvalue(), "headers": {"Content-Type": "image/jpeg"}}, True))
        elif kind == "json":
            good.append((kind, {"json": {"image": base64.b64encode(png.getvalue()).decode()}}, True))
        else:
            good.append((kind, {"files": {"data": ("x.png", png.getvalue(), "image/png")}}, True))
    rng = np.random.default_rng(0)
    png = good[0][1]["data"]
    bad = [("random-bytes", {"data": rng.bytes(3000), "headers": {"Content-Type": "image/png"}}, False),
           ("truncated-png", {"data": png[: len(png) // 2], "headers": {"Content-Type": "image/png"}}, False),
           ("empty", {"data": b"", "headers": {"Content-Type": "image/png"}}, False),
           ("wrong-type", {"data": png, "headers": {"Content-Type": "text/plain"}}, False)]
    return good + bad


def soak(url: str, catalogue, clients: int, per_client: int, seed: int) -> list[dict]:
    """``clients`` threads, ``per_client`` requests each, malformed with probability MALFORMED."""
    good = [b for b in catalogue if b[2]]
    bad = [b for b in catalogue if not b[2]]
    log: list[dict] = []

    def client(k: int) -> None:
        rng = np.random.default_rng(seed + k)
        session = requests.Session()
        for _ in range(per_client):
            kind, kwargs, ok = (bad[rng.integers(len(bad))] if rng.random() < MALFORMED
                                else good[rng.integers(len(good))])
            sent = time.monotonic()
            try:
                status: object = session.post(url, timeout=TIMEOUT, **kwargs).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            log.append({"sent": sent, "seconds": time.monotonic() - sent, "status": status, "kind": kind,
                        "expected": "200" if ok else "4xx"})

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(log, key=lambda r: r["sent"])


def unexpected(r: dict) -> bool:
    if not isinstance(r["status"], int):
        return True
    return r["status"] != 200 if r["expected"] == "200" else not 400 <= r["status"] < 500


class RSSSampler:
    """The worker's resident memory every second, in a thread, while a phase runs."""

    def __init__(self, server: TorchServe, model: str) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server, model), daemon=True)

    def _run(self, server: TorchServe, model: str) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), rss_mb(server, model)))
            except (psutil.Error, OSError, RuntimeError):
                pass
            self._stop.wait(1.0)

    def __enter__(self) -> "RSSSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def quarters(log: list[dict], rss: list[tuple[float, float]]) -> list[dict]:
    start, end = log[0]["sent"], log[-1]["sent"] + 1e-9
    rows = []
    for q in range(4):
        lo, hi = start + q * (end - start) / 4, start + (q + 1) * (end - start) / 4
        part = [r for r in log if lo <= r["sent"] < hi]
        ok = [r["seconds"] for r in part if r["status"] == 200]
        mem = [m for t, m in rss if lo <= t < hi]
        rows.append({"requests": len(part), "unexpected": sum(map(unexpected, part)),
                     "p50_ms": round(1000 * float(np.percentile(ok, 50)), 1) if ok else None,
                     "p99_ms": round(1000 * float(np.percentile(ok, 99)), 1) if ok else None,
                     "rss_mb": round(float(np.mean(mem)), 1) if mem else None})
    return rows


def kill_under_load(server: TorchServe, name: str, catalogue, clients: int) -> dict:
    """SIGKILL the worker while ``clients`` threads send good requests; what they got and when service came back."""
    good = [b for b in catalogue if b[2]]
    url, log, stop = server.inference_url(name), [], threading.Event()

    def client(k: int) -> None:
        session, i = requests.Session(), k
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status: object = session.post(url, timeout=TIMEOUT, **good[i % len(good)][1]).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            log.append((sent, time.monotonic(), status))
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    (victim,) = server.worker_pids(name)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    while time.monotonic() < killed + 60 and not any(s == 200 and a > killed + 0.5 for _, a, s in log):
        time.sleep(0.1)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    after = [(s, a) for s, a, st in log if st == 200 and s > killed]
    failed = [str(st) for _, _, st in log if st != 200]
    return {"killed_pid": victim, "replacement_pid": server.worker_pids(name)[0], "requests": len(log),
            "errors": {k: failed.count(k) for k in sorted(set(failed))},
            "max_seconds": round(max(a - s for s, a, _ in log), 2),
            "recovery_seconds": round(after[0][1] - killed, 2) if after else None}


def out_of_memory(tmp: Path, body: dict) -> dict:
    """OOM_ROUNDS full batches to the capped and to the uncapped ResNet-18: statuses, seconds per batch, worker
    restarts, the handler's out-of-memory log lines."""
    weights = save_weights(create(OOM_MODEL, generator=torch.Generator().manual_seed(0)), tmp / "oom.pt")
    endpoints = {"capped": OOM_LIMIT_MB, "uncapped": None}
    for name, limit in endpoints.items():
        build_archive(OOM_MODEL, weights, tmp / "oom-store" / f"{name}.mar", GuardConfig(memory_limit_mb=limit))
    settings = ServerSettings(*free_ports(5), token_auth=False, batch_size=OOM_BATCH, max_batch_delay_ms=5000,
                              workers=1)
    rows = {}
    with TorchServe(tmp / "oom-run", tmp / "oom-store", {n: f"{n}.mar" for n in endpoints}, settings) as server:
        for name in endpoints:
            (worker,) = server.worker_pids(name)
            url, statuses, seconds = server.inference_url(name), [], []

            def post(_) -> object:
                try:
                    return requests.post(url, timeout=TIMEOUT * 4, **body).status_code
                except requests.RequestException as exc:
                    return type(exc).__name__

            for _ in range(OOM_ROUNDS):
                started = time.monotonic()
                with ThreadPoolExecutor(OOM_BATCH) as pool:
                    statuses += list(pool.map(post, range(OOM_BATCH)))
                seconds.append(time.monotonic() - started)
            model_log = (server.log_dir / "model_log.log").read_text(errors="replace")
            rows[name] = {
                "memory_limit_mb": endpoints[name], "requests": len(statuses),
                "statuses": {str(k): statuses.count(k) for k in sorted(set(statuses), key=str)},
                "seconds_per_batch": [round(x, 2) for x in seconds], "median_seconds_per_batch": round(
                    float(np.median(seconds)), 2), "worker_restarts": int(server.worker_pids(name) != [worker]),
                "worker_rss_mb": round(rss_mb(server, name), 1),
                "oom_log_lines": model_log.count(f"of the {OOM_BATCH}-request batch of {name}"),
                "example_log_line": next((line.split("guard: ", 1)[1] for line in model_log.splitlines()
                                          if f"batch of {name} (" in line), None)}
    rows["retry_cost"] = round(rows["capped"]["median_seconds_per_batch"]
                               / rows["uncapped"]["median_seconds_per_batch"], 2)
    return {"model": OOM_MODEL, "batch": OOM_BATCH, "rounds": OOM_ROUNDS, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per client (default 2000)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--parts", default="soak,kill,oom", help="which parts to run (default all)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    catalogue = bodies(IMAGES)
    out_json = OUT / "serve_soak.json"
    report = json.loads(out_json.read_text()) if out_json.is_file() else {}
    report.update({"what": __doc__.splitlines()[0], "torch": torch.__version__, "guard": guard.__version__,
                   "platform": platform.platform(), "cpus": os.cpu_count()})
    if "soak" in parts:
        report.update({"params": {"clients": args.clients, "requests_per_client": args.requests,
                                  "malformed": MALFORMED, "timeout_s": TIMEOUT,
                                  "kinds": sorted({k for k, _, _ in catalogue})}, "soak": {}})
    with tempfile.TemporaryDirectory(prefix="guard-soak-") as tmp:
        tmp = Path(tmp)
        if "oom" in parts:
            report["oom"] = out_of_memory(tmp, next(b for k, b, good in catalogue if good and k == "png"))
            print("oom", json.dumps(report["oom"]), flush=True)
        if parts & {"soak", "kill"}:
            soak_and_kill(tmp, catalogue, args, parts, report)
    OUT.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, OUT / "serve_soak.png")
    print(f"wrote {out_json} and .png")


def soak_and_kill(tmp: Path, catalogue, args, parts: set, report: dict) -> None:
    weights, source = weights_file(tmp)
    report["weights"] = source
    for name, enabled in ENDPOINTS.items():
        build_archive(MODEL, weights, tmp / "store" / f"{name}.mar", GuardConfig(enabled=enabled))
    settings = ServerSettings(*free_ports(5), token_auth=False, batch_size=16, max_batch_delay_ms=20, workers=1)
    with TorchServe(tmp / "run", tmp / "store", {n: f"{n}.mar" for n in ENDPOINTS}, settings) as server:
        for k, name in enumerate(ENDPOINTS if "soak" in parts else ()):
                started = time.monotonic()
                with RSSSampler(server, name) as rss:
                    log = soak(server.inference_url(name), catalogue, args.clients, args.requests, seed=1000 * k)
                seconds = time.monotonic() - started
                rows = quarters(log, rss.samples)
                first, last = rows[0]["rss_mb"], rows[-1]["rss_mb"]
                report["soak"][name] = {
                    "requests": len(log), "seconds": round(seconds, 1),
                    "requests_per_second": round(len(log) / seconds, 1),
                    "malformed": sum(r["expected"] == "4xx" for r in log),
                    "unexpected": sum(map(unexpected, log)),
                    "statuses": {s: sum(str(r["status"]) == s for r in log)
                                 for s in sorted({str(r["status"]) for r in log})},
                    "max_seconds": round(max(r["seconds"] for r in log), 2),
                    "rss_growth": round(last / first - 1, 4) if first and last else None, "quarters": rows}
                print(name, json.dumps({k: v for k, v in report["soak"][name].items() if k != "quarters"}), flush=True)
        if "kill" in parts:
            report["kill"] = kill_under_load(server, "guarded", catalogue, args.clients)
            print("kill", json.dumps(report["kill"]), flush=True)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, run in report["soak"].items():
        q = range(1, 5)
        axes[0].plot(q, [r["p99_ms"] for r in run["quarters"]], marker="o", label=f"{name} p99")
        axes[0].plot(q, [r["p50_ms"] for r in run["quarters"]], marker=".", ls="--", label=f"{name} p50")
        axes[1].plot(q, [r["rss_mb"] for r in run["quarters"]], marker="o", label=name)
    axes[0].set(title="latency per quarter of the run", xlabel="quarter", ylabel="ms")
    axes[1].set(title="worker RSS per quarter", xlabel="quarter", ylabel="MiB")
    for ax in axes:
        ax.legend(fontsize=8)
    kill = report.get("kill", {})
    fig.suptitle(f"soak: {report['params']['clients']} clients x {report['params']['requests_per_client']} requests; "
                 f"worker SIGKILL: service back in {kill.get('recovery_seconds')} s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
