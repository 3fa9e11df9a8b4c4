"""ReScaler Table 1 and Figure 2 at CPU scale, with the appendix analyses (rescaler_main.txt §4, appendix §A, C).

What:     the transfer setting (ALGORITHMS.md S1): per attack goal (JHT recipe, guard.attacks.make_goals), FC / BP /
          CLBD / HTBD / CP poisons are crafted against the pretrained CIFAR ResNet-20/32/56, a victim fine-tunes a
          fresh last layer (BatchNorm frozen, 35 epochs, SGD 0.01, poisons un-augmented) on a fine-tuning set
          holding them (1 %), and the successful goals (M3) are defended by ReScaler (α 1, ε = EPS):
          Table 1's columns — SA, defended ASR (M4), put-back (M5), target / poison confidence (M6), undefended
          and defended validation accuracy (targets excluded) — with standard errors, beside the paper's rows.
          Figure 2: ASR (all successful goals) against validation error (VAL_MODELS victims per cell) over the
          ε sweep; the recommended ε per architecture is the smallest that reaches the lowest ASR within
          MAX_VAL_LOSS points of validation accuracy.
          Appendix C: label-targeted weights (descend on CE to the true class, ε 0.3, 100 steps) transferred
          between FC and BP victims (transfer ASR, overlap similarity, eq. 4, and its ≈ 0.6 threshold); the
          accuracy of the defended victim on its own poison training images and on clean fine-tuning images;
          one target image sent to every other class (overlap of those weights vs across targets).
Scale:    CPU: 5 poisons in a 500-image fine-tuning set (JHT: 25 in 2,500), 50 goals for ResNet-20 and 20 for the
          deeper two (the paper: 100, ResNet-34/50, ResNeXt-29); validation = the 1000 lossless test images.
          --goals N overrides (100 when a GPU is lent).
Cache:    benchmarks/results/rescaler_goals/<model>/<attack>/<goal>.json (+ .pt: poisons and the victim's head):
          an interrupted run resumes where it stopped; a finished goal is never recomputed.
Sweep:    each chunk of --chunk goals is a guard.sweep job of --threads CPUs (one GPU each with CUDA) on a local
          Ray, --address, or --serial in this process; the analyses run here once the goals are cached.
Output:   benchmarks/results/rescaler_cifar10.json and rescaler_cifar10.png (Figure 2)
Run:      GUARD_DATA_DIR=../shared/data python benchmarks/rescaler_cifar10.py [--models resnet20 ...]
          [--attacks fc bp ...] [--goals N] [--report-only]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

import guard
from guard.attacks import AttackGoal, create_attack, make_goals
from guard.attacks.primitives import to_uint8
from guard.data import load_dataset
from guard.goals import FeatureBank, GoalProtocol, evaluate_goal, goal_victim, image_features
from guard.metrics import defended_asr, overlap_similarity, put_back_rate
from guard.models import create
from guard.rescaler import ReScaler
from guard.sweep import Grid
from guard.train import predict
from victims import (PRETRAINED, add_sweep_arguments, data_root, job_resources,  # benchmarks/victims.py: shared
                     run_grid)

# ----------------------------------------------------------------------------------------- parameters
SEED = 0
CHUNK = 10                                 # goals crafted together (one batch of CHUNK x POISONS images)
POISONS = 5                                # 1 % of the fine-tuning set
# JHT fine-tunes on 2,500 images at batch 128 for 40 epochs (~800 SGD steps); on the 5x smaller set, batch 16
# keeps the head's optimisation budget comparable (1,120 steps): at batch 128 the fresh head never fits 5 poisons
PROTOCOL = GoalProtocol()                  # 500 images, 35 epochs, SGD 0.01, batch 16
POOL = 560                                 # clean pool the fine-tuning sets are drawn from
GOALS = {"resnet20": 50, "resnet32": 20, "resnet56": 20}   # target images per model (its pretrained file: PRETRAINED)
# CP and BP with features from several layers ("end-to-end", rescaler_appendix.txt §A): every stage's output
LAYERS = ("layer1", "layer2")              # + layer3 through the penultimate features
ATTACKS = {"fc": {}, "bp": {"layers": LAYERS}, "clbd": {},
           # HTBD's loss_stop of 10 is met at iteration 0 by the 64-d CIFAR-ResNet features: a fixed 500 iterations
           "htbd": {"iterations": 500, "lr": 0.01, "loss_stop": 0.0},
           "cp": {"layers": LAYERS}}
#: crafted through ReScaler's adaptation (TransferConfig.adapted_aim; adaptive_cifar10.py's clean-label rows, not
#: Table 1's): label -> (attack, options); the goals, bases and victims' seeds are the plain attack's
#: The surrogate is far more confident on a clean target than a poisoned victim is on its query, so eq. 3's step
#: at the served α barely moves its scalars; the attacker models the victim's step as saturated (α 1e4: ε wherever
#: the gradient is positive).
ADAPTED = {"fc-adapted": ("fc", {**ATTACKS["fc"], "adapted_aim": 1.0, "rescaler_alpha": 1e4}),
           "bp-adapted": ("bp", {**ATTACKS["bp"], "adapted_aim": 1.0, "rescaler_alpha": 1e4})}
EPS = 0.15                                 # guard's default (rescaler_appendix.txt §A, ResNet-34/50)
SWEEP = (0.05, 0.10, 0.15, 0.20, 0.25)     # Figure 2's ResNet grid
VAL_MODELS = 3                             # victims per (model, attack) whose validation error is swept
MAX_VAL_LOSS = 0.03                        # "ASR 15-30 % at about +3 % validation error" (rescaler_main.txt §4.2)
TRANSFER_EPS, TRANSFER_STEPS = 0.3, 100    # appendix C.1
SIM_THRESHOLD = 0.6
PAPER = {  # ALGORITHMS.md T1 (ResNet-34 rows; CP exists only there): SA/100, def ASR, put-back, tgt conf, psn conf,
    #      undefended and defended val acc (%)
    "fc": (93, 18.27, 96.68, 73.90, 24.42, 93.27, 89.55), "bp": (78, 29.48, 96.36, 63.67, 33.76, 92.7, 88.12),
    "cp": (13, 15.38, 81.81, 65.98, 12.22, 93.35, 90.39), "clbd": (4, 25.00, 66.67, 51.36, 28.39, 92.80, 86.80),
    "htbd": (10, 0.00, 66.67, 43.31, 23.39, 93.50, 89.47)}
JHT_WHITE_BOX = {"fc": 22.0, "cp": 33.0, "bp": 85.0, "clbd": 5.0, "htbd": 10.0}  # % success (ALGORITHMS.md S5)
OUT = Path(__file__).parent / "results"
CACHE = OUT / "rescaler_goals"


class Setting:
    """One architecture: its pretrained backbone, goals, clean-pool feature bank and validation features."""

    def __init__(self, name: str, train_set, test_set, goals_n: int, device: torch.device) -> None:
        self.name = name
        self.backbone = create(name, weights=data_root() / PRETRAINED[name]).to(device).eval()
        self.goals = make_goals(train_set, test_set, goals_n, POISONS, torch.Generator().manual_seed(SEED))
        self.test = test_set
        bank_path = CACHE / name / "bank.pt"
        pool = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(SEED + 1))[:POOL]
        if bank_path.is_file():
            self.bank = FeatureBank.load(bank_path)
        else:
            started = time.perf_counter()
            self.bank = FeatureBank(self.backbone, train_set, pool, PROTOCOL.epochs,
                                    torch.Generator().manual_seed(SEED))
            bank_path.parent.mkdir(parents=True, exist_ok=True)
            self.bank.save(bank_path)
            print(f"{name}: feature bank {tuple(self.bank.features.shape)} in {time.perf_counter() - started:.0f} s")
        self.pool_images = train_set.images[self.bank.indices]
        self.test_features = image_features(self.backbone, test_set.images)


def val_mask(test_set, goal: AttackGoal) -> torch.Tensor:
    keep = torch.ones(len(test_set), dtype=torch.bool)
    keep[goal.target_index] = False
    return keep


def make_attack(label: str):
    """The attack of a Table 1 label (ATTACKS) or of an adapted one (ADAPTED)."""
    name, options = ADAPTED[label] if label in ADAPTED else (label, ATTACKS[label])
    return create_attack(name, **options)


def pending_chunks(model: str, labels, goals: int, chunk: int) -> list[dict]:
    """The sweep points (chunk_job's parameters) of the goals of ``labels`` on ``model`` not cached yet."""
    chunks = []
    for label in labels:
        pending = [i for i in range(goals) if not goal_path(model, label, i).is_file()]
        chunks += [{"model": model, "attack": label, "goals": goals, "indices": pending[start:start + chunk]}
                   for start in range(0, len(pending), chunk)]
    return chunks


def run_goals(setting: Setting, attack_name: str, indices: list[int], train_set, device) -> None:
    """Craft the poisons of ``indices`` in one batch (goal i draws from its own generator, so the chunking
    changes nothing), then train, defend and measure each victim; every record is cached as JSON (+ .pt)."""
    attack = make_attack(attack_name)
    goals = [setting.goals[i] for i in indices]
    targets = torch.stack([setting.test.images[g.target_index].float() / 255 for g in goals])
    started = time.perf_counter()
    crafted = attack.craft_goals(train_set, goals, targets, setting.backbone,
                                 [torch.Generator().manual_seed(SEED + i) for i in indices])
    craft_s = (time.perf_counter() - started) / len(indices)
    for i, goal, target, poisons in zip(indices, goals, targets, crafted.cpu()):
        poisons = to_uint8(poisons)
        victim = goal_victim(setting.backbone, setting.bank, goal, poisons, PROTOCOL,
                             torch.Generator().manual_seed(i))
        query = attack.target_input(target)
        keep = val_mask(setting.test, goal)
        with torch.no_grad():
            val_logits = victim.classifier(setting.test_features.to(device)).cpu()
        undefended_val = (val_logits.argmax(1) == setting.test.labels)[keep].double().mean().item()
        rescaler = ReScaler(victim, eps=EPS)
        try:
            outcome = evaluate_goal(query, goal, rescaler)
            record = {"goal": i, "target_index": goal.target_index, "target_class": goal.target_class,
                      "poison_class": goal.poison_class, "craft_seconds": round(craft_s, 2),
                      "crafted_together": len(indices), "undefended_val_acc": undefended_val,
                      **outcome.summary(goal)}
            if outcome.success:
                record.update(defended_measurements(setting, victim, rescaler, query, goal, poisons, keep))
        finally:
            rescaler.detach()
        path = goal_path(setting.name, attack_name, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"poisons": poisons, "head": victim.classifier.state_dict()}, path.with_suffix(".pt"))
        path.write_text(json.dumps(record, indent=1))


def goal_path(model: str, attack: str, i: int) -> Path:
    """The cached record of goal ``i`` (its poisons and the victim's head beside it, .pt)."""
    return CACHE / model / attack / f"{i:03d}.json"


def chunk_job(model: str, attack: str, goals: int, indices: list[int]) -> dict:
    """One chunk of goals, run by the sweep (guard.sweep; a Ray task or the serial loop): crafted together,
    each victim trained, defended and cached (run_goals); returns the chunk's counts."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = data_root()
    train_set = load_dataset("cifar10", root, split="train")
    test_set = load_dataset("cifar10", root, split="test-lossless")
    run_goals(Setting(model, train_set, test_set, goals, device), attack, indices, train_set, device)
    done = [json.loads(goal_path(model, attack, i).read_text()) for i in indices]
    return {"successes": sum(r["success"] for r in done),
            "still_poisoned": sum(r["success"] and r["defended_poisoned"] for r in done)}


def defended_measurements(setting, victim, rescaler, query, goal, poisons, keep) -> dict:
    """Everything measured on a successful goal: defended validation accuracy, the target's label over the ε
    sweep, the label-targeted weights of appendix C.1, and (C.2) what those weights do to the goal's poisons
    and to clean fine-tuning images."""
    val = setting.test.subset(keep.nonzero().flatten())
    out = {"defended_val_acc": (predict(victim, val, batch_size=128, defense=rescaler) == val.labels)
           .double().mean().item(),
           "sweep": {str(eps): int(rescaler.adapt(query[None], eps=eps).labels[0]) for eps in SWEEP}}
    true = torch.tensor([goal.target_class])
    w = rescaler.adapt(query[None], target=true, eps=TRANSFER_EPS, steps=TRANSFER_STEPS).scalars[0]
    out["label_targeted_scalars"] = [round(v, 6) for v in w.tolist()]
    clean = setting.bank.clean_for(goal, 100)
    for name, images, labels in (("poison", poisons, torch.full((poisons.shape[0],), goal.poison_class)),
                                 ("clean_finetune", setting.pool_images[clean], setting.bank.labels[clean])):
        x = images.float() / 255
        with torch.no_grad():
            plain = victim(x.to(query.device)).argmax(1).cpu()
        adapted = rescaler.predict_with(x, w).argmax(1).cpu()
        out[f"{name}_acc_undefended"] = (plain == labels).double().mean().item()
        out[f"{name}_acc_defended"] = (adapted == labels).double().mean().item()
    return out


def sweep_val(setting: Setting, attack_name: str, records: list[dict], device) -> dict:
    """Validation accuracy over the ε sweep for the first VAL_MODELS successful victims (cached per goal)."""
    accs = {str(eps): [] for eps in SWEEP}
    for r in [r for r in records if r["success"]][:VAL_MODELS]:
        path = CACHE / setting.name / attack_name / f"{r['goal']:03d}.sweep.json"
        if path.is_file():
            done = json.loads(path.read_text())
        else:
            goal = setting.goals[r["goal"]]
            victim = restore_victim(setting, attack_name, r["goal"], device)
            keep = val_mask(setting.test, goal)
            val = setting.test.subset(keep.nonzero().flatten())
            done = {}
            for eps in SWEEP:
                rescaler = ReScaler(victim, eps=eps)
                try:
                    done[str(eps)] = (predict(victim, val, batch_size=128, defense=rescaler) == val.labels
                                      ).double().mean().item()
                finally:
                    rescaler.detach()
            path.write_text(json.dumps(done))
        for eps, acc in done.items():
            accs[eps].append(acc)
    return accs


def restore_victim(setting: Setting, attack_name: str, i: int, device):
    saved = torch.load(CACHE / setting.name / attack_name / f"{i:03d}.pt", weights_only=True)
    victim = copy.deepcopy(setting.backbone)
    victim.classifier.load_state_dict(saved["head"])
    return victim.to(device).eval()


def mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return m, se


def table_row(model: str, attack: str, records: list[dict]) -> dict:
    """Table 1's columns over the successful goals (percentages, ± standard error), and what a client of the
    endpoint sees over every goal: ``served_asr``, the share of all goals answered with the poison class under
    ReScaler, which also counts ``flipped_to_poison`` — failed goals that the adaptation sends to the poison
    class (Table 1's defended ASR, over successful goals only, does not see them)."""
    ok = [r for r in records if r["success"]]
    row = {"model": model, "attack": attack, "goals": len(records), "sa": len(ok),
           "sa_rate": len(ok) / len(records) if records else math.nan,
           "served_asr": statistics.fmean(r["defended_poisoned"] for r in records) if records else math.nan,
           "flipped_to_poison": sum(r["defended_poisoned"] for r in records if not r["success"]),
           "craft_seconds_median": statistics.median(r["craft_seconds"] for r in records) if records else None}
    if ok:
        defended = torch.tensor([r["defended_label"] for r in ok])
        poison = torch.tensor([r["poison_class"] for r in ok])
        true = torch.tensor([r["target_class"] for r in ok])
        asr = defended_asr(defended, poison)
        put = put_back_rate(defended, true, poison)
        row["defended_asr"] = (100 * asr.value, 100 * asr.stderr)
        row["put_back"] = (100 * put.value, 100 * put.stderr) if put.n else (math.nan, math.nan)
        row["target_conf"] = tuple(100 * v for v in mean_se([r["target_confidence"] for r in ok]))
        row["poison_conf"] = tuple(100 * v for v in mean_se([r["poison_confidence"] for r in ok]))
        row["undefended_val_acc"] = tuple(100 * v for v in mean_se([r["undefended_val_acc"] for r in ok]))
        row["defended_val_acc"] = tuple(100 * v for v in mean_se([r["defended_val_acc"] for r in ok]))
        for key in ("poison_acc_undefended", "poison_acc_defended", "clean_finetune_acc_undefended",
                    "clean_finetune_acc_defended"):
            row[key] = 100 * statistics.fmean(r[key] for r in ok)
    if attack in PAPER:
        row["paper_resnet34"] = dict(zip(("sa", "defended_asr", "put_back", "target_conf", "poison_conf",
                                          "undefended_val_acc", "defended_val_acc"), PAPER[attack]))
        row["jht_white_box_success_percent"] = JHT_WHITE_BOX[attack]
    return row


def sweep_summary(setting: Setting, attack_name: str, records: list[dict], device) -> list[dict]:
    """Figure 2's points: ASR over every successful goal, validation accuracy over VAL_MODELS victims."""
    ok = [r for r in records if r["success"]]
    if not ok:
        return []
    accs = sweep_val(setting, attack_name, records, device)
    base = statistics.fmean(r["undefended_val_acc"] for r in ok[:VAL_MODELS])
    return [{"eps": eps, "asr": statistics.fmean(r["sweep"][str(eps)] == r["poison_class"] for r in ok),
             "val_acc": statistics.fmean(accs[str(eps)]), "undefended_val_acc": base}
            for eps in SWEEP]


def recommended_eps(points: dict[str, list[dict]]) -> dict:
    """The smallest ε reaching the lowest mean ASR (over attacks) within MAX_VAL_LOSS of validation accuracy."""
    by_eps = {}
    for eps in SWEEP:
        rows = [p for pts in points.values() for p in pts if p["eps"] == eps]
        if rows:
            by_eps[eps] = (statistics.fmean(p["asr"] for p in rows),
                           statistics.fmean(p["undefended_val_acc"] - p["val_acc"] for p in rows))
    admissible = {e: v for e, v in by_eps.items() if v[1] <= MAX_VAL_LOSS}
    if not admissible:
        return {"eps": None, "reason": f"no ε costs at most {100 * MAX_VAL_LOSS:.0f} points of validation accuracy"}
    best = min(admissible, key=lambda e: (round(admissible[e][0], 6), e))
    return {"eps": best, "mean_asr": admissible[best][0], "val_acc_loss": admissible[best][1]}


def transfer_analysis(setting: Setting, records: dict[str, list[dict]], device) -> dict:
    """Appendix C.1/C.2: label-targeted weights of one victim applied to another's target (FC <-> BP)."""
    pools = {a: [r for r in records.get(a, []) if r["success"]] for a in ("fc", "bp")}
    out = {}
    for src in pools:
        for dst in pools:
            hits, sims, confs = [], [], []
            for rj in pools[dst]:
                sources = [ri for ri in pools[src] if not (src == dst and ri["goal"] == rj["goal"])]
                if not sources:
                    continue
                victim = restore_victim(setting, dst, rj["goal"], device)
                rescaler = ReScaler(victim)
                try:
                    w = torch.tensor([ri["label_targeted_scalars"] for ri in sources])
                    query = (setting.test.images[rj["target_index"]].float()[None].div(255)
                             .expand(len(sources), -1, -1, -1))
                    probs = torch.softmax(rescaler.predict_with(query, w).double(), 1).cpu()
                finally:
                    rescaler.detach()
                own = torch.tensor(rj["label_targeted_scalars"])
                for ri, p in zip(sources, probs.detach()):
                    hits.append(int(p.argmax()) == rj["poison_class"])
                    confs.append(float(p[rj["poison_class"]]))
                    w = torch.tensor(ri["label_targeted_scalars"])
                    # eq. 4 is undefined for two zero vectors (no scalar moved on either target)
                    sims.append(overlap_similarity(w, own) if bool(w.any() or own.any()) else None)
            if not hits:
                continue
            high = [c for c, s in zip(confs, sims) if s is not None and s > SIM_THRESHOLD]
            low = [c for c, s in zip(confs, sims) if s is not None and s <= SIM_THRESHOLD]
            defined = [s for s in sims if s is not None]
            out[f"{src}->{dst}"] = {
                "pairs": len(hits), "transfer_asr": statistics.fmean(hits),
                "mean_similarity": statistics.fmean(defined) if defined else None,
                "poison_conf_sim_above_threshold": statistics.fmean(high) if high else None,
                "poison_conf_sim_below_threshold": statistics.fmean(low) if low else None,
                "pairs_above_threshold": len(high)}
    return out


def class_independence(setting: Setting, records: list[dict], device, victims: int = 5) -> dict | None:
    """Appendix C.2 / Figure 7: overlap of the weights sending one target image to each other class, against
    the overlap of weights sending different targets back to their own classes."""
    ok = [r for r in records if r["success"]]
    if len(ok) < 2:
        return None
    one_target = []
    for r in ok[:victims]:
        victim = restore_victim(setting, "fc", r["goal"], device)
        classes = torch.tensor([c for c in range(victim.num_classes) if c != r["poison_class"]])
        query = setting.test.images[r["target_index"]].float()[None].div(255).expand(len(classes), -1, -1, -1)
        rescaler = ReScaler(victim)
        try:
            w = rescaler.adapt(query, target=classes, eps=TRANSFER_EPS, steps=TRANSFER_STEPS).scalars.cpu()
        finally:
            rescaler.detach()
        one_target += [overlap_similarity(w[a], w[b]) for a in range(len(w)) for b in range(a + 1, len(w))
                       if w[a].any() or w[b].any()]
    weights = [torch.tensor(r["label_targeted_scalars"]) for r in ok]
    across = [overlap_similarity(weights[a], weights[b]) for a in range(len(weights))
              for b in range(a + 1, len(weights)) if weights[a].any() or weights[b].any()]
    return {"one_target_to_other_classes": statistics.fmean(one_target) if one_target else None,
            "different_targets_to_own_class": statistics.fmean(across) if across else None,
            "victims": min(victims, len(ok)), "targets": len(ok)}


def plot(points: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(points)
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for attack, pts in points[model].items():
            if not pts:
                continue
            x = [100 * (1 - pts[0]["undefended_val_acc"])] + [100 * (1 - p["val_acc"]) for p in pts]
            y = [100.0] + [100 * p["asr"] for p in pts]  # ε = 0: the undefended victims (every goal succeeded)
            line, = ax.plot(x, y, marker="o", label=attack)
            x, y = x[1:], y[1:]
            for p, xi, yi in zip(pts, x, y):
                ax.annotate(f"{p['eps']:.2f}", (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_title(f"{model}: ReScaler ε sweep", fontsize=9)
        ax.set_xlabel("validation error (%)")
        ax.set_ylabel("defended ASR (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=140)


def fmt(v) -> str:
    if isinstance(v, (tuple, list)):
        return "n/a" if math.isnan(v[0]) else f"{v[0]:.2f} ± {v[1]:.2f}"
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(GOALS), choices=list(GOALS))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--goals", type=int, default=None, help="goals per cell (default: see GOALS)")
    parser.add_argument("--report-only", action="store_true", help="report the cached goals, craft nothing new")
    parser.add_argument("--chunk", type=int, default=CHUNK, help=f"goals crafted in one batch (default {CHUNK})")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each chunk's job")
    add_sweep_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = data_root()
    train_set = load_dataset("cifar10", root, split="train")
    test_set = load_dataset("cifar10", root, split="test-lossless")
    report = {"guard": guard.__version__, "torch": torch.__version__, "python": platform.python_version(),
              "device": str(device), "threads": args.threads,
              "parameters": {"poisons": POISONS, "protocol": vars(PROTOCOL), "pool": POOL, "eps": EPS,
                             "sweep": SWEEP, "val_models": VAL_MODELS, "attacks": ATTACKS,
                             "transfer_eps": TRANSFER_EPS, "transfer_steps": TRANSFER_STEPS},
              "validation": "CIFAR-10 first 1000 test images (lossless), the goal's target excluded",
              "table": [], "figure2": {}, "recommended_eps": {}, "transfer": {}, "class_independence": {}}
    out_json = OUT / "rescaler_cifar10.json"
    if out_json.is_file():  # models not run now keep their previous results
        previous = json.loads(out_json.read_text())
        report["table"] = [r for r in previous.get("table", []) if r["model"] not in args.models]
        for key in ("figure2", "recommended_eps", "transfer", "class_independence"):
            report[key] = {m: v for m, v in previous.get(key, {}).items() if m not in args.models}
    settings, chunks = {}, []
    for model in args.models:  # feature banks are built here, once, before the chunks that share them run
        n = args.goals or GOALS[model]
        settings[model] = Setting(model, train_set, test_set, n, device)
        if not args.report_only:
            chunks += pending_chunks(model, args.attacks, n, args.chunk)
    grid = Grid(name="rescaler-goals", function=f"{Path(__file__).resolve()}:chunk_job", points=chunks,
                resources=job_resources(args.threads, device))
    for done in run_grid(grid, args):
        p = done.job.params
        if not done.ok:
            print(f"FAILED {p['model']} {p['attack']} goals {p['indices']}: {done.record['error']}", flush=True)
            continue
        print(f"{p['model']} {p['attack']} goals {p['indices'][0] + 1}-{p['indices'][-1] + 1}/{p['goals']}: "
              f"{done.result['successes']} successes, {done.result['still_poisoned']} still poisoned under "
              f"ReScaler [{done.record['seconds']:.0f} s]", flush=True)
    for model in args.models:
        n, setting = args.goals or GOALS[model], settings[model]
        records = {}
        for attack in args.attacks:
            paths = [goal_path(model, attack, i) for i in range(n)]
            found = [json.loads(p.read_text()) for p in paths if p.is_file()]
            if not found:  # a cell never crafted (--report-only over attacks not run on this model)
                continue
            records[attack] = found
            row = table_row(model, attack, found)
            report["table"].append(row)
            print(f"{model} {attack}: SA {row['sa']}/{row['goals']}  def ASR {fmt(row.get('defended_asr'))}  "
                  f"served ASR {fmt(row['served_asr'])} ({row['flipped_to_poison']} failures flipped)  "
                  f"put-back {fmt(row.get('put_back'))}  val {fmt(row.get('undefended_val_acc'))} -> "
                  f"{fmt(row.get('defended_val_acc'))}", flush=True)
        points = {a: sweep_summary(setting, a, records[a], device) for a in records}
        report["figure2"][model] = points
        report["recommended_eps"][model] = recommended_eps(points)
        report["transfer"][model] = transfer_analysis(setting, records, device)
        if "fc" in records:
            report["class_independence"][model] = class_independence(setting, records["fc"], device)
        out_json.write_text(json.dumps(report, indent=2, default=str))
        plot(report["figure2"], OUT / "rescaler_cifar10.png")
        print(f"{model}: recommended ε {report['recommended_eps'][model]}; wrote {out_json}", flush=True)


if __name__ == "__main__":
    main()
