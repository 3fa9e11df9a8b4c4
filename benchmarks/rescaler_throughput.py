"""ReScaler throughput: plain inference vs guarded (batched) vs guarded one image at a time.

What:     images/s of (a) the plain model under inference_mode, (b) ReScaler.adapt on the whole batch
          (one forward + one backward + one forward), (c) ReScaler.adapt called once per image.
Models:   CIFAR ResNet-20 (3x32x32) and torchvision ResNet-18 (3x224x224), random weights (speed does not
          depend on the values).
Devices:  CPU (threads = TORCH_THREADS, 2 on the project's reference machine) and CUDA when available
          (fp32; bf16 autocast as an extra row).
Method:   WARMUP untimed calls, then REPEATS timed calls; medians. The one-image loop is timed on
          min(batch, LOOP_IMAGES) images (its cost is linear in the number of images) and reported as img/s.
          Everything runs twice, in child processes with OpenMP's default wait policy (threads spin between
          operations: fastest for single images on an idle machine) and with OMP_WAIT_POLICY=PASSIVE (threads
          sleep: what guard serve and make set, robust on shared cores, slower for tiny operations).
Output:   benchmarks/results/rescaler_throughput.json and .png
Run:      python benchmarks/rescaler_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import statistics
import time
from pathlib import Path

import torch

import guard
from guard.models import create

BATCHES = (1, 16, 64, 256)
MODELS = ("resnet20", "resnet18")
TORCH_THREADS = 2
WARMUP = 2
REPEATS = 5
LOOP_IMAGES = {"resnet20": 64, "resnet18": 8}
OUT = Path(__file__).parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, batch: int, device: torch.device, amp: torch.dtype | None, repeats: int) -> dict:
    model = create(name).to(device)
    rescaler = guard.ReScaler(model, eps=0.15, alpha=1.0, amp_dtype=amp)
    x = torch.rand(batch, *model.spec.input_size, device=device)
    n_loop = min(batch, LOOP_IMAGES[name])

    def plain():
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(x)

    def guarded():
        rescaler.adapt(x)

    def loop():
        for i in range(n_loop):
            rescaler.adapt(x[i:i + 1])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_plain = timed(plain, device, repeats, WARMUP)
    t_guarded = timed(guarded, device, repeats, WARMUP)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    t_loop = timed(loop, device, max(1, repeats // 2), 1)
    row = {
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "model": name, "batch": batch, "device": device.type, "amp": str(amp).replace("torch.", "") if amp else "fp32",
        "plain_img_s": batch / t_plain, "guarded_img_s": batch / t_guarded, "loop_img_s": n_loop / t_loop,
        "loop_images_timed": n_loop, "cuda_peak_mib": peak,
    }
    row["guarded_over_plain"] = row["guarded_img_s"] / row["plain_img_s"]
    row["guarded_over_loop"] = row["guarded_img_s"] / row["loop_img_s"]
    print(f"{row['omp_wait_policy']:8s} {name:9s} {row['device']:4s} {row['amp']:5s} B={batch:3d}  "
          f"plain {row['plain_img_s']:9.1f}  "
          f"guarded {row['guarded_img_s']:9.1f}  loop {row['loop_img_s']:8.1f} img/s  "
          f"guarded/plain {row['guarded_over_plain']:.2f}  guarded/loop {row['guarded_over_loop']:.1f}x", flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["device"], r["amp"], r["omp_wait_policy"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (model, device, amp, policy) in zip(axes[0], groups):
        sel = [r for r in rows
               if (r["model"], r["device"], r["amp"], r["omp_wait_policy"]) == (model, device, amp, policy)]
        b = [r["batch"] for r in sel]
        for key, label in (("plain_img_s", "plain"), ("guarded_img_s", "guarded (batched)"),
                           ("loop_img_s", "guarded (one at a time)")):
            ax.plot(b, [r[key] for r in sel], marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s",
               title=f"{model} {device} {amp}, OMP {policy}")
        ax.set_xticks(b, [str(v) for v in b])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure(quick: bool) -> list[dict]:
    torch.set_num_threads(TORCH_THREADS)
    batches = (1, 64) if quick else BATCHES
    repeats = 3 if quick else REPEATS
    setups = [(torch.device("cpu"), None)]
    if torch.cuda.is_available():
        setups += [(torch.device("cuda"), None), (torch.device("cuda"), torch.bfloat16)]
    return [bench(name, b, device, amp, repeats) for device, amp in setups for name in MODELS for b in batches]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1 and 64 only, 3 repeats")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)  # child process: write rows here
    args = parser.parse_args()
    if args.rows is not None:
        args.rows.write_text(json.dumps(measure(args.quick)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in ("default", "PASSIVE"):
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "default":
                env["OMP_WAIT_POLICY"] = policy
            out = Path(tmp) / f"{policy}.json"
            cmd = [sys.executable, __file__, "--rows", str(out)] + (["--quick"] if args.quick else [])
            subprocess.run(cmd, env=env, check=True)
            rows += json.loads(out.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": TORCH_THREADS, "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "repeats": 3 if args.quick else REPEATS, "warmup": WARMUP}
    (args.out / "rescaler_throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, args.out / "rescaler_throughput.png")
    print(f"wrote {args.out / 'rescaler_throughput.json'} and .png")


if __name__ == "__main__":
    main()
