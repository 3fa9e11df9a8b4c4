"""Training throughput of guard.train.train in the standard and the channels-last memory layout.

What:     images/s of one epoch of ``guard.train.train`` (SGD, batch 128, crop/flip augmentation on the real
          CIFAR-10 training images) for the CIFAR ResNet-20 and ResNet-56 and the CIFAR PreAct ResNet-18, with
          ``channels_last=False`` (the standard layout) and ``channels_last=True``, and the speed-up. (Both take
          the same steps up to float rounding: tests/test_train.py.)
Why:      train() picks channels-last by itself on a CPU (``channels_last=None``); this is the measurement
          behind that default. On a GPU both layouts are measured but the default leaves the layout alone.
Method:   one untimed warm-up epoch of WARMUP_STEPS per layout, then REPEATS timed epochs of ``--steps`` steps,
          the layouts alternating; medians. CPU threads: --threads (2, the project's machine).
Output:   benchmarks/results/train_throughput.json and .png
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/train_throughput.py [--models resnet20] [--steps 10]
          [--device cuda] [--out NAME]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

import guard
from guard.data import load_dataset
from guard.models import create
from guard.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from victims import data_root, pick_device, results_name  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
MODELS = ("resnet20", "resnet56", "preact_resnet18")
BATCH = 128
WARMUP_STEPS = 2
REPEATS = 3


def epoch_seconds(model, images, steps: int, device: torch.device, channels_last: bool) -> float:
    """Wall time of one training epoch of ``steps`` batches (train()'s own per-epoch clock)."""
    config = TrainConfig.scratch(epochs=1, lr=0.01, batch_size=BATCH, steps_per_epoch=steps)
    result = train(model, images, config, generator=torch.Generator().manual_seed(0), device=device,
                   progress=False, channels_last=channels_last)
    return result.last.seconds


def measure(name: str, images, steps: int, device: torch.device) -> dict:
    models = {layout: create(name, generator=torch.Generator().manual_seed(0)).to(device) for layout in (False, True)}
    for layout, model in models.items():
        epoch_seconds(model, images, WARMUP_STEPS, device, layout)
    times = {False: [], True: []}
    for _ in range(REPEATS):
        for layout, model in models.items():
            times[layout].append(epoch_seconds(model, images, steps, device, layout))
    per_image = {layout: statistics.median(t) / (steps * BATCH) for layout, t in times.items()}
    row = {"model": name, "steps": steps, "batch_size": BATCH,
           "standard_img_s": round(1 / per_image[False], 1), "channels_last_img_s": round(1 / per_image[True], 1),
           "speedup": round(per_image[False] / per_image[True], 3),
           "seconds": {"standard": times[False], "channels_last": times[True]}}
    print(f"{name}: standard {row['standard_img_s']} img/s, channels-last {row['channels_last_img_s']} img/s "
          f"({row['speedup']}x)", flush=True)
    return row


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    x = torch.arange(len(rows)).float()
    fig, ax = plt.subplots(figsize=(1.8 + 1.8 * len(rows), 3.6))
    ax.bar((x - 0.2).tolist(), [r["standard_img_s"] for r in rows], width=0.4, label="standard layout")
    ax.bar((x + 0.2).tolist(), [r["channels_last_img_s"] for r in rows], width=0.4, label="channels-last")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['speedup']:.2f}x", (i + 0.2, r["channels_last_img_s"]), ha="center", va="bottom",
                    fontsize=8)
    ax.set_xticks(x.tolist(), [r["model"] for r in rows])
    ax.set_ylabel("training images/s")
    ax.set_title(f"guard.train.train, batch {BATCH}, {results['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"default: {','.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per epoch (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--out", type=results_name, default="train_throughput", help="results name")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"expected --steps >= 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    images = load_dataset("cifar10", data_root(), split="train").subset(range(args.steps * BATCH))
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    results = {"what": __doc__.splitlines()[0], "device": hardware, "torch": torch.__version__,
               "guard": guard.__version__, "python": platform.python_version(), "repeats": REPEATS,
               "rows": [measure(name, images, args.steps, device) for name in args.models.split(",") if name]}
    out = OUT / f"{args.out}.json"
    out.write_text(json.dumps(results, indent=2))
    plot(results, OUT / f"{args.out}.png")
    print(f"wrote {out} and .png")


if __name__ == "__main__":
    main()
