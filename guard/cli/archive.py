"""``guard archive``: package a registered model and its weights as a TorchServe archive for a guarded endpoint.

Example::

    guard archive --model resnet20 --weights resnet20-12fca82f.th --guard-config guard.json \\
        --out model_store/resnet20.mar

``--guard-config`` is a JSON file with any of the fields of ``guard.serving.GuardConfig``, e.g.
``{"rescaler": {"eps": 0.15, "alpha": 1.0, "steps": 1}, "top_k": 3, "class_names": [...]}``.

``--scan report.json`` (``guard scan --out``) exports the scan's per-class anomaly scores and verdict as
gauges; ``--repaired ckpt`` (``guard repair --out``) adds a per-request backdoor score to every answer;
``--detector`` (``guard calibrate --out``) a per-request trigger score and flag, which the guard config's
endpoint policy acts on (``{"on_trigger": "refuse"}`` refuses flagged requests with a 422;
``{"answer": "repaired"}`` answers the repaired model's label)::

    guard archive --model resnet20 --weights suspect.pt --scan report.json --repaired repaired.pt \
        --detector detector.safetensors --out model_store/suspect.mar
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..repair import list_defenses
from . import CLIError


def recorded_method(weights: str | None) -> str | None:
    """The defense recorded in the ``WEIGHTS.json`` summary that ``guard repair`` / ``guard harden`` write
    next to their output, if there is one."""
    if weights is None:
        return None
    summary = Path(weights).with_name(Path(weights).name + ".json")
    if not summary.is_file():
        return None
    try:
        method = json.loads(summary.read_text()).get("method")
    except (json.JSONDecodeError, AttributeError):
        return None
    return method if method in list_defenses() else None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("archive", help="build a TorchServe model archive (.mar) for a guarded endpoint",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model name (see `guard info`)")
    p.add_argument("--weights", required=True, help="weights file (state dict, .pt/.th or .safetensors)")
    p.add_argument("--out", required=True, help="archive path DIR/NAME.mar; NAME becomes /predictions/NAME")
    p.add_argument("--guard-config", default=None, help="guard config JSON (default: ReScaler defaults, top-3)")
    p.add_argument("--num-classes", type=int, default=10, help="output classes of the model (default 10)")
    p.add_argument("--scan", default=None, help="scan report JSON of these weights (guard scan --out)")
    p.add_argument("--repaired", default=None, help="repaired weights of the same model (guard repair --out)")
    p.add_argument("--detector", default=None,
                   help="trigger detector calibrated on these weights (guard calibrate --out)")
    p.add_argument("--repaired-method", default=None, choices=list_defenses(),
                   help="defense that produced --repaired (default: the method in REPAIRED.json when present)")
    p.add_argument("--weights-method", default=None, choices=list_defenses(),
                   help="defense that produced --weights, e.g. moth from guard harden (default: the method in "
                        "WEIGHTS.json when present)")
    p.add_argument("--handler", default=None, help="handler file (default: guard's, guard.serving.HANDLER_FILE)")
    p.add_argument("--force", action="store_true", help="replace an existing archive")
    p.add_argument("--kserve", default=None, metavar="DIR",
                   help="also add the archive to the storage layout of KServe's TorchServe runtime at DIR "
                        "(config/config.properties, model-store/NAME.mar); deploy with deploy/kserve/")
    p.add_argument("--kserve-mount", default=None, metavar="PATH",
                   help="where the runtime mounts DIR (default /mnt/models, KServe's storageUri mount)")
    p.add_argument("--json", action="store_true", help="print the archive's manifest as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..serving import KSERVE_MOUNT, GuardConfig, build_archive, build_kserve_layout, read_manifest

    if args.kserve_mount is not None and args.kserve is None:
        raise CLIError("--kserve-mount applies with --kserve DIR only")
    config = GuardConfig.load(args.guard_config) if args.guard_config else None
    try:
        out = build_archive(args.model, args.weights, args.out, config, num_classes=args.num_classes,
                            handler=args.handler, force=args.force, scan=args.scan, repaired=args.repaired,
                            repaired_method=args.repaired_method or recorded_method(args.repaired),
                            weights_method=args.weights_method or recorded_method(args.weights),
                            detector=args.detector)
    except FileExistsError as exc:
        raise CLIError(str(exc)) from exc
    manifest = read_manifest(out)
    kserve = None
    if args.kserve is not None:
        kserve = build_kserve_layout(args.kserve, out, mount=args.kserve_mount or KSERVE_MOUNT)
    if args.json:
        print(json.dumps({"archive": str(out), **({"kserve_config": str(kserve)} if kserve else {}),
                          **manifest.to_dict()}, indent=2))
    else:
        state = "on" if manifest.guard.enabled else "off"
        print(f"wrote {out}: {manifest.model}, {manifest.num_classes} classes, guard {state} "
              f"(eps={manifest.guard.rescaler.eps}, alpha={manifest.guard.rescaler.alpha}, "
              f"steps={manifest.guard.rescaler.steps}), weights sha256 {manifest.weights_sha256}"
              + (", with scan report" if manifest.scan_file else "")
              + (", with repaired model" if manifest.repaired_file else "")
              + (", with trigger detector" if manifest.detector_file else "")
              + f", policy answer={manifest.guard.answer} on_trigger={manifest.guard.on_trigger}"
              + (f"; KServe layout {args.kserve} (config {kserve})" if kserve else ""))
    return 0
