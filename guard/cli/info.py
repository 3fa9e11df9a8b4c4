"""``guard info``: what this installation provides (models, block types ReScaler adapts, attacks, detectors,
per-input detectors, defenses, versions)."""

from __future__ import annotations

import argparse
import json

from importlib.metadata import version

import torch

from guard.attacks import describe_attacks
from guard.detect import describe_detectors, describe_input_detectors
from guard.cleanse import describe_cleansers
from guard.metrics import METRICS
from guard.models import get_spec, list_models
from guard.repair import describe_defenses
from guard.rescaler import registered_blocks


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="list registered models and capabilities")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def collect() -> dict:
    models = {}
    for name in list_models():
        spec = get_spec(name)
        models[name] = {"family": spec.family, "input_size": list(spec.input_size), "mean": list(spec.mean),
                        "std": list(spec.std), "description": spec.description}
    return {
        "version": version("guard"),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "models": models,
        "rescaler_blocks": [f"{c.__module__}.{c.__qualname__}" for c in registered_blocks()],
        "attacks": describe_attacks(),
        "detectors": describe_detectors(),
        "input_detectors": describe_input_detectors(),
        "defenses": describe_defenses(),
        "cleansers": describe_cleansers(),
        "metrics": dict(METRICS),
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"guard {info['version']} (torch {info['torch']}, CUDA {'yes' if info['cuda_available'] else 'no'})")
    print("models:")
    for name, m in info["models"].items():
        size = "x".join(map(str, m["input_size"]))
        print(f"  {name:<24} {m['family']:<9} {size:<10} {m['description']}")
    print("ReScaler block types:")
    for block in info["rescaler_blocks"]:
        print(f"  {block}")
    print("attacks:")
    for name, a in info["attacks"].items():
        label = "clean-label" if a["clean_label"] else "poison-label"
        print(f"  {name:<16} {a['kind']:<12} {label:<13} {a['description']}")
    print("detectors (guard scan --method):")
    for name, d in info["detectors"].items():
        print(f"  {name:<16} {d['description']}")
    print("per-input detectors (score every request):")
    for name, d in info["input_detectors"].items():
        print(f"  {name:<16} {d['forward_passes']:>3} passes  {d['description']}")
    print("defenses (guard repair / guard harden --method):")
    for name, d in info["defenses"].items():
        print(f"  {name:<16} {d['kind']:<9} {d['description']}")
    print("training-set cleansing (guard cleanse --method):")
    for name, c in info["cleansers"].items():
        print(f"  {name:<16} {c['description']}")
    return 0
