"""guard.train: config validation, learning, last-layer freezing, exact resumption, checkpoints, evaluation."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from torch import nn

import guard
from guard.data import ImageTensorDataset
from guard.models import create
from guard.train import TrainConfig, evaluate, lr_factor, predict, train, train_state_path
from outcomes import SEED, check

COLORS = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=torch.float32)


def color_dataset(n: int, seed: int) -> ImageTensorDataset:
    """A separable 4-class problem at 16x16: each class is a noisy colour."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = COLORS[labels][:, :, None, None] + 50 * torch.randn(n, 3, 16, 16, generator=g)
    return ImageTensorDataset(images.clamp(0, 255).to(torch.uint8), labels, ["red", "green", "blue", "yellow"])


@pytest.fixture(scope="module")
def train_set() -> ImageTensorDataset:
    return color_dataset(200, seed=SEED)


@pytest.fixture(scope="module")
def test_set() -> ImageTensorDataset:
    return color_dataset(200, seed=SEED + 1000)


def tiny(seed: int = 0) -> guard.models.GuardModel:
    return create("tiny_resnet", num_classes=4, generator=torch.Generator().manual_seed(seed))


def fast(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "lr": 0.05, "batch_size": 32, "weight_decay": 0.0, **overrides})


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


class PlainDataset(torch.utils.data.Dataset):
    """A generic dataset (no fast path) over the same images."""

    def __init__(self, base: ImageTensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return self.base[i]


# ---------------------------------------------------------------------------------------------- config

def test_presets():
    s = TrainConfig.scratch()
    assert (s.epochs, s.lr, s.momentum, s.weight_decay, s.batch_size, s.schedule, s.mode) == \
        (120, 0.1, 0.9, 5e-4, 128, "cosine", "scratch")
    ll = TrainConfig.last_layer()
    assert (ll.epochs, ll.lr, ll.optimizer, ll.mode, ll.schedule) == (35, 0.01, "sgd", "last-layer", "none")
    ft = TrainConfig.finetune(epochs=3)
    assert (ft.epochs, ft.lr, ft.weight_decay, ft.mode) == (3, 1e-4, 1e-4, "finetune")


def test_config_pickles_and_normalizes_milestones():
    config = TrainConfig(epochs=10, lr=0.1, schedule="multistep", milestones=[3, 6])
    assert config.milestones == (3, 6)
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0


@pytest.mark.parametrize("overrides, error, match", [
    ({"epochs": 0}, ValueError, "epochs must be an int >= 1, got 0"),
    ({"epochs": 2.0}, ValueError, "epochs must be an int"),
    ({"lr": -0.1}, ValueError, "lr must be a finite number > 0, got -0.1"),
    ({"lr": float("nan")}, ValueError, "lr must be"),
    ({"momentum": 1.0}, ValueError, r"momentum must be a number in \[0, 1\)"),
    ({"weight_decay": -1e-4}, ValueError, "weight_decay"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"optimizer": "rmsprop"}, ValueError, "optimizer must be one of.*'rmsprop'"),
    ({"nesterov": True, "optimizer": "adam"}, ValueError, "nesterov=True needs optimizer='sgd'"),
    ({"schedule": "step"}, ValueError, "schedule must be one of"),
    ({"schedule": "multistep"}, ValueError, "strictly increasing milestones"),
    ({"schedule": "multistep", "milestones": (5, 3)}, ValueError, "strictly increasing"),
    ({"schedule": "multistep", "milestones": (2, 10)}, ValueError, r"in \[1, 9\]"),
    ({"milestones": (3,)}, ValueError, "milestones apply to schedule='multistep' only"),
    ({"milestones": "30"}, TypeError, "sequence of ints"),
    ({"gamma": 0.0}, ValueError, "gamma"),
    ({"augment": 1}, TypeError, "augment must be a bool"),
    ({"jpeg": 1.5}, ValueError, r"jpeg must be a probability in \[0, 1\], got 1.5"),
    ({"jpeg_quality": (95, 50)}, ValueError, r"jpeg_quality must be a pair .* got \(95, 50\)"),
    ({"jpeg_quality": 75}, ValueError, "jpeg_quality must be a pair"),
    ({"mode": "transfer"}, ValueError, "mode must be one of.*'last-layer'"),
    ({"steps_per_epoch": 0}, ValueError, "steps_per_epoch"),
])
def test_config_rejects_bad_values(overrides, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**{"epochs": 10, "lr": 0.1, **overrides})


def test_lr_factor():
    cosine = TrainConfig(epochs=4, lr=1.0)
    assert [round(lr_factor(cosine, e), 6) for e in range(4)] == [1.0, 0.853553, 0.5, 0.146447]
    steps = TrainConfig(epochs=40, lr=1.0, schedule="multistep", milestones=(30, 35), gamma=0.1)
    assert [lr_factor(steps, e) for e in (0, 29, 30, 34, 35)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert lr_factor(TrainConfig(epochs=3, lr=1.0, schedule="none"), 2) == 1.0


# -------------------------------------------------------------------------------------------- learning

@pytest.mark.outcome
def test_training_learns_a_separable_problem(train_set, test_set):
    model = tiny(SEED)
    before = evaluate(model, test_set)
    rng = torch.get_rng_state()
    result = train(model, train_set, fast(epochs=4), eval_set=test_set,
                   generator=torch.Generator().manual_seed(SEED), progress=False)
    assert torch.equal(torch.get_rng_state(), rng), "training must not touch the global RNG"
    losses = [h.loss for h in result.history]
    assert len(result.history) == 4 and not result.stopped_early
    check("last / first epoch loss", losses[-1] / losses[0], high=0.5)
    assert result.last.eval_accuracy == evaluate(model, test_set)
    check("accuracy after training", result.last.eval_accuracy, low=0.9)
    check("accuracy gain", result.last.eval_accuracy - before, low=0.3)
    assert [h.lr for h in result.history] == pytest.approx([0.05 * lr_factor(fast(epochs=4), e) for e in range(4)])
    assert all(h.steps == 7 for h in result.history)  # ceil(200 / 32)
    assert not model.training, "the model is left in eval mode"


def test_same_seed_same_weights_and_other_seed_differs(train_set):
    runs = []
    for seed in (3, 3, 4):
        model = tiny()
        train(model, train_set, fast(epochs=1), generator=torch.Generator().manual_seed(seed), progress=False)
        runs.append(state_of(model))
    assert_same_state(runs[0], runs[1])
    assert not torch.equal(runs[0]["net.linear.weight"], runs[2]["net.linear.weight"])


def test_generic_dataset_path_matches_fast_path(train_set):
    """A plain Dataset goes through a DataLoader but gets the same batches and augmentation."""
    a, b = tiny(), tiny()
    train(a, train_set, fast(), generator=torch.Generator().manual_seed(1), progress=False)
    train(b, PlainDataset(train_set), fast(), generator=torch.Generator().manual_seed(1), progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-5), k


def test_augment_mask_false_means_no_augmentation(train_set):
    a, b = tiny(), tiny()
    train(a, train_set, fast(epochs=1, augment=False), generator=torch.Generator().manual_seed(2), progress=False)
    train(b, train_set, fast(epochs=1), generator=torch.Generator().manual_seed(2), progress=False,
          augment_mask=torch.zeros(len(train_set), dtype=torch.bool))
    assert_same_state(state_of(a), state_of(b))
    c = tiny()
    train(c, train_set, fast(epochs=1), generator=torch.Generator().manual_seed(2), progress=False,
          augment_mask=torch.ones(len(train_set), dtype=torch.bool))
    assert not torch.equal(state_of(a)["net.linear.weight"], state_of(c)["net.linear.weight"])


def test_jpeg_augmentation_reproducible_and_masked(train_set):
    """``jpeg`` re-encodes part of every batch (from the run's generator); ``augment_mask`` spares the same samples
    from it as from the crop and flip; at 0 nothing is drawn, so runs without it are unchanged."""
    runs = {}
    for name, config, mask in [("plain", fast(epochs=1), None), ("jpeg", fast(epochs=1, jpeg=0.5), None),
                               ("again", fast(epochs=1, jpeg=0.5), None),
                               ("masked", fast(epochs=1, jpeg=0.5), torch.zeros(len(train_set), dtype=torch.bool)),
                               ("bare", fast(epochs=1, augment=False), None)]:
        model = tiny()
        train(model, train_set, config, generator=torch.Generator().manual_seed(2), progress=False,
              augment_mask=mask)
        runs[name] = state_of(model)
    assert_same_state(runs["jpeg"], runs["again"])
    assert not torch.equal(runs["jpeg"]["net.linear.weight"], runs["plain"]["net.linear.weight"])
    assert_same_state(runs["masked"], runs["bare"])


def test_resume_of_a_checkpoint_written_before_a_config_field_existed(train_set, tmp_path):
    """A field added to TrainConfig since a checkpoint was written compares as its default on resume."""
    config = fast(epochs=2)
    model = tiny()
    train(model, train_set, config, generator=torch.Generator().manual_seed(0), checkpoint=tmp_path / "m.pt",
          progress=False, callback=lambda s: True)
    path = train_state_path(tmp_path / "m.pt")
    state = torch.load(path, weights_only=True)
    del state["config"]["jpeg"], state["config"]["jpeg_quality"]
    torch.save(state, path)
    result = train(tiny(), train_set, config, checkpoint=tmp_path / "m.pt", resume=True, progress=False)
    assert len(result.history) == 2
    with pytest.raises(ValueError, match="jpeg: checkpoint 0.0 vs now 0.5"):
        train(tiny(), train_set, fast(epochs=2, jpeg=0.5), checkpoint=tmp_path / "m.pt", resume=True,
              progress=False)


def test_extra_loss_is_added_to_every_batch(train_set):
    plain, extra = tiny(), tiny()
    a = train(plain, train_set, fast(epochs=1), generator=torch.Generator().manual_seed(4), progress=False)
    shapes = []

    def constant(x, y, logits):
        shapes.append((tuple(x.shape), x.dtype, tuple(y.shape), tuple(logits.shape)))
        return torch.tensor(1.0)  # no gradient: the weights must follow the plain run exactly

    b = train(extra, train_set, fast(epochs=1), generator=torch.Generator().manual_seed(4), progress=False,
              extra_loss=constant)
    assert_same_state(state_of(plain), state_of(extra))
    assert b.last.loss == pytest.approx(a.last.loss + 1.0)
    assert len(shapes) == 7 and shapes[0] == ((32, 3, 16, 16), torch.float32, (32,), (32, 4))


def conv_layouts(model: nn.Module) -> set[str]:
    return {"standard" if w.is_contiguous() else "channels-last" for w in model.parameters() if w.dim() == 4}


def test_channels_last_changes_the_speed_not_the_training(train_set):
    """The channels-last run (the CPU default) and the standard-layout run take the same steps up to float
    rounding (compared over 3 steps: rounding differences grow chaotically over a long run), and both hand the
    model back in the standard layout."""
    inputs, default, standard = [], tiny(), tiny()

    def record(x, y, logits):
        inputs.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return torch.zeros(())

    config = fast(epochs=1, steps_per_epoch=3)
    a = train(default, train_set, config, generator=torch.Generator().manual_seed(3), progress=False,
              extra_loss=record)
    b = train(standard, train_set, config, generator=torch.Generator().manual_seed(3), progress=False,
              channels_last=False)
    assert inputs == [True] * 3
    assert conv_layouts(default) == conv_layouts(standard) == {"standard"}
    for (name, wa), wb in zip(default.state_dict().items(), standard.state_dict().values()):
        torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-4, msg=name)
    assert a.last.loss == pytest.approx(b.last.loss, rel=1e-5)
    with pytest.raises(TypeError, match="channels_last must be None or a bool, got str"):
        train(tiny(), train_set, fast(), progress=False, channels_last="yes")


def test_a_failed_run_hands_back_the_standard_layout(train_set):
    model = tiny()

    def fail(x, y, logits):
        assert all(not w.is_contiguous() for w in model.parameters() if w.dim() == 4)  # channels-last inside
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        train(model, train_set, fast(), progress=False, extra_loss=fail)
    assert conv_layouts(model) == {"standard"} and not model.training


def test_steps_per_epoch_streams_across_passes(train_set):
    seen = []
    result = train(tiny(), train_set, fast(epochs=3, steps_per_epoch=3, batch_size=50),
                   generator=torch.Generator().manual_seed(0), progress=False, callback=seen.append)
    assert [h.steps for h in result.history] == [3, 3, 3] and seen == list(result.history)


def test_callback_stops_early(train_set):
    result = train(tiny(), train_set, fast(epochs=5), generator=torch.Generator().manual_seed(0), progress=False,
                   callback=lambda stats: stats.epoch == 2)
    assert len(result.history) == 2 and result.stopped_early


def test_divergence_is_reported(train_set):
    with pytest.raises(FloatingPointError, match="diverged.*lower the learning rate"):
        train(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)), train_set, fast(epochs=3, lr=1e38),
              generator=torch.Generator().manual_seed(0), progress=False)


# ----------------------------------------------------------------------------------------- last layer

def test_last_layer_mode_changes_only_the_classifier(train_set):
    model = tiny()
    model.train()  # the mode before training must not leak into BatchNorm statistics
    before = state_of(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    result = train(model, train_set, TrainConfig.last_layer(epochs=2, batch_size=32),
                   generator=torch.Generator().manual_seed(0), progress=False)
    after = state_of(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"net.linear.weight", "net.linear.bias"}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags, "requires_grad restored"
    assert result.history[-1].loss < result.history[0].loss and not model.training


def test_scratch_mode_updates_batchnorm_statistics(train_set):
    model = tiny()
    before = state_of(model)
    train(model, train_set, fast(epochs=1), generator=torch.Generator().manual_seed(0), progress=False)
    after = state_of(model)
    assert not torch.equal(before["net.bn1.running_mean"], after["net.bn1.running_mean"])
    assert not torch.equal(before["net.conv1.weight"], after["net.conv1.weight"])


def test_last_layer_needs_a_classifier(train_set):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    with pytest.raises(TypeError, match="classifier is the final nn.Linear"):
        train(model, train_set, TrainConfig.last_layer(epochs=1), progress=False)


# -------------------------------------------------------------------------------- checkpoints and resume

@pytest.mark.parametrize("steps_per_epoch", [None, 4])
def test_resume_equals_uninterrupted_training(train_set, test_set, tmp_path, steps_per_epoch):
    config = fast(epochs=3, steps_per_epoch=steps_per_epoch, batch_size=48)
    full = tiny()
    expected = train(full, train_set, config, eval_set=test_set, generator=torch.Generator().manual_seed(7),
                     checkpoint=tmp_path / "full.pt", progress=False)

    first = tiny()
    partial = train(first, train_set, config, eval_set=test_set, generator=torch.Generator().manual_seed(7),
                    checkpoint=tmp_path / "run.pt", progress=False, callback=lambda s: s.epoch == 1)
    assert len(partial.history) == 1 and partial.stopped_early
    resumed_model = tiny(seed=123)  # different init: everything must come from the checkpoint
    resumed = train(resumed_model, train_set, config, eval_set=test_set, generator=torch.Generator().manual_seed(99),
                    checkpoint=tmp_path / "run.pt", resume=True, progress=False)
    assert_same_state(state_of(full), state_of(resumed_model))
    strip = [dataclasses.replace(h, seconds=0.0) for h in expected.history]
    assert [dataclasses.replace(h, seconds=0.0) for h in resumed.history] == strip


def test_resume_of_a_finished_run_changes_nothing(train_set, tmp_path):
    config = fast(epochs=1)
    model = tiny()
    train(model, train_set, config, generator=torch.Generator().manual_seed(0), checkpoint=tmp_path / "m.pt",
          progress=False)
    again = tiny(seed=5)
    result = train(again, train_set, config, checkpoint=tmp_path / "m.pt", resume=True, progress=False)
    assert len(result.history) == 1
    assert_same_state(state_of(model), state_of(again))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_loads_with_create(train_set, tmp_path, suffix):
    model = tiny()
    path = tmp_path / f"model{suffix}"
    train(model, train_set, fast(epochs=1), generator=torch.Generator().manual_seed(0), checkpoint=path,
          progress=False)
    loaded = create("tiny_resnet", num_classes=4, weights=path)
    assert_same_state(state_of(model), state_of(loaded))
    x = train_set.images[:8].float() / 255
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    state = torch.load(train_state_path(path), weights_only=True)
    assert state["config"]["epochs"] == 1 and len(state["history"]) == 1
    assert not list(tmp_path.glob(".*tmp*")), "temporary files are renamed into place"


def test_resume_errors(train_set, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt does not exist"):
        train(tiny(), train_set, fast(), checkpoint=tmp_path / "missing.pt", resume=True, progress=False)
    with pytest.raises(ValueError, match="resume=True needs the checkpoint"):
        train(tiny(), train_set, fast(), resume=True, progress=False)
    train(tiny(), train_set, fast(epochs=1), checkpoint=tmp_path / "m.pt", progress=False,
          generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="different config.*lr: checkpoint 0.05 vs now 0.1"):
        train(tiny(), train_set, fast(epochs=1, lr=0.1), checkpoint=tmp_path / "m.pt", resume=True, progress=False)
    with pytest.raises(TypeError, match="checkpoint needs a guard.models.GuardModel"):
        train(nn.Sequential(nn.Flatten(), nn.Linear(768, 4)), train_set, fast(), checkpoint=tmp_path / "x.pt",
              progress=False)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"train_set": torch.zeros(4, 3, 16, 16)}, TypeError, "torch Dataset"),
    ({"config": {"epochs": 1}}, TypeError, "config must be a TrainConfig"),
    ({"generator": 0}, TypeError, "CPU torch.Generator"),
    ({"augment_mask": torch.ones(3, dtype=torch.bool)}, ValueError, r"shape \(200,\), got torch.bool \(3,\)"),
    ({"augment_mask": torch.ones(200)}, ValueError, "bool tensor"),
    ({"eval_set": ImageTensorDataset(torch.zeros(0, 3, 16, 16, dtype=torch.uint8),
                                     torch.zeros(0, dtype=torch.int64), ["a"])}, ValueError, "eval_set is empty"),
])
def test_train_rejects_bad_arguments(train_set, kwargs, error, match):
    args = {"train_set": train_set, "config": fast(), **kwargs}
    with pytest.raises(error, match=match):
        train(tiny(), args.pop("train_set"), args.pop("config"), progress=False, **args)


# ----------------------------------------------------------------------------------------- evaluation

class Recorder(nn.Module):
    """Predicts class 2 everywhere and records the autograd mode it ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.0, 0.0, 1.0, 0.0]))
        self.modes: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return self.bias.expand(x.shape[0], 4)


def test_evaluate_modes_and_defense(test_set):
    model = Recorder()
    expected = (test_set.labels == 2).double().mean().item()
    assert evaluate(model, test_set, batch_size=64) == pytest.approx(expected)
    assert model.modes == [(False, True)] * 4, "plain evaluation runs under inference_mode"

    calls = []

    def defense(x):
        calls.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled(), x.shape[0]))
        return torch.nn.functional.one_hot(torch.zeros(x.shape[0], dtype=torch.int64), 4).float()

    with torch.no_grad():
        accuracy = evaluate(model, test_set, batch_size=64, defense=defense)
    assert accuracy == pytest.approx((test_set.labels == 0).double().mean().item())
    assert calls == [(True, False, 64)] * 3 + [(True, False, 8)], "a defense runs with gradients enabled"


def test_predict_with_rescaler_matches_rescaler(test_set):
    model = tiny()
    rescaler = guard.ReScaler(model, eps=0.15)
    try:
        defended = predict(model, test_set, batch_size=50, defense=rescaler)
        x = test_set.images.float() / 255
        assert torch.equal(defended, rescaler.adapt(x).logits.argmax(1))
    finally:
        rescaler.detach()
    with torch.no_grad():
        assert torch.equal(predict(model, PlainDataset(test_set), batch_size=33), model(x).argmax(1))


def test_evaluate_rejects_bad_arguments(test_set):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        evaluate(tiny(), test_set, batch_size=0)
    with pytest.raises(TypeError, match="defense must be a callable"):
        evaluate(tiny(), test_set, defense=3)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        evaluate(lambda x: x, test_set)

