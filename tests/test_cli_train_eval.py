"""``guard train`` and ``guard eval`` end to end on real CIFAR-10 images, and their error reporting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guard.cli import CLIError, main
from guard.cli.evaluate import parse_rescaler
from guard.data import load_dataset
from guard.models import create, save_weights
from guard.train import evaluate, train_state_path


@pytest.fixture(scope="module")
def cifar_subset(data_root: Path, tmp_path_factory) -> Path:
    """A small copy of the real CIFAR-10 in the npz layout: 512 training and 200 lossless test images."""
    root = tmp_path_factory.mktemp("cifar_subset")
    (root / "cifar10").mkdir()
    for name, x_key, y_key, n in (("cifar10_train_0", "x_train", "y_train", 512),
                                  ("cifar10_test_lossless_first1000", "x_test", "y_test", 200)):
        with np.load(data_root / "cifar10" / f"{name}.npz") as f:
            np.savez(root / "cifar10" / f"{name}.npz", **{x_key: f[x_key][:n], y_key: f[y_key][:n]})
    np.savez(root / "cifar10" / "cifar10_train_1.npz", x_train=np.zeros((0, 32, 32, 3), np.uint8),
             y_train=np.zeros(0, np.int64))
    return root


def run_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def run_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_train_then_eval_round_trip(cifar_subset, tmp_path, capsys):
    out = tmp_path / "tiny.pt"
    trained = run_json(capsys, "train", "--model", "tiny_resnet", "--dataset", "cifar10", "--data-dir",
                       str(cifar_subset), "--epochs", "1", "--lr", "0.05", "--batch-size", "64", "--seed", "3",
                       "--eval-split", "test-lossless", "--out", str(out), "--no-progress", "--json")
    assert trained["train_images"] == 512 and trained["epochs"] == 1 and trained["mode"] == "scratch"
    assert trained["history"][0]["steps"] == 8 and np.isfinite(trained["loss"])
    assert trained["config"]["lr"] == 0.05 and trained["config"]["schedule"] == "cosine"  # preset + overrides
    assert out.is_file() and train_state_path(out).is_file() and trained["weights"] == str(out)

    model = create("tiny_resnet", weights=out)  # the checkpoint loads through the registry
    test = load_dataset("cifar10", cifar_subset, split="test-lossless", image_size=16)
    assert trained["eval_accuracy"] == pytest.approx(evaluate(model, test))

    result = run_json(capsys, "eval", "--model", "tiny_resnet", "--weights", str(out), "--dataset", "cifar10",
                      "--data-dir", str(cifar_subset), "--split", "test-lossless", "--limit", "64",
                      "--rescaler", "eps=0.15,alpha=1.0", "--batch-size", "32", "--json")
    assert result["n"] == 64 and result["split"] == "test-lossless"
    assert result["accuracy"] == pytest.approx(evaluate(model, test.subset(range(64))))
    assert 0.0 <= result["defended_accuracy"] <= 1.0 and 0.0 <= result["changed_predictions"] <= 1.0
    assert result["rescaler"] == {"eps": 0.15, "alpha": 1.0, "steps": 1} and result["num_scalars"] > 0
    for key in ("seconds", "images_per_second", "defended_seconds", "defended_images_per_second"):
        assert result[key] > 0

    plain = run_json(capsys, "eval", "--model", "tiny_resnet", "--weights", str(out), "--data-dir",
                     str(cifar_subset), "--split", "test-lossless", "--limit", "64", "--json")
    assert "defended_accuracy" not in plain and plain["accuracy"] == result["accuracy"]

    # resuming a finished run trains nothing more and keeps the weights
    before = out.read_bytes()
    resumed = run_json(capsys, "train", "--model", "tiny_resnet", "--data-dir", str(cifar_subset), "--epochs", "1",
                       "--lr", "0.05", "--batch-size", "64", "--seed", "3", "--eval-split", "test-lossless",
                       "--out", str(out), "--resume", "--no-progress", "--json")
    assert resumed["history"] == trained["history"] and out.read_bytes() == before
    err = run_error(capsys, "train", "--model", "tiny_resnet", "--data-dir", str(cifar_subset), "--epochs", "2",
                    "--out", str(out), "--resume", "--no-progress")
    assert "different config" in err and "epochs: checkpoint 1 vs now 2" in err


def test_last_layer_training_from_weights(cifar_subset, tmp_path, capsys):
    base = tmp_path / "base.pt"
    run_json(capsys, "train", "--model", "tiny_resnet", "--data-dir", str(cifar_subset), "--epochs", "1",
             "--limit", "128", "--out", str(base), "--no-progress", "--json")
    tuned = tmp_path / "tuned.safetensors"
    result = run_json(capsys, "train", "--model", "tiny_resnet", "--data-dir", str(cifar_subset), "--mode",
                      "last-layer", "--weights", str(base), "--epochs", "1", "--limit", "128", "--out", str(tuned),
                      "--jpeg", "0.5", "--no-progress", "--json")
    assert result["config"]["mode"] == "last-layer" and result["config"]["lr"] == 0.01
    assert result["config"]["jpeg"] == 0.5
    a = create("tiny_resnet", weights=base).state_dict()
    b = create("tiny_resnet", weights=tuned).state_dict()
    assert {k for k in a if not torch.equal(a[k], b[k])} == {"net.linear.weight", "net.linear.bias"}


def test_imagefolder_train_and_eval(tmp_path, capsys):
    """A non-CIFAR dataset: class folders of 24x24 images, resized to the model's 16x16, two classes."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls, color in (("ants", (220, 40, 40)), ("bees", (40, 40, 220))):
        (folder / cls).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(color) + rng.normal(0, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / cls / f"{i}.png")
    out = tmp_path / "two.pt"
    trained = run_json(capsys, "train", "--model", "tiny_resnet", "--dataset", "imagefolder", "--data-dir",
                       str(folder), "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress", "--json")
    assert trained["train_images"] == 24 and trained["split"] == "train"
    result = run_json(capsys, "eval", "--model", "tiny_resnet", "--weights", str(out), "--dataset", "imagefolder",
                      "--data-dir", str(folder), "--rescaler", "--json")
    assert result["n"] == 24 and 0 <= result["accuracy"] <= 1 and "defended_accuracy" in result
    assert create("tiny_resnet", num_classes=2, weights=out).num_classes == 2


def test_pretrained_resnet20_through_guard_eval(data_root, resnet20_weights, capsys):
    result = run_json(capsys, "eval", "--model", "resnet20", "--weights", str(resnet20_weights), "--dataset",
                      "cifar10", "--data-dir", str(data_root), "--split", "test-lossless", "--json")
    assert result["n"] == 1000 and result["accuracy"] >= 0.91


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "tiny_resnet", "--mode", "finetune", "--out", "x.pt"], "--mode finetune needs --weights"),
    (["train", "--model", "tiny_resnet", "--weights", "w.pt", "--out", "x.pt"], "use --mode finetune"),
    (["train", "--model", "tiny_resnet", "--epochs", "0", "--out", "x.pt"], "epochs must be an int >= 1"),
    (["train", "--model", "tiny_resnet", "--schedule", "multistep", "--out", "x.pt"], "milestones"),
    (["train", "--model", "tiny_resnet", "--jpeg", "2", "--out", "x.pt"], r"jpeg must be a probability"),
    (["train", "--model", "nope", "--out", "x.pt"], "unknown model 'nope'"),
    (["eval", "--model", "tiny_resnet", "--weights", "w.pt", "--rescaler", "eps=2"], "--rescaler: eps must be"),
    (["eval", "--model", "tiny_resnet", "--weights", "w.pt", "--device", "tpu9"], "--device"),
    (["eval", "--model", "tiny_resnet", "--weights", "w.pt", "--attack", "fc"], "give the goal with --attack-goal"),
    (["eval", "--model", "tiny_resnet", "--weights", "w.pt", "--attack", "badnets", "--attack-goal", "target=1"],
     "--attack-goal needs a transfer attack"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = run_error(capsys, *argv, "--data-dir", str(tmp_path))
    assert message in err and err.startswith(f"guard {argv[0]}: error:") and err.count("\n") == 1


def test_missing_data_names_the_fix(tmp_path, capsys):
    err = run_error(capsys, "eval", "--model", "tiny_resnet", "--weights", "w.pt", "--data-dir", str(tmp_path))
    assert "CIFAR-10 not found" in err and "--download" in err and "GUARD_DATA_DIR" in err


def test_parse_rescaler():
    assert parse_rescaler("eps=0.05, alpha=2,steps=3") == {"eps": 0.05, "alpha": 2.0, "steps": 3}
    assert parse_rescaler("") == {"eps": 0.15, "alpha": 1.0, "steps": 1}
    assert isinstance(parse_rescaler("steps=2")["steps"], int)


@pytest.mark.parametrize("spec, message", [
    ("epsilon=0.1", "unknown key 'epsilon'; expected one of eps, alpha, steps"),
    ("eps", "expected key=value items"),
    ("eps=abc", "eps expects a number, got 'abc'"),
    ("steps=1.5", "steps expects an int, got '1.5'"),
    ("eps=0.1,eps=0.2", "eps given twice"),
    ("alpha=-1", "alpha must be"),
    ("eps=nan", "eps must be"),
])
def test_parse_rescaler_rejects(spec, message):
    with pytest.raises(CLIError, match=message.replace("(", r"\(")):
        parse_rescaler(spec)


def test_one_attack_goal_through_guard_eval(cifar_subset, tmp_path, capsys):
    """``guard eval --attack-goal``: one row of ReScaler's Table 1 for one goal, consistent with itself."""
    weights = tmp_path / "tiny.pt"
    save_weights(create("tiny_resnet", generator=torch.Generator().manual_seed(0)), weights)
    test = load_dataset("cifar10", cifar_subset, split="test-lossless")
    poison_class = (int(test.labels[5]) + 1) % 10
    base = ["eval", "--model", "tiny_resnet", "--weights", str(weights), "--data-dir", str(cifar_subset),
            "--split", "test-lossless", "--attack", "fc", "--attack-opt", "iterations=3"]
    result = run_json(capsys, *base, "--attack-goal", f"target=5,poison_class={poison_class},poisons=3,"
                      "finetune_images=40,epochs=2", "--rescaler", "eps=0.1", "--json")
    goal = result["attack_goal"]
    assert goal["goal"]["target_class"] == int(test.labels[5]) and goal["goal"]["poison_class"] == poison_class
    train_labels = load_dataset("cifar10", cifar_subset, split="train").labels
    assert len(goal["goal"]["base_indices"]) == 3
    assert set(train_labels[goal["goal"]["base_indices"]].tolist()) == {poison_class}
    assert goal["success"] == (goal["undefended_label"] == poison_class)
    assert goal["put_back"] == (goal["defended_label"] == goal["goal"]["target_class"])
    assert goal["rescaler"]["eps"] == 0.1 and goal["protocol"]["finetune_images"] == 40
    assert 0 <= goal["defended_val_acc"] <= 1 and 0 <= goal["undefended_val_acc"] <= 1
    for spec, message in (("poison_class=1", "target required"), ("target=5,poison_class=" + str(int(test.labels[5])),
                          "other than the target's class"), ("target=999,poison_class=1", "target=999 is not an image"),
                          ("target=5,poison_class=1,epochs=0", "epochs must be an int >= 1"),
                          ("target=5,colour=3", "expected key=value items with keys")):
        err = run_error(capsys, *base, "--attack-goal", spec)
        assert message in err and err.count("\n") == 1, err
