"""What clients actually receive from a guarded endpoint: attack success and clean accuracy, per victim and policy.

What:     per attack (--attacks) the strong victim of the shared cache (benchmarks/victims.py, the options of
          detect_cifar10.py), archived once per endpoint POLICY and served by one real TorchServe (batch 8, 20 ms
          delay; every policy a model of the same server). The trigger detector (guard calibrate:
          guard.detect.TriggerDetector, out-of-fold threshold at --fpr; --amplified copies) is calibrated on the
          lossless test images 0–699; the clean traffic is images 700–999, the triggered traffic the same images of
          non-target classes stamped with the trigger (Xiang: its source classes), all sent as PNG over HTTP by
          CLIENTS threads, clean first, then triggered.
Policies: plain            guard off, no detector: the undefended model
          rescaler         ReScaler's label, no detector (the endpoint before the policy)
          detect-refuse    guard off (one forward) with the detector: flagged requests get a 422
          rescaler-refuse  ReScaler's label with the detector: flagged requests get a 422
          repaired         guard off, the label of the victim repaired by --repair (a registered repair defense,
                           or several joined by + run in order, each at its defaults with the step budgets
                           times --scale and the --opt overrides, on a class-stratified --trusted-fraction of the
                           clean training set, each with its CDA budget on the calibration images; no trigger
                           known, so the last point within the budget)
          repaired-refuse  the repaired label with the detector: flagged requests get a 422
Reports:  per victim and policy: the clean accuracy clients receive (a refused clean request is a wrong answer)
          and its loss against plain (with its paired standard error), the attack success clients receive (the
          target label answered to a triggered request; a refusal is a failure), refusal rates, images/s through
          the endpoint, and the target class's guard_estimated_asr after each phase beside its truth (the share
          of the window's requests the undefended model sent to the target that carry a successful trigger). The
          goal: at most 5 % attack success at at most 2 points of clean accuracy, on every attack that took
          hold (undefended attack success >= 0.5). Beside the served window, --splits random calibration/traffic
          splits of the same 1,000 images, replayed in process with the served models and the handler's calls:
          the median and range of the guard-off policies' clean loss and attack success. And --unseen test images
          outside those 1,000 (the shared data's JPEG-decoded test set: traffic none of the served parts saw, from
          a shifted distribution), the first 700 of them set apart, replayed the same way with the served detector
          and with one refitted on those 700: do the false-positive rate and the goal hold there?
Hardware: CPU (the project's 2 cores: the server and the clients share them); TorchServe uses a GPU when one is
          visible.
Output:   benchmarks/results/guard_end_to_end.json and .png; the JSON accumulates over runs (a victim already
          measured with the same options, false-positive rate, every asked policy and the same repair is kept); the
          repaired weights are cached in runs/end_to_end/ATTACK/, named after the victim they repair.
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/guard_end_to_end.py [--attacks badnets,blend] [--fpr 0.01]
          [--policies plain,repaired,repaired-refuse] [--repair nc-pyp|nc+nad] [--trusted-fraction 0.01] [--scale 0.25]
          [--opt fine-tune.steps=1000 --opt fine-tune.jpeg=0.5] [--splits 10] [--unseen 9000]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

import guard
from guard.attacks import load_record
from guard.data import load_dataset
from guard.detect import TriggerDetector, consistency, layer_features
from guard.models import create, save_weights
from guard.repair import get_defense, list_defenses, split_trusted
from guard.serving import GuardConfig, ServerSettings, TorchServe, build_archive, free_ports
# benchmarks/victims.py: the shared cache of strong victims and the benchmarks' helpers
from victims import DEFENSE_VICTIMS, aimed_at, data_root, results_name, stamp_sources, victim
from defenses_cifar10 import parse_overrides, scaled   # --opt; a defense's defaults with its step budgets shrunk

ATTACKS = DEFENSE_VICTIMS
#: policy -> (guard config, archive carries the detector); an ``answer="repaired"`` archive also carries the
#: victim repaired by --repair
POLICIES = {"plain": (GuardConfig(enabled=False), False), "rescaler": (GuardConfig(), False),
            "detect-refuse": (GuardConfig(enabled=False, on_trigger="refuse"), True),
            "rescaler-refuse": (GuardConfig(on_trigger="refuse"), True),
            "repaired": (GuardConfig(enabled=False, answer="repaired"), False),
            "repaired-refuse": (GuardConfig(enabled=False, answer="repaired", on_trigger="refuse"), True)}
#: the policies that answer the repaired model's label, and those that need no repaired model
REPAIRED_POLICIES = tuple(p for p, (config, _) in POLICIES.items() if config.answer == "repaired")
SERVED_POLICIES = tuple(p for p in POLICIES if p not in REPAIRED_POLICIES)
CALIBRATION_IMAGES, CLIENTS, SEED = 700, 8, 0
REPLAY_CHUNK = 500   # images per in-process forward of the replays
GOAL_ASR, GOAL_CLEAN_LOSS, TOOK_HOLD = 0.05, 0.02, 0.5
OUT = Path(__file__).parent / "results"
RUNS = Path(__file__).resolve().parents[1] / "runs" / "end_to_end"


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def send(server: TorchServe, name: str, images: torch.Tensor) -> tuple[list[tuple[int, dict]], float]:
    """(status, body) per image, sent by CLIENTS threads; and the wall-clock seconds it took."""
    bodies = [png(im) for im in images.permute(0, 2, 3, 1).numpy()]

    def post(body: bytes) -> tuple[int, dict]:
        reply = requests.post(server.inference_url(name), data=body, headers={"Content-Type": "image/png"},
                              timeout=120)
        if reply.status_code not in (200, 422):
            raise RuntimeError(f"{name}: unexpected {reply.status_code}: {reply.text[:300]}")
        return reply.status_code, reply.json()

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(post, bodies))
    return answers, time.perf_counter() - started


def target_gauge(server: TorchServe, name: str, target: int) -> float:
    time.sleep(0.5)
    text = requests.get(server.metrics_url, timeout=10).text
    match = re.search(rf'^guard_estimated_asr{{(?=[^}}]*model_name="{name}")(?=[^}}]*class="{target}")[^}}]*}} (\S+)$',
                      text, re.M)
    return float(match.group(1)) if match else 0.0


def traffic(v, test, indices=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(clean images, their labels, triggered images of the non-target/source classes, target) for victim ``v``:
    the test images ``indices`` (default: those after the calibration images)."""
    attack = load_record(v.record)
    evaluation = test.subset(range(CALIBRATION_IMAGES, len(test)) if indices is None else indices)
    return evaluation.images, evaluation.labels, stamp_sources(attack, evaluation).images, attack.config.target


@dataclass(frozen=True)
class Answers:
    """What the served forward gives for each of ``images`` (uint8): the detector layers' ``features``, the
    model's label ``original`` and the repaired model's ``fixed`` (``original`` without one). Computed once per
    image set (:meth:`of`) and reused by every detector replayed on it."""

    images: torch.Tensor
    features: dict[str, torch.Tensor]
    original: torch.Tensor
    fixed: torch.Tensor

    @classmethod
    def of(cls, model, repaired_model, layers: tuple[str, ...], images: torch.Tensor) -> "Answers":
        parts = []
        for chunk in images.split(REPLAY_CHUNK):
            x = chunk.float() / 255
            with torch.no_grad(), layer_features(model, layers) as captured:
                original = model(x).argmax(1)
            with torch.no_grad():
                fixed = original if repaired_model is None else repaired_model(x).argmax(1)
            parts.append(({name: torch.cat(values) for name, values in captured.items()}, original, fixed))
        return cls(images, {name: torch.cat([p[0][name] for p in parts]) for name in parts[0][0]},
                   torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))

    def subset(self, index: torch.Tensor) -> "Answers":
        return Answers(self.images[index], {name: f[index] for name, f in self.features.items()},
                       self.original[index], self.fixed[index])

    def flagged(self, model, detector: TriggerDetector) -> torch.Tensor:
        """The handler's verdict (:meth:`guard.detect.TriggerDetector.score`), with the amplified copies'
        consistency when the detector has any."""
        copies = [] if detector.amplification is None else detector.amplification.copies(model)
        chunks = zip(self.images.split(REPLAY_CHUNK), self.original.split(REPLAY_CHUNK))
        agreement = torch.cat([consistency(copies, x.float() / 255, o) for x, o in chunks]) if copies else None
        return detector.score(self.features, self.original, agreement).flagged


def guard_off_outcomes(model, detector: TriggerDetector, clean: Answers, labels: torch.Tensor, triggered: Answers,
                       target: int, repaired: bool) -> dict[str, dict[str, float]]:
    """The guard-off policies replayed in process on the served forward's ``clean`` answers (with ``labels``) and
    ``triggered`` ones, with the calls the handler makes (the detector's verdict, the repaired model's label when
    ``repaired``), ``plain`` among them: ``{policy: {"clean_accuracy", "clean_accuracy_loss", "attack_success",
    "clean_refused"}}``."""
    clean_flagged, trig_flagged = clean.flagged(model, detector), triggered.flagged(model, detector)
    plain_accuracy = (clean.original == labels).float().mean().item()
    policies = {"plain": (clean.original, triggered.original, False),
                "detect-refuse": (clean.original, triggered.original, True)}
    if repaired:
        policies.update({"repaired": (clean.fixed, triggered.fixed, False),
                         "repaired-refuse": (clean.fixed, triggered.fixed, True)})
    outcomes = {}
    for policy, (clean_label, trig_label, refuses) in policies.items():
        keep_clean = ~clean_flagged if refuses else torch.ones_like(clean_flagged)
        keep_trig = ~trig_flagged if refuses else torch.ones_like(trig_flagged)
        accuracy = ((clean_label == labels) & keep_clean).float().mean().item()
        outcomes[policy] = {"clean_accuracy": accuracy, "clean_accuracy_loss": plain_accuracy - accuracy,
                            "attack_success": ((trig_label == target) & keep_trig).float().mean().item(),
                            "clean_refused": (~keep_clean).float().mean().item()}
    return outcomes


def replay_splits(v, model, repaired_model, test, fpr: float, amplified: int, splits: int) -> dict:
    """What the guard-off policies would give on ``splits`` random calibration/traffic splits of the same test
    images (CALIBRATION_IMAGES to calibrate, the rest as traffic), replayed in process
    (:func:`guard_off_outcomes`): the spread one fixed 300-image window hides. The served forward runs once over
    every test image and its triggered copy; each split only calibrates its detector and scores its traffic.
    The repaired model is the served one; its CDA budget was measured on the served window's calibration images,
    some of which a random split sends as traffic. ``{policy: {quantity: {"median", "min", "max"}}}`` over the
    quantities of :func:`guard_off_outcomes`. ``model``: the served victim; ``repaired_model``: its repair, or
    ``None``."""
    attack = load_record(v.record)
    aimed = aimed_at(attack, test.labels)
    position = torch.full((len(test),), -1, dtype=torch.long)   # test image -> its row among the triggered copies
    position[aimed] = torch.arange(int(aimed.sum()))
    outcomes: dict[str, dict[str, list[float]]] = {}
    clean = triggered = None
    for split in range(splits):
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(split))
        calibration, rest = order[:CALIBRATION_IMAGES], order[CALIBRATION_IMAGES:]
        detector = TriggerDetector.calibrate(model, test.images[calibration].float() / 255, false_positive_rate=fpr,
                                             amplified=amplified, generator=torch.Generator().manual_seed(SEED))
        if clean is None:   # the detector's layers do not depend on the split
            clean = Answers.of(model, repaired_model, detector.layers, test.images)
            triggered = Answers.of(model, repaired_model, detector.layers, stamp_sources(attack, test).images)
        row = guard_off_outcomes(model, detector, clean.subset(rest), test.labels[rest],
                                 triggered.subset(position[rest[aimed[rest]]]), attack.config.target,
                                 repaired_model is not None)
        for policy, values in row.items():
            for name, value in values.items():
                outcomes.setdefault(policy, {}).setdefault(name, []).append(value)
    return {policy: {name: {"median": round(float(np.median(values)), 4), "min": round(min(values), 4),
                            "max": round(max(values), 4)} for name, values in row.items()}
            for policy, row in outcomes.items()}


def unseen_test(root: Path, test, images: int):
    """``images`` test images drawn at random (seed SEED) from the full test split minus the first 1,000, the
    lossless ones (``test``) every other request comes from: traffic the served detector and repair never saw. In the
    shared data's npz layout the full test split is decoded from JPEG (lossy, its ``jpg_set_index`` locating the
    lossless 1,000 in it), so this traffic is also shifted; in torchvision's layout it is the exact test set."""
    full = load_dataset("cifar10", root, split="test")
    seen = torch.arange(len(test))
    for folder in (root / "cifar10", root):
        if (path := folder / "cifar10_test_lossless_first1000.npz").is_file():
            with np.load(path, allow_pickle=False) as f:
                seen = torch.from_numpy(f["jpg_set_index"].astype(np.int64))
            break
    if len(seen) != len(test):
        raise ValueError(f"expected one position in the full test split per lossless test image ({len(test)}), "
                         f"got {len(seen)}")
    others = torch.ones(len(full), dtype=torch.bool)
    others[seen] = False
    pool = torch.nonzero(others)[:, 0]
    if not CALIBRATION_IMAGES < images <= len(pool):
        raise SystemExit(f"--unseen must be 0 or in {CALIBRATION_IMAGES + 1}..{len(pool)} (the test images outside "
                         f"the lossless 1,000; the first {CALIBRATION_IMAGES} refit the detector), got {images}")
    return full.subset(pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(SEED))[:images]])


def replay_unseen(v, model, repaired_model, unseen, served: TriggerDetector, fpr: float, amplified: int) -> dict:
    """The guard-off policies on the ``unseen`` images after their first CALIBRATION_IMAGES (:func:`unseen_test`),
    replayed in process (:func:`guard_off_outcomes`) with two detectors: the ``served`` one, fitted on lossless
    images, and one fitted and calibrated the same way on those first CALIBRATION_IMAGES unseen images, i.e. on
    the traffic's own distribution. ``{"images", "calibration", "traffic": {"clean", "triggered"},
    "detectors": {"served" | "refitted": {policy: {quantity: value}}}}``; ``model`` and ``repaired_model`` as in
    :func:`replay_splits`."""
    calibration = unseen.subset(range(CALIBRATION_IMAGES))
    refitted = TriggerDetector.calibrate(model, calibration.images.float() / 255, false_positive_rate=fpr,
                                         amplified=amplified, generator=torch.Generator().manual_seed(SEED))
    clean, labels, triggered, target = traffic(v, unseen)
    clean, triggered = (Answers.of(model, repaired_model, served.layers, images) for images in (clean, triggered))
    rows = {name: guard_off_outcomes(model, detector, clean, labels, triggered, target, repaired_model is not None)
            for name, detector in (("served", served), ("refitted", refitted))}
    return {"images": len(unseen), "calibration": CALIBRATION_IMAGES,
            "traffic": {"clean": len(labels), "triggered": len(triggered.original)},
            "detectors": {name: {p: {k: round(x, 4) for k, x in row.items()} for p, row in by_policy.items()}
                          for name, by_policy in rows.items()}}


def stage_name(method: str, overrides: dict[str, dict]) -> str:
    """A chain stage as the cache and the results name it: ``fine-tune[steps=1000]`` with ``--opt`` overrides."""
    fields = overrides.get(method, {})
    return method + (f"[{','.join(f'{k}={v}' for k, v in sorted(fields.items()))}]" if fields else "")


def repaired_weights(v, repair: str, trusted_fraction: float, scale: float, heldout, run: Path,
                     overrides: dict[str, dict] | None = None) -> tuple[Path, dict]:
    """Victim ``v`` repaired by ``repair``: a registered repair defense, or several joined by ``+`` run in order,
    each on the model the one before returned (``nc+nad``). Each runs its defaults with the step budgets times
    ``scale`` (defenses_cifar10.scaled), then its ``overrides`` (``{defense: {field: value}}``, ``--opt``), on a
    class-stratified ``trusted_fraction`` of the clean training set, its
    CDA budget measured on ``heldout`` against its own input (a chain's costs add up; the clients' clean accuracy
    is what the benchmark reports); no ASR probe (the defender does not know the trigger), so the last point
    within the budget. Each stage is cached in ``run``, named after the chain so far and the victim's weights
    (a chain reuses the cached repair of its first defense)."""
    overrides = overrides or {}
    methods, weights, stages, trusted = repair.split("+"), v.weights, [], None
    names = [stage_name(m, overrides) for m in methods]
    for i, method in enumerate(methods):
        out = run / f"repaired-{'+'.join(names[:i + 1])}-{trusted_fraction:g}-{scale:g}-{v.weights.stem}.pt"
        record = out.with_name(out.name + ".json")
        if not record.is_file():
            if trusted is None:   # the same trusted images for every stage, loaded once
                train_set = load_dataset("cifar10", data_root(), split="train")
                trusted = split_trusted(train_set, trusted_fraction, torch.Generator().manual_seed(SEED))
            model = create("resnet20", weights=weights)
            config = dataclasses.replace(scaled(method, scale), **overrides.get(method, {}))
            result = get_defense(method)(config).defend(model, trusted, eval_set=heldout,
                                                        generator=torch.Generator().manual_seed(SEED))
            save_weights(result.model, out)
            record.write_text(json.dumps({**result.to_dict(), "trusted_images": len(trusted)}, indent=1))
        stage = json.loads(record.read_text())
        stages.append({"method": names[i], "cda0": stage["cda0"], "cda": stage["chosen"]["cda"],
                       "step": stage["chosen"]["step"], "stopped_early": stage["stopped_early"],
                       "seconds": round(stage["seconds"], 1), "trusted_images": stage["trusted_images"]})
        weights = out
    return weights, {"cda0": stages[0]["cda0"], "cda": stages[-1]["cda"], "step": stages[-1]["step"],
                     "stopped_early": any(s["stopped_early"] for s in stages),
                     "seconds": round(sum(s["seconds"] for s in stages), 1),
                     "trusted_images": stages[0]["trusted_images"], **({"stages": stages} if len(stages) > 1 else {})}


def repair_chain(text: str) -> str:
    """``--repair``: a registered repair defense, or several joined by ``+``."""
    unknown = [m for m in text.split("+") if m not in list_defenses("repair")]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown repair defenses {unknown} in {text!r}; choose from "
                                         f"{list_defenses('repair')}, joined by '+' to run several in order")
    return text


def measure(attack_name: str, test, fpr: float, options: dict | None = None, label: str | None = None,
            policies: tuple[str, ...] = SERVED_POLICIES, repair: str | None = None,
            trusted_fraction: float = 0.01, scale: float = 1.0, amplified: int = 0,
            overrides: dict[str, dict] | None = None, splits: int = 0, unseen=None) -> dict:
    """``policies`` (``plain`` among them) on the cached victim of ``attack_name`` built with ``options`` (default:
    ATTACKS'), served from runs/end_to_end/``label`` (default: the attack's name); the ``answer="repaired"``
    policies answer with the victim repaired by ``repair`` (one defense or a chain: :func:`repaired_weights`);
    ``overrides`` change the repair stages' configs; the detector joins ``amplified`` amplified copies; ``splits``
    random calibration/traffic splits are replayed in process (:func:`replay_splits`), and so is the ``unseen``
    dataset (:func:`unseen_test`), with the served detector and one refitted on it (:func:`replay_unseen`)."""
    if "plain" not in policies:
        raise ValueError(f"the policies must include 'plain', the baseline of every other; got {list(policies)}")
    needs_repair = [p for p in policies if p in REPAIRED_POLICIES]
    if needs_repair and repair is None:
        raise ValueError(f"policies {needs_repair} answer the repaired label; name the repair defense")
    options = ATTACKS[attack_name] if options is None else options
    v = victim(attack_name, **options)
    clean, labels, triggered, target = traffic(v, test)
    model = create("resnet20", weights=v.weights).eval()
    calibration = test.subset(range(CALIBRATION_IMAGES))
    started = time.perf_counter()
    detector = TriggerDetector.calibrate(model, calibration.images.float() / 255, false_positive_rate=fpr,
                                         amplified=amplified, generator=torch.Generator().manual_seed(SEED))
    calibrate_seconds = time.perf_counter() - started
    run = RUNS / (label or attack_name)
    detector_file = detector.save(run / "detector.safetensors")
    repaired, repair_record = (repaired_weights(v, repair, trusted_fraction, scale, calibration, run, overrides)
                               if needs_repair else (None, None))
    store = run / "store"
    for policy in policies:
        config, with_detector = POLICIES[policy]
        answers_repaired = policy in REPAIRED_POLICIES
        build_archive("resnet20", v.weights, store / f"{policy}.mar", config, force=True,
                      detector=detector_file if with_detector else None,
                      repaired=repaired if answers_repaired else None,
                      repaired_method=repair.split("+")[-1] if answers_repaired else None)
    settings = ServerSettings(*free_ports(5), token_auth=False, batch_size=8, max_batch_delay_ms=20, threads=2)
    rows = {}
    with TorchServe(run / "server", store, {p: f"{p}.mar" for p in policies}, settings) as server:
        for policy in policies:
            clean_answers, clean_seconds = send(server, policy, clean)
            gauge_clean = target_gauge(server, policy, target)
            trig_answers, trig_seconds = send(server, policy, triggered)
            gauge_after = target_gauge(server, policy, target)
            rows[policy] = summarize(clean_answers, labels, trig_answers, target)
            rows[policy].update({
                "images_per_second": round((len(clean) + len(triggered)) / (clean_seconds + trig_seconds), 1),
                "estimated_asr_target_after_clean": round(gauge_clean, 4),
                "estimated_asr_target_after_triggered": round(gauge_after, 4)})
            print(f"{attack_name:15s} {policy:16s} clean acc {rows[policy]['clean_accuracy']:.3f} "
                  f"ASR {rows[policy]['attack_success']:.3f} refused clean {rows[policy]['clean_refused']:.3f} "
                  f"triggered {rows[policy]['triggered_refused']:.3f} gauge {gauge_clean:.3f}->{gauge_after:.3f} "
                  f"{rows[policy]['images_per_second']:.0f} img/s", flush=True)
    # the truth the gauge estimates: of the window's requests the undefended model sent to the target, the share
    # that are triggered requests it sent there (the window, asr_window=1000, holds all of them)
    plain_clean = [a["original_label"] for _, a in rows["plain"]["answers"]["clean"]]
    plain_trig = [a["original_label"] for _, a in rows["plain"]["answers"]["triggered"]]
    to_target = sum(y == target for y in plain_clean) + sum(y == target for y in plain_trig)
    truth = sum(y == target for y in plain_trig) / max(to_target, 1)
    plain = rows["plain"]
    took_hold = plain["attack_success"] >= TOOK_HOLD
    repaired_model = None if repaired is None else create("resnet20", weights=repaired).eval()
    replayed = replay_splits(v, model, repaired_model, test, fpr, amplified, splits) if splits else {}
    for policy, row in replayed.items():
        print(f"{attack_name:15s} {policy:16s} over {splits} splits: clean loss median "
              f"{row['clean_accuracy_loss']['median']:+.3f} ({row['clean_accuracy_loss']['min']:+.3f}.."
              f"{row['clean_accuracy_loss']['max']:+.3f}), ASR median {row['attack_success']['median']:.3f} "
              f"({row['attack_success']['min']:.3f}..{row['attack_success']['max']:.3f})", flush=True)
    unseen_rows = (replay_unseen(v, model, repaired_model, unseen, detector, fpr, amplified) if unseen is not None
                   else {})
    for detector_name, by_policy in unseen_rows.get("detectors", {}).items():
        for policy, row in by_policy.items():
            print(f"{attack_name:15s} {policy:16s} on {unseen_rows['traffic']['clean']} unseen test images, "
                  f"{detector_name} detector: clean acc {row['clean_accuracy']:.3f} (loss "
                  f"{row['clean_accuracy_loss']:+.3f}, refused {row['clean_refused']:.3f}), ASR "
                  f"{row['attack_success']:.3f}", flush=True)
    for row in rows.values():
        row["clean_accuracy_loss"] = round(plain["clean_accuracy"] - row["clean_accuracy"], 4)
        # paired over the same clean requests: the standard error of the loss (the window is a few hundred images)
        lost = np.asarray(plain["clean_correct"], float) - np.asarray(row["clean_correct"], float)
        row["clean_accuracy_loss_se"] = round(float(lost.std(ddof=1) / np.sqrt(len(lost))), 4)
        row["meets_goal"] = bool(row["attack_success"] <= GOAL_ASR and row["clean_accuracy_loss"] <= GOAL_CLEAN_LOSS)
    for row in rows.values():
        row.pop("answers"), row.pop("clean_correct")
    return {"options": options, "target": target, "victim": {"cda": v.cda, "asr": v.asr},
            "requests": {"clean": len(clean), "triggered": len(triggered)}, "took_hold": took_hold,
            "detector": {**detector.metadata(), "calibrate_seconds": round(calibrate_seconds, 2)},
            "repair": None if repair_record is None else {
                "method": repair, "trusted_fraction": trusted_fraction, "scale": scale,
                "overrides": overrides or {}, **repair_record},
            "estimated_asr_truth": round(truth, 4), "policies": rows,
            **({"splits": {"count": splits, "policies": replayed}} if splits else {}),
            **({"unseen": unseen_rows} if unseen is not None else {})}


def summarize(clean_answers, labels, trig_answers, target) -> dict:
    def answered(status, body, want) -> bool:
        return status == 200 and body["label"] == want

    correct = [answered(s, b, int(y)) for (s, b), y in zip(clean_answers, labels)]
    return {"clean_accuracy": round(float(np.mean(correct)), 4), "clean_correct": correct,
            "clean_refused": round(float(np.mean([s == 422 for s, _ in clean_answers])), 4),
            "attack_success": round(float(np.mean([answered(s, b, target) for s, b in trig_answers])), 4),
            "triggered_refused": round(float(np.mean([s == 422 for s, _ in trig_answers])), 4),
            "answers": {"clean": clean_answers, "triggered": trig_answers}}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(results["attacks"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(POLICIES)
    for k, policy in enumerate(POLICIES):
        xs = [i + k * width for i in range(len(attacks))]
        rows = [results["attacks"][a]["policies"].get(policy, {}) for a in attacks]
        axes[0].bar(xs, [r.get("attack_success", np.nan) for r in rows], width, label=policy)
        axes[1].bar(xs, [100 * r.get("clean_accuracy_loss", np.nan) for r in rows], width, label=policy)
        replayed = [results["attacks"][a].get("splits", {}).get("policies", {}).get(policy) for a in attacks]
        for ax, key, unit in ((axes[0], "attack_success", 1), (axes[1], "clean_accuracy_loss", 100)):
            spread = [(unit * r[key]["median"], unit * r[key]["min"], unit * r[key]["max"]) if r else (np.nan,) * 3
                      for r in replayed]
            median, low, high = (np.array(v) for v in zip(*spread))
            ax.errorbar(xs, median, yerr=(median - low, high - median), fmt="o", color="k", ms=3, lw=0.8,
                        label="median and range over the splits" if k == 0 else None)
        unseen = [results["attacks"][a].get("unseen", {}).get("detectors", {}).get("refitted", {}).get(policy)
                  for a in attacks]
        for ax, key, unit in ((axes[0], "attack_success", 1), (axes[1], "clean_accuracy_loss", 100)):
            ax.scatter(xs, [unit * r[key] if r else np.nan for r in unseen], marker="x", color="r", s=18, zorder=3,
                       label="unseen test images, detector refitted on them" if k == 0 else None)
    axes[0].axhline(GOAL_ASR, color="k", ls="--", lw=1, label="goal")
    axes[1].axhline(100 * GOAL_CLEAN_LOSS, color="k", ls="--", lw=1, label="goal")
    for ax, title in zip(axes, ("attack success received by clients", "clean accuracy loss vs plain (points)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(attacks))], attacks, rotation=20)
        ax.set_title(title)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(f"guard end to end through TorchServe (trigger detector at {results['params']['fpr']:.1%} FPR)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default="badnets,blend,adaptive-blend,wanet,sig,refool,xiang")
    parser.add_argument("--fpr", type=float, default=0.01, help="the detector's calibrated false-positive rate")
    parser.add_argument("--amplified", type=int, default=0,
                        help="the detector's amplified copies (guard calibrate --amplified; default 0)")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"a comma list of {list(POLICIES)}")
    parser.add_argument("--repair", default="nc-pyp", type=repair_chain,
                        help=f"the repair defense of the repaired policies (its registry defaults), one of "
                             f"{list_defenses('repair')}, or several joined by '+' to run in order (nc+nad)")
    parser.add_argument("--trusted-fraction", type=float, default=0.01,
                        help="the share of the clean training set the repair trusts (default 0.01)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the repair's step budgets (default 1: its registry defaults)")
    parser.add_argument("--opt", action="append", default=[], metavar="DEFENSE.FIELD=VALUE",
                        help="override a repair stage's config field after --scale (repeatable), e.g. "
                             "fine-tune.steps=1000")
    parser.add_argument("--splits", type=int, default=10,
                        help="random calibration/traffic splits replayed in process beside the served window "
                             "(default 10; 0: none)")
    parser.add_argument("--unseen", type=int, default=9000,
                        help="test images outside the lossless 1,000 (JPEG-decoded in the shared data) replayed in "
                             "process with the served models, the served detector and one refitted on the first "
                             f"{CALIBRATION_IMAGES} of them (default 9000: all; 0: none)")
    parser.add_argument("--out", type=results_name,
                        default="guard_end_to_end", help="results name in benchmarks/results/")
    args = parser.parse_args()
    attacks, policies = args.attacks.split(","), tuple(args.policies.split(","))
    unknown = [a for a in attacks if a not in ATTACKS] + [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown attacks or policies {unknown}; choose from {list(ATTACKS)} and {list(POLICIES)}")
    if not 0 < args.scale <= 1:
        raise SystemExit(f"--scale must be in (0, 1], got {args.scale}")
    if args.splits < 0:
        raise SystemExit(f"--splits must be >= 0, got {args.splits}")
    if "plain" not in policies:
        policies = ("plain", *policies)   # the baseline of every other policy
    repair = args.repair if set(policies) & set(REPAIRED_POLICIES) else None
    overrides = parse_overrides(args.opt, repair.split("+") if repair else [])
    test = load_dataset("cifar10", data_root(), split="test-lossless")
    unseen = unseen_test(data_root(), test, args.unseen) if args.unseen else None
    out_json = OUT / f"{args.out}.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    earlier = results.get("params", {})
    if (earlier.get("fpr"), earlier.get("amplified", 0)) != (args.fpr, args.amplified):
        results = {}   # another operating point: measure every attack again
    goal = {"attack_success": GOAL_ASR, "clean_accuracy_loss": GOAL_CLEAN_LOSS, "took_hold": TOOK_HOLD}
    results.update({"what": __doc__.splitlines()[0], "torch": torch.__version__, "guard": guard.__version__,
                    "platform": platform.platform(), "cuda": torch.cuda.is_available(),
                    "params": {"fpr": args.fpr, "amplified": args.amplified, "calibration_images": CALIBRATION_IMAGES,
                               "clients": CLIENTS, "policies": list(POLICIES), "goal": goal}})
    results.setdefault("attacks", {})
    for attack_name in attacks:
        row = results["attacks"].get(attack_name)
        if row and row["options"] != json.loads(json.dumps(ATTACKS[attack_name])):
            row = None   # measured on another victim: every policy is measured again
        if row and set(policies) <= set(row["policies"]) and (
                repair is None or (row.get("repair") or {}).get("method") == repair
                and row["repair"]["trusted_fraction"] == args.trusted_fraction
                and row["repair"].get("scale") == args.scale and row["repair"].get("overrides", {}) == overrides) and (
                not args.splits or row.get("splits", {}).get("count") == args.splits) and (
                not args.unseen or row.get("unseen", {}).get("images") == args.unseen):
            continue
        measured = measure(attack_name, test, args.fpr, amplified=args.amplified, policies=policies, repair=repair,
                           trusted_fraction=args.trusted_fraction, scale=args.scale, overrides=overrides,
                           splits=args.splits, unseen=unseen)
        if row:   # the policies measured before and not now stay (their answers are the same model's)
            measured["policies"] = {**row["policies"], **measured["policies"]}
            measured["repair"] = measured["repair"] or row.get("repair")
        results["attacks"][attack_name] = measured
        out_json.write_text(json.dumps(results, indent=1))
    out_json.write_text(json.dumps(results, indent=1))
    plot(results, OUT / f"{args.out}.png")
    print(f"wrote {out_json} and .png")


if __name__ == "__main__":
    main()
