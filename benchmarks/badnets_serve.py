"""BadNets through the guarded endpoint: are triggered inputs reverted, and does guard_estimated_asr move?

What:     a CIFAR ResNet-20 backdoored with a BadNets corner patch (the pretrained model fine-tuned on
          TRAIN_IMAGES training images, POISON_RATE of them stamped and relabelled to TARGET; poisons not
          augmented) is archived with the default guard config and served by a real TorchServe. Phase 1
          sends CLEAN clean test images, phase 2 TRIGGERED stamped test images of the other classes; after
          each phase the script scrapes guard_estimated_asr for the target class and counts the responses
          marked "reverted".
Reports:  the undefended attack success rate and clean accuracy, the defended attack success rate (share
          of triggered images still answered TARGET), the revert rates of clean and triggered traffic and the
          target-class gauge after each phase.
Measured: target airplane, 10 % poisons, 4 epochs: undefended clean accuracy 91.9 %, attack success 99.3 %.
          Served (eps 0.15, alpha 1, one step): clean accuracy 85.0 %, 15.7 % of clean answers reverted;
          triggered: 99.7 % undefended -> target, 96.3 % still target when guarded, 3.3 % reverted;
          guard_estimated_asr{class="airplane"} 0.18 after the clean phase, 0.05 after the triggered one.
          ReScaler does not revert this patch backdoor (its confident predictions give near-zero scalar
          gradients), so the gauge does not rise; see the module docstring of guard.serving.monitor.
Output:   benchmarks/results/badnets_serve.json and .png; the poisoned model is cached in runs/badnets/.
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/badnets_serve.py   (needs the data directory)
"""

from __future__ import annotations

import io
import json
import platform
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from guard import data
from guard.serving import ServerSettings, TorchServe, read_manifest
from guard.serving.demo import build_badnets_archive, stamp_trigger

TARGET = 0
POISON_RATE = 0.1
TRAIN_IMAGES = 10_000
EPOCHS = 4
CLEAN = 300
TRIGGERED = 300
CLIENTS = 8
CACHE = Path(__file__).resolve().parents[1] / "runs" / "badnets"
OUT = Path(__file__).parent / "results"
NAME = "resnet20_badnets"


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def send(server: TorchServe, images: torch.Tensor) -> list[dict]:
    bodies = [png(im) for im in images.permute(0, 2, 3, 1).numpy()]

    def post(body: bytes) -> dict:
        response = requests.post(server.inference_url(NAME), data=body, headers={"Content-Type": "image/png"},
                                 timeout=60)
        response.raise_for_status()
        return response.json()

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(post, bodies))


def target_gauge(server: TorchServe, name: str) -> float:
    time.sleep(0.5)
    text = requests.get(server.metrics_url, timeout=10).text
    match = re.search(rf'^guard_estimated_asr{{[^}}]*class="{name}"[^}}]*}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def main() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    archive, stats_file = CACHE / f"{NAME}.mar", CACHE / f"{NAME}.json"
    if archive.is_file() and stats_file.is_file():
        stats = json.loads(stats_file.read_text())
    else:
        archive, stats = build_badnets_archive(CACHE, name=NAME, target=TARGET, poison_rate=POISON_RATE,
                                               train_images=TRAIN_IMAGES, epochs=EPOCHS)
        stats_file.write_text(json.dumps(stats, indent=2))
    target_name = data.CIFAR10_CLASSES[TARGET]
    test = data.load_dataset("cifar10", split="test-lossless")
    clean = test.images[:CLEAN]
    others = test.images[test.labels != TARGET]
    triggered = stamp_trigger(others[:TRIGGERED])
    settings = ServerSettings(*free_ports(5), token_auth=False, batch_size=16, max_batch_delay_ms=20)
    with TorchServe(CACHE / "run", CACHE, {NAME: archive.name}, settings) as server:
        clean_answers = send(server, clean)
        gauge_clean = target_gauge(server, target_name)
        trig_answers = send(server, triggered)
        gauge_after = target_gauge(server, target_name)

    def share(answers, key, value=True):
        return float(np.mean([a[key] == value for a in answers]))

    report = {
        "benchmark": "badnets_serve", "target": target_name, "poison_rate": POISON_RATE,
        "train_images": TRAIN_IMAGES, "epochs": EPOCHS, "guard": read_manifest(archive).guard.to_dict(),
        "undefended": {"clean_accuracy": stats["clean_accuracy"], "attack_success_rate": stats["attack_success_rate"]},
        "served": {
            "clean_accuracy": float(np.mean([a["label"] == int(y) for a, y in zip(clean_answers, test.labels)])),
            "clean_reverted": share(clean_answers, "reverted"),
            "triggered_original_target": share(trig_answers, "original_label", TARGET),
            "triggered_defended_target": share(trig_answers, "label", TARGET),
            "triggered_reverted": share(trig_answers, "reverted"),
            "estimated_asr_target_after_clean": gauge_clean,
            "estimated_asr_target_after_triggered": gauge_after,
        },
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "badnets_serve.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, OUT / "badnets_serve.png")
    print(json.dumps(report, indent=2))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["served"]
    labels = ["clean\nreverted", "triggered\nreverted", "triggered ->\ntarget (undef.)",
              "triggered ->\ntarget (guarded)", f"est. ASR {report['target']}\nafter clean",
              f"est. ASR {report['target']}\nafter triggered"]
    values = [s["clean_reverted"], s["triggered_reverted"], s["triggered_original_target"],
              s["triggered_defended_target"], s["estimated_asr_target_after_clean"],
              s["estimated_asr_target_after_triggered"]]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar(labels, values, color=["tab:gray", "tab:red", "tab:orange", "tab:blue", "tab:green", "tab:green"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share")
    ax.set_title(f"BadNets (target {report['target']}) through the guarded endpoint, "
                 f"eps={report['guard']['rescaler']['eps']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
