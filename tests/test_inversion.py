"""The trigger inversion engine (guard.detect.inversion): batched == one task at a time for every trigger
form and schedule, the cost schedule and optimiser against hand-made numbers, models left as found (also
after an injected failure), and bad input refused clearly."""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch

from guard.detect import (AdditiveTrigger, CostSchedule, FixedSteps, InversionConfig, InversionTask, LogSurrogate,
                          MaskPatternTrigger, Objective, TargetCrossEntropy, TriggeredBatch, UntilSuccess, class_tasks,
                          frozen, invert, pair_tasks)
from guard.detect.inversion import (ACCELERATOR_CHUNK_SIZE, CPU_CHUNK_SIZE, _CostState, _TaskOptimizer,
                                    default_chunk_size)
from test_repair import TARGET, planted


@functools.lru_cache(maxsize=1)
def double_model():
    """The planted backdoored tiny model in float64, so that batched and one-at-a-time runs agree to rounding."""
    return copy.deepcopy(planted().backdoored).double().eval()


def _images():
    p = planted()
    return p.test_set.images[:120], p.test_set.labels[:120]


#: (trigger form, schedule, engine options, task kind) — every form and schedule, both samplings
CASES = {
    "nc": (MaskPatternTrigger(), CostSchedule(0.9, 1e-3, patience=2, multiplier=2.0, start_at_zero=True,
                                              early_stop_patience=4),
           dict(steps=12, batch_size=16, sampling="random", batches_per_step=2), "universal"),
    "moth": (MaskPatternTrigger(), CostSchedule(0.9, 1e-3, patience=2, multiplier=1.5, start_at_zero=False,
                                                restart_noise=0.01),
             dict(steps=8, batch_size=8, sampling="epoch"), "pairs"),
    "cnc": (AdditiveTrigger(0.0, 0.01), FixedSteps(),
            dict(steps=6, batch_size=16, sampling="random", flip=True, lr=0.01), "universal"),
    "xiang": (AdditiveTrigger(0.0, 0.0, norm="l2"), UntilSuccess(0.9, measure="full"),
              dict(steps=10, batch_size=8, sampling="random", optimizer="sgd", lr=0.05), "removal"),
    "xiang-normalized": (AdditiveTrigger(0.0, 0.0, norm="l2"), UntilSuccess(0.9),
                         dict(steps=10, batch_size=8, sampling="random", optimizer="normalized", lr=0.2), "removal"),
}


def _tasks(kind: str):
    images, labels = _images()
    g = torch.Generator().manual_seed(7)
    if kind == "universal":
        return class_tasks(images, labels, range(4), generator=g)
    pairs = [(1, 0), (2, 0), (0, 3), (3, 2)]
    return pair_tasks(images, labels, num_classes=4, generator=g, max_images=20, pairs=pairs,
                      removal=kind == "removal")


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_inversion_equals_one_task_at_a_time(case):
    form, schedule, options, kind = CASES[case]
    model = double_model()
    objective = (LogSurrogate if kind == "removal" else TargetCrossEntropy)(model)
    tasks = _tasks(kind)
    batched = invert(tasks, objective, InversionConfig(form, schedule, chunk_size=40, **options))
    singles = [invert([task], objective, InversionConfig(form, schedule, **options)) for task in tasks]
    for i, single in enumerate(singles):
        assert batched.steps[i] == single.steps[0]
        assert batched.found[i] == single.found[0]
        assert (batched.triggers[i] is None) == (single.triggers[0] is None)
        if single.triggers[0] is not None:
            for name in form.names:
                torch.testing.assert_close(batched.triggers[i][name], single.triggers[0][name], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(batched.size[i], single.size[0], rtol=1e-9, atol=0)
        torch.testing.assert_close(batched.first_loss[i], single.first_loss[0], rtol=1e-9, atol=1e-12,
                                   equal_nan=True)
    # the run exercised the schedule: something found, and (cost schedules) not everything trivially
    assert bool(batched.found.any())
    assert batched.size.dtype == torch.float64 and batched.seconds > 0


def test_cost_schedule_follows_the_nc_counters():
    """P3 by hand: patience 2, ×2 up (from 0 to init_cost), ÷2^1.5 down, early stop after both moved."""
    state = _CostState(CostSchedule(0.9, 1e-3, patience=2, multiplier=2.0, start_at_zero=True,
                                    early_stop_patience=3))
    trace = []
    for asr, size in [(1.0, 10.0), (1.0, 9.0), (1.0, 9.5), (1.0, 9.5), (0.5, 9.0), (0.5, 9.0), (0.5, 9.0)]:
        record, done = state.update(asr, size)
        trace.append((record, done, state.cost))
    assert [t[0] for t in trace] == [True, True, False, False, False, False, False]
    assert [t[2] for t in trace[:4]] == [0.0, 1e-3, 1e-3, 2e-3]
    assert trace[5][2] == pytest.approx(2e-3 / 2 ** 1.5)
    assert [t[1] for t in trace] == [False] * 6 + [True]  # up and down both happened, best stale 3 steps
    moth = _CostState(CostSchedule(0.9, 1e-3, patience=2, multiplier=1.5, start_at_zero=False))
    assert moth.cost == 1e-3
    moth.update(1.0, 5.0)
    moth.update(1.0, 5.0)
    assert moth.cost == pytest.approx(1.5e-3)


def test_task_optimizer_matches_torch_adam_and_skips_rows_that_sat_out():
    config = InversionConfig(steps=1, lr=0.1, betas=(0.5, 0.9))
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64, requires_grad=True)
    reference = x[0].detach().clone().requires_grad_(True)
    ours = _TaskOptimizer([x], config, tasks=2)
    adam = torch.optim.Adam([reference], lr=0.1, betas=(0.5, 0.9))
    for step in range(5):
        x.grad = 2 * x.detach() + step
        reference.grad = 2 * reference.detach() + step
        ours.step(torch.tensor([0]))
        adam.step()
    torch.testing.assert_close(x[0].detach(), reference.detach(), rtol=1e-12, atol=1e-12)
    assert x[1].tolist() == [3.0, 0.5]  # row 1 took part in no update
    assert ours.count.tolist() == [5, 0]


def test_normalized_steps_have_length_lr_along_the_gradient_of_each_task():
    config = InversionConfig(steps=1, optimizer="normalized", lr=0.5)
    a = torch.tensor([[3.0, 0.0], [1.0, 1.0], [7.0, 7.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.0], [2.0], [5.0]], dtype=torch.float64, requires_grad=True)
    a.grad = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 1.0]], dtype=torch.float64)
    b.grad = torch.tensor([[4.0], [4.0], [1.0]], dtype=torch.float64)
    _TaskOptimizer([a, b], config, tasks=3).step(torch.tensor([0, 1]))
    # task 0: gradient (3, 0 | 4) has norm 5 -> a step of 0.5 along it; task 2 sat out
    torch.testing.assert_close(a.detach(), torch.tensor([[2.7, 0.0], [1.0, 0.7], [7.0, 7.0]], dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.tensor([[-0.4], [1.6], [5.0]], dtype=torch.float64))


class _Exploding(Objective):
    def __init__(self, model, after: int):
        self.models, self.calls, self.after = (model,), 0, after

    def __call__(self, batch):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("injected failure")
        return TargetCrossEntropy(self.models[0])(batch)


def test_models_are_restored_after_a_run_and_after_an_injected_failure():
    model = copy.deepcopy(planted().backdoored).train()
    model.net.linear.weight.requires_grad_(False)  # a frozen parameter stays frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = _tasks("universal")
    config = InversionConfig(MaskPatternTrigger(), CostSchedule(), steps=3, batch_size=16, sampling="random")
    with pytest.raises(RuntimeError, match="injected failure"):
        invert(tasks, _Exploding(model, after=2), config)
    invert(tasks, TargetCrossEntropy(model), config)
    assert model.training and all(m.training for m in model.modules())
    assert not model.net.linear.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "net.linear.weight")
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_frozen_restores_on_error():
    model = copy.deepcopy(planted().clean).train()
    with pytest.raises(KeyError):
        with frozen(model):
            assert not model.training and not any(p.requires_grad for p in model.parameters())
            raise KeyError("boom")
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_pair_tasks_cover_every_ordered_pair_and_share_class_tensors():
    images, labels = _images()
    tasks = pair_tasks(images, labels, num_classes=4, generator=torch.Generator().manual_seed(0), removal=True)
    assert [(t.source, t.target) for t in tasks] == [(s, t) for s in range(4) for t in range(4) if s != t]
    assert all(bool((t.labels == t.source).all()) for t in tasks)
    assert tasks[0].images is tasks[1].images and tasks[0].removal is tasks[3].images
    capped = pair_tasks(images, labels, num_classes=4, generator=torch.Generator().manual_seed(0), max_images=5)
    assert all(t.images.shape[0] == 5 for t in capped)
    with pytest.raises(ValueError, match="class 3 has no images"):
        pair_tasks(images[labels != 3], labels[labels != 3], num_classes=4, generator=torch.Generator())
    with pytest.raises(ValueError, match="distinct classes"):
        pair_tasks(images, labels, num_classes=4, generator=torch.Generator(), pairs=[(1, 1)])


def test_a_found_mask_trigger_really_sends_the_images_to_the_target():
    model = planted().backdoored
    images, labels = _images()
    tasks = pair_tasks(images, labels, num_classes=4, generator=torch.Generator().manual_seed(1),
                       pairs=[(1, TARGET)])
    config = InversionConfig(MaskPatternTrigger(), CostSchedule(0.9, patience=5, multiplier=1.5,
                                                                start_at_zero=False), steps=30, batch_size=32)
    result = invert(tasks, TargetCrossEntropy(model), config)
    assert bool(result.found[0]) and result.success[0] >= 0.9
    x = tasks[0].images.float() / 255
    with torch.no_grad():
        stamped = config.trigger.stamp(x, result.triggers[0])
        assert (model(stamped).argmax(1) == TARGET).double().mean() > 0.8
    assert result.size[0] == pytest.approx(float(result.triggers[0]["mask"].sum()), rel=0.2)


def test_default_pass_size_follows_the_device():
    """Small cache-sized passes on a CPU, large ones on an accelerator; chunking never changes a result (the test
    above runs chunks of 40 against one task per pass)."""
    assert default_chunk_size(torch.device("cpu")) == CPU_CHUNK_SIZE < ACCELERATOR_CHUNK_SIZE
    assert default_chunk_size("cuda:0") == ACCELERATOR_CHUNK_SIZE
    assert InversionConfig().chunk_size is None


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"),
    ({"batch_size": 0}, "batch_size"),
    ({"sampling": "stratified"}, "sampling"),
    ({"batches_per_step": 2}, "batches_per_step"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"lr": 0.0}, "lr"),
    ({"betas": (0.5, 1.0)}, "betas"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 64.0}, "chunk_size"),
])
def test_bad_inversion_config_fails_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InversionConfig(**kwargs)


@pytest.mark.parametrize("make, error, match", [
    (lambda: InversionConfig(trigger="mask"), TypeError, "trigger"),
    (lambda: InversionConfig(schedule="nc"), TypeError, "schedule"),
    (lambda: CostSchedule(patience=0), ValueError, "patience"),
    (lambda: CostSchedule(multiplier=1.0), ValueError, "multiplier"),
    (lambda: CostSchedule(attack_threshold=1.5), ValueError, "attack_threshold"),
    (lambda: CostSchedule(restart_noise=-0.1), ValueError, "restart_noise"),
    (lambda: UntilSuccess(measure="sometimes"), ValueError, "measure"),
    (lambda: AdditiveTrigger(init_low=0.1, init_high=0.0), ValueError, "init_high"),
    (lambda: AdditiveTrigger(norm="linf"), ValueError, "norm"),
    (lambda: MaskPatternTrigger(init_clip=0.6), ValueError, "init_clip"),
    (lambda: InversionTask(torch.zeros(0, 3, 4, 4), 0), ValueError, "empty"),
    (lambda: InversionTask(torch.zeros(2, 3, 4, 4, dtype=torch.int32), 0), TypeError, "uint8 or float"),
    (lambda: InversionTask(torch.zeros(2, 3, 4, 4), -1), ValueError, "target"),
    (lambda: InversionTask(torch.zeros(2, 3, 4, 4), 0, labels=torch.zeros(3)), ValueError, "labels"),
])
def test_bad_engine_parts_fail_clearly(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_invert_refuses_inconsistent_runs():
    model = planted().clean
    a = InversionTask(torch.rand(4, 3, 16, 16), 0)
    with pytest.raises(ValueError, match="tasks is empty"):
        invert([], TargetCrossEntropy(model), InversionConfig())
    with pytest.raises(ValueError, match="one shape"):
        invert([a, InversionTask(torch.rand(4, 3, 8, 8), 1)], TargetCrossEntropy(model), InversionConfig())
    with pytest.raises(ValueError, match="need an AdditiveTrigger"):
        invert([InversionTask(a.images, 0, removal=a.images)], LogSurrogate(model),
               InversionConfig(MaskPatternTrigger(), sampling="random"))
    with pytest.raises(ValueError, match="sampling='random'"):
        invert([InversionTask(a.images, 0, removal=a.images)], LogSurrogate(model),
               InversionConfig(AdditiveTrigger()))
    with pytest.raises(TypeError, match="Objective"):
        invert([a], model, InversionConfig())
    with pytest.raises(ValueError, match="init lacks"):
        invert([InversionTask(a.images, 0, init={"mask": torch.rand(16, 16)})], TargetCrossEntropy(model),
               InversionConfig(steps=1))


def test_configs_pickle():
    for form, schedule, options, _ in CASES.values():
        config = InversionConfig(form, schedule, **options)
        assert pickle.loads(pickle.dumps(config)) == config


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_inversion_matches_cpu(case):
    """Every trigger form, schedule and optimiser runs with the model on the GPU (task tensors stay on the CPU)
    and walks the CPU's path."""
    form, schedule, options, kind = CASES[case]
    cpu_model = double_model()
    objective = LogSurrogate if kind == "removal" else TargetCrossEntropy
    config = InversionConfig(form, schedule, chunk_size=40, **options)
    cpu = invert(_tasks(kind), objective(cpu_model), config)
    gpu = invert(_tasks(kind), objective(copy.deepcopy(cpu_model).cuda()), config, device="cuda")
    assert torch.equal(gpu.found, cpu.found) and torch.equal(gpu.steps, cpu.steps)
    torch.testing.assert_close(gpu.size, cpu.size, rtol=1e-6, atol=1e-9)


def test_target_cross_entropy_adds_the_l1_of_each_images_change():
    """Pick your Poison's NC objective (Algorithm 6): CE + λ_N·‖clip(x + T) − x‖₁, per image."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    clean = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    triggered = (clean + 0.5).clamp(0, 1)
    batch = TriggeredBatch(triggered, clean, torch.tensor([0, 1, 2, 0]), torch.full((4,), -1), torch.zeros(4),
                           torch.zeros(4, dtype=torch.bool))
    plain, success = TargetCrossEntropy(model)(batch)
    penalised, same = TargetCrossEntropy(model, l1_weight=0.02)(batch)
    change = (triggered - clean).abs().sum((1, 2, 3))
    assert torch.allclose(penalised, plain + 0.02 * change) and torch.equal(success, same)
    with pytest.raises(ValueError, match="l1_weight must be a finite number >= 0, got -1"):
        TargetCrossEntropy(model, l1_weight=-1)
