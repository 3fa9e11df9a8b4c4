"""BadNets through the guarded endpoint: are triggered inputs reverted, and does guard_estimated_asr move?

What:     CIFAR ResNet-20 backdoored with a BadNets corner patch at several strengths (the pretrained model
          fine-tuned for EPOCHS epochs on TRAIN_IMAGES training images, a share POISON_RATES of them stamped
          and relabelled to TARGET; poisons not augmented), each archived with the default guard config
          (eps 0.15, alpha 1, one step) and served by a real TorchServe. Phase 1 sends CLEAN clean test
          images, phase 2 TRIGGERED stamped test images of the other classes; after each phase the script
          scrapes guard_estimated_asr for the target class and counts the responses marked "reverted".
Reports:  per poison rate: undefended clean accuracy and attack success rate, the revert rates of clean
          traffic and of triggered inputs the undefended model sent to the target, the defended attack
          success rate, and the target-class gauge after each phase.
Finding:  ReScaler's step is the gradient of the model's own cross-entropy, which vanishes as the prediction
          grows confident: weak backdoors (ASR well below 1) are reverted several times more often than
          clean inputs, so the gauge rises; a saturated backdoor (ASR ~0.99, confidence ~0.99) is reverted no
          more often than clean traffic. The figures of the last run are in results/badnets_serve.json.
Output:   benchmarks/results/badnets_serve.json and .png; poisoned models are cached in runs/badnets/.
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/badnets_serve.py   (needs the data directory)
"""

from __future__ import annotations

import io
import json
import platform
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from guard import data
from guard.serving import ServerSettings, TorchServe, free_ports, read_manifest
from guard.attacks import create_attack
from guard.serving.demo import build_badnets_archive

TARGET = 0
POISON_RATES = (0.005, 0.01, 0.02, 0.1)
TRAIN_IMAGES = 10_000
EPOCHS = 2
CLEAN = 300
TRIGGERED = 300
CLIENTS = 8
CACHE = Path(__file__).resolve().parents[1] / "runs" / "badnets"
OUT = Path(__file__).parent / "results"


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def send(server: TorchServe, name: str, images: torch.Tensor) -> list[dict]:
    bodies = [png(im) for im in images.permute(0, 2, 3, 1).numpy()]

    def post(body: bytes) -> dict:
        response = requests.post(server.inference_url(name), data=body, headers={"Content-Type": "image/png"},
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


def run_rate(rate: float, test: data.ImageTensorDataset) -> dict:
    name = f"resnet20_badnets_p{rate:g}".replace(".", "_")
    archive, stats_file = CACHE / f"{name}.mar", CACHE / f"{name}.json"
    if archive.is_file() and stats_file.is_file():
        stats = json.loads(stats_file.read_text())
    else:
        archive, stats = build_badnets_archive(CACHE, name=name, target=TARGET, poison_rate=rate,
                                               train_images=TRAIN_IMAGES, epochs=EPOCHS)
        stats_file.write_text(json.dumps(stats, indent=2))
    target_name = data.CIFAR10_CLASSES[TARGET]
    clean = test.images[:CLEAN]
    others = test.subset((test.labels != TARGET).nonzero().flatten()[:TRIGGERED])
    triggered = create_attack("badnets", target=TARGET, budget=rate).triggered(others).images
    settings = ServerSettings(*free_ports(5), token_auth=False, batch_size=16, max_batch_delay_ms=20)
    with TorchServe(CACHE / "run", CACHE, {name: archive.name}, settings) as server:
        clean_answers = send(server, name, clean)
        gauge_clean = target_gauge(server, target_name)
        trig_answers = send(server, name, triggered)
        gauge_after = target_gauge(server, target_name)
    hits = [a for a in trig_answers if a["original_label"] == TARGET]
    row = {
        "poison_rate": rate, "guard": read_manifest(archive).guard.to_dict(),
        "undefended": {"clean_accuracy": stats["clean_accuracy"], "attack_success_rate": stats["attack_success_rate"]},
        "served": {
            "clean_accuracy": float(np.mean([a["label"] == int(y) for a, y in zip(clean_answers, test.labels)])),
            "clean_reverted": float(np.mean([a["reverted"] for a in clean_answers])),
            "triggered_original_target": len(hits) / len(trig_answers),
            "triggered_defended_target": float(np.mean([a["label"] == TARGET for a in trig_answers])),
            "triggered_target_reverted": float(np.mean([a["reverted"] for a in hits])) if hits else 0.0,
            "estimated_asr_target_after_clean": gauge_clean,
            "estimated_asr_target_after_triggered": gauge_after,
        },
    }
    print(json.dumps(row["served"] | {"poison_rate": rate}), flush=True)
    return row


def main() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    test = data.load_dataset("cifar10", split="test-lossless")
    rows = [run_rate(rate, test) for rate in POISON_RATES]
    report = {"benchmark": "badnets_serve", "target": data.CIFAR10_CLASSES[TARGET], "train_images": TRAIN_IMAGES,
              "epochs": EPOCHS, "clean_requests": CLEAN, "triggered_requests": TRIGGERED, "rows": rows,
              "machine": {"platform": platform.platform(), "torch": torch.__version__}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "badnets_serve.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, OUT / "badnets_serve.png")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    keys = [("clean_reverted", "clean reverted"), ("triggered_target_reverted", "triggered->target reverted"),
            ("estimated_asr_target_after_clean", "gauge after clean"),
            ("estimated_asr_target_after_triggered", "gauge after triggered")]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        ax.bar([i + k * width for i in range(len(rows))], [r["served"][key] for r in rows], width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))],
                  [f"rate {r['poison_rate']:g}\nASR {r['undefended']['attack_success_rate']:.2f}" for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share")
    ax.set_title(f"BadNets (target {report['target']}) through the guarded endpoint, eps 0.15")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
