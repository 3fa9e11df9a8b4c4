"""ReScaler invariants, for every registered architecture (a new one is tested by registering it)."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guard
from guard.models import create, list_models
from guard.rescaler import ReScaler, ReScalerConfig, ScalarSite, find_blocks, overlap_similarity, register_block

ALL = list_models()
TINY = list_models("tiny")
HEAVY = set(list_models("imagenet")) | {"preact_resnet50", "resnext29_32x4d", "preact_resnet34"}


def _double(name: str, seed: int = 0) -> nn.Module:
    """A float64 model with non-trivial BatchNorm statistics, so every branch matters."""
    g = torch.Generator().manual_seed(seed)
    model = create(name, generator=g).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.0, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
    return model


def _images(model: nn.Module, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *model.spec.input_size, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name,count", [("resnet18", 8), ("resnet34", 24), ("resnet50", 36),
                                        ("preact_resnet34", 24), ("preact_resnet50", 36),
                                        ("resnext29_32x4d", 192), ("resnet20", 12)])
def test_scalar_counts(name, count):
    assert ReScaler(create(name)).num_scalars == count


@pytest.mark.parametrize("name", ALL)
def test_zero_scalars_is_identity_and_batched_equals_one_by_one(name):
    model = _double(name)
    rescaler = ReScaler(model, eps=0.15, alpha=1.0)
    x = _images(model, 4 if name in HEAVY else 16)  # HEAVY: batch 16 in the slow suite below
    with torch.no_grad():
        plain = model(x)
    zero = rescaler.predict_with(x, torch.zeros(rescaler.num_scalars, dtype=torch.float64))
    assert (zero - plain).abs().max() <= 1e-5
    batched = rescaler.adapt(x)
    assert (batched.original_logits - plain).abs().max() <= 1e-5
    for i in range(x.shape[0]):
        single = rescaler.adapt(x[i:i + 1])
        assert (single.logits - batched.logits[i]).abs().max() <= 1e-5
        assert (single.scalars - batched.scalars[i]).abs().max() <= 1e-5
    assert batched.scalars.min() >= 0 and batched.scalars.max() <= 0.15
    assert batched.scalars.shape == (x.shape[0], rescaler.num_scalars)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_batched_equals_one_by_one_batch16_heavy(name):
    model = _double(name)
    rescaler = ReScaler(model)
    x = _images(model, 16)
    batched = rescaler.adapt(x)
    singles = [rescaler.adapt(x[i:i + 1]) for i in range(16)]
    assert (torch.cat([s.logits for s in singles]) - batched.logits).abs().max() <= 1e-5
    assert (torch.cat([s.scalars for s in singles]) - batched.scalars).abs().max() <= 1e-5


def _zero_unit(module: nn.Module, channels: slice) -> None:
    """Make a scalar site's output zero on ``channels`` by editing weights (what w = 1 must do)."""
    with torch.no_grad():
        if isinstance(module, nn.BatchNorm2d):
            module.weight[channels] = 0
            module.bias[channels] = 0
        elif isinstance(module, nn.Conv2d):
            module.weight[channels] = 0
        else:
            raise TypeError(type(module))


@pytest.mark.parametrize("name", TINY)
def test_each_scalar_at_one_removes_exactly_its_unit(name):
    """Placement check: w = 1 on one site (or group) equals zeroing that conv unit's output."""
    model = _double(name)
    rescaler = ReScaler(model, eps=1.0)
    x = _images(model, 3)
    offset = 0
    for block in rescaler.blocks:
        for site in block.sites:
            edited = copy.deepcopy(model)
            module_name = next(n for n, m in model.named_modules() if m is site.module)
            unit = edited.get_submodule(module_name)
            width = unit.weight.shape[0] // site.groups
            for g in range(site.groups):
                w = torch.zeros(rescaler.num_scalars, dtype=torch.float64)
                w[offset + g] = 1.0
                reference = copy.deepcopy(edited)
                _zero_unit(reference.get_submodule(module_name), slice(g * width, (g + 1) * width))
                with torch.no_grad():
                    expected = reference(x)
                assert (rescaler.predict_with(x, w) - expected).abs().max() <= 1e-9, (block.name, g)
            offset += site.groups
    assert offset == rescaler.num_scalars


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_preact_resnet", "tiny_tv_resnet"])
def test_all_scalars_at_one_turn_blocks_into_shortcuts(name):
    model = _double(name)
    rescaler = ReScaler(model, eps=1.0)
    edited = copy.deepcopy(model)
    for block in rescaler.blocks:
        last = block.sites[-1].module
        _zero_unit(edited.get_submodule(next(n for n, m in model.named_modules() if m is last)), slice(None))
    x = _images(model, 2)
    with torch.no_grad():
        expected = edited(x)
    assert torch.allclose(rescaler.predict_with(x, torch.ones(rescaler.num_scalars, dtype=torch.float64)),
                          expected, atol=1e-9)


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_preact_bottleneck", "tiny_resnext"])
def test_scalar_gradient_matches_finite_differences(name):
    """One ascent step from 0 with a small α and no clipping gives w = max(α g, 0) with g = ∂CE/∂w."""
    model = _double(name)
    alpha, h = 1e-3, 1e-6
    rescaler = ReScaler(model, eps=1.0, alpha=alpha)
    x = _images(model, 2)
    out = rescaler.adapt(x)
    y = out.original_labels
    for i in range(2):
        for k in range(rescaler.num_scalars):
            e = torch.zeros(rescaler.num_scalars, dtype=torch.float64)
            e[k] = h
            ce = nn.functional.cross_entropy
            g_fd = (ce(rescaler.predict_with(x[i:i + 1], e), y[i:i + 1])
                    - ce(rescaler.predict_with(x[i:i + 1], -e), y[i:i + 1])) / (2 * h)
            assert out.scalars[i, k].item() == pytest.approx(max(alpha * g_fd.item(), 0.0), rel=1e-4, abs=1e-12)
    assert (out.scalars > 0).any()


def test_scalars_respect_bounds_with_large_steps_and_many_steps():
    model = _double("tiny_preact_resnet")
    x = _images(model, 8)
    for steps in (1, 5):
        out = ReScaler(model, eps=0.07, alpha=1e4, steps=steps).adapt(x)
        assert out.scalars.min() >= 0 and out.scalars.max() <= 0.07
        assert (out.scalars == 0.07).any()


def test_targeted_variant_descends_towards_given_labels():
    model = _double("tiny_preact_resnet")
    x = _images(model, 6)
    rescaler = ReScaler(model, eps=0.3, alpha=1.0)
    with torch.no_grad():
        target = model(x).argsort(1)[:, -2]  # runner-up class
    out = rescaler.adapt(x, target=target, steps=100)
    ce = nn.functional.cross_entropy
    assert ce(out.logits, target) < ce(out.original_logits, target)
    assert out.scalars.max() <= 0.3
    fixed = rescaler.predict_with(x, out.scalars)
    assert torch.allclose(fixed, out.logits)


def test_create_graph_gives_the_same_adaptation_and_parameter_gradients_match_finite_differences():
    """``create_graph=True`` (attacks trained through the adaptation) changes no value, and the adapted logits'
    gradient with respect to a weight — through eq. 3's step, second order — matches central differences."""
    model = _double("tiny_resnet")
    rescaler = ReScaler(model, eps=1.0, alpha=0.05)  # no clipping at ε: w = max(α g, 0) is smooth where g > 0
    x = _images(model, 3)
    plain = rescaler.adapt(x)
    graph = rescaler.adapt(x, create_graph=True)
    for a, b in ((plain.logits, graph.logits), (plain.original_logits, graph.original_logits),
                 (plain.scalars, graph.scalars)):
        assert torch.allclose(a, b, atol=1e-12)
    assert graph.logits.requires_grad and graph.scalars.requires_grad and not plain.logits.requires_grad
    assert (graph.scalars > 0).any()
    for create_graph, want in ((False, plain.scalars), (True, graph.scalars)):  # the scalars alone, same values
        alone = rescaler.adapt_scalars(x, create_graph=create_graph)
        assert torch.allclose(alone, want, atol=1e-12) and alone.requires_grad == create_graph
    direction = torch.randn(graph.logits.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1].weight
    (grad,) = torch.autograd.grad((graph.logits * direction).sum(), weight)
    h = 1e-6
    for index in [(0, 0, 0, 0), (1, 0, 1, 1), (weight.shape[0] - 1, weight.shape[1] - 1, 2, 2)]:
        with torch.no_grad():
            weight[index] += h
            up = (rescaler.adapt(x).logits * direction).sum()
            weight[index] -= 2 * h
            down = (rescaler.adapt(x).logits * direction).sum()
            weight[index] += h
        assert grad[index].item() == pytest.approx(((up - down) / (2 * h)).item(), rel=1e-4, abs=1e-9)


def test_ascent_from_given_labels_is_the_clipped_gradient_of_their_cross_entropy():
    """``adapt_scalars(predicted=y)``: eq. 3's step from the labels y instead of the model's own prediction —
    w = clip(α ∂CE(F_w(x), y)/∂w at w = 0, 0, ε), checked against central differences; y = the model's own
    prediction gives the default scalars."""
    model = _double("tiny_resnet")
    rescaler = ReScaler(model, eps=1.0, alpha=0.05)
    x = _images(model, 3)
    with torch.no_grad():
        own = model(x).argmax(1)
    assert torch.equal(rescaler.adapt_scalars(x, predicted=own), rescaler.adapt_scalars(x))
    other = (own + 9) % model.spec.num_classes  # labels whose ascent moves some scalars off 0 on this model
    w = rescaler.adapt_scalars(x, predicted=other)
    assert (w > 0).any() and not torch.allclose(w, rescaler.adapt_scalars(x))
    h = 1e-6
    for j in range(rescaler.num_scalars):
        step = torch.zeros(rescaler.num_scalars, dtype=torch.float64)
        step[j] = h
        up = F.cross_entropy(rescaler.logits_with(x, step), other, reduction="none")
        down = F.cross_entropy(rescaler.logits_with(x, -step), other, reduction="none")
        want = (0.05 * (up - down) / (2 * h)).clamp(0.0, 1.0)
        assert torch.allclose(w[:, j], want, rtol=1e-4, atol=1e-9), j
    with pytest.raises(TypeError, match=r"predicted: expected an int64 tensor of shape \(3,\)"):
        rescaler.adapt_scalars(x, predicted=other.float())
    with pytest.raises(ValueError, match=r"predicted: expected shape \(3,\), got \(2,\)"):
        rescaler.adapt_scalars(x, predicted=other[:2])


def test_scaled_applies_given_scalars_to_every_forward_and_always_resets():
    """``scaled(w)``: the model's own forward passes inside the block see ``1 − w`` (its logits equal
    :meth:`logits_with`'s), outside it — also after an error in the block — the model is plain again."""
    model = _double("tiny_resnet_b")
    rescaler = ReScaler(model, eps=0.3)
    x = _images(model, 4)
    w = rescaler.adapt(x).scalars
    assert (w > 0).any()
    with torch.no_grad():
        plain = model(x)
        with rescaler.scaled(w):
            inside = model(x)
        with pytest.raises(RuntimeError, match="boom"), rescaler.scaled(w):
            raise RuntimeError("boom")
        after = model(x)
    assert torch.allclose(inside, rescaler.logits_with(x, w), atol=1e-12)
    assert not torch.allclose(inside, plain) and torch.equal(after, plain)
    for bad in (w[0], w[:, :-1], w.long()):
        with pytest.raises(ValueError,
                           match=rf"scalars: expected a float tensor of shape \(B, {rescaler.num_scalars}\)"):
            with rescaler.scaled(bad):
                pass
    rescaler.detach()
    with pytest.raises(RuntimeError, match="detached"):
        with rescaler.scaled(w):
            pass


def test_model_is_never_changed_and_gets_no_gradients():
    model = _double("tiny_resnet_b")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(model, 5)
    with torch.no_grad():
        plain = model(x)
    rescaler = ReScaler(model)
    rescaler.adapt(x)
    rescaler(x)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), plain)  # hooks are identity outside adapt()
    rescaler.detach()
    assert not any(m._forward_hooks for m in model.modules())


def test_no_state_leaks_between_calls():
    model = _double("tiny_resnext")
    rescaler = ReScaler(model)
    a, b = _images(model, 4, seed=1), _images(model, 4, seed=2)
    first = rescaler.adapt(a)
    rescaler.adapt(b)
    again = rescaler.adapt(a)
    assert torch.equal(first.logits, again.logits) and torch.equal(first.scalars, again.scalars)


def test_hooks_reset_after_an_injected_failure():
    model = _double("tiny_resnet")
    rescaler = ReScaler(model)
    x = _images(model, 2)
    with torch.no_grad():
        plain = model(x)

    def boom(*_):
        raise RuntimeError("injected")

    handle = model.net.linear.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="injected"):
        rescaler.adapt(x)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    assert torch.equal(rescaler.adapt(x).original_logits, plain)


def test_concurrent_threads_get_their_own_results():
    model = _double("tiny_preact_resnet")
    rescaler = ReScaler(model)
    inputs = [_images(model, 3, seed=s) for s in range(6)]
    expected = [rescaler.adapt(x) for x in inputs]
    results: dict[int, object] = {}

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = rescaler.adapt(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, exp in enumerate(expected):
        assert torch.equal(results[i].logits, exp.logits) and torch.equal(results[i].scalars, exp.scalars)


def test_works_under_inference_mode_and_no_grad():
    model = create("tiny_resnet")
    rescaler = ReScaler(model)
    with torch.inference_mode():
        x = torch.rand(2, 3, 16, 16)
        out = rescaler.adapt(x)
    with torch.no_grad():
        again = rescaler.adapt(x.clone())
    assert torch.allclose(out.logits, again.logits)


def test_bad_inputs_and_configs_fail_clearly():
    rescaler = ReScaler(create("tiny_resnet"))
    cases = [
        (TypeError, "torch.Tensor", [[0.5]]),
        (TypeError, r"floating-point.*uint8.*x.float\(\) / 255", torch.zeros(1, 3, 16, 16, dtype=torch.uint8)),
        (ValueError, r"4-D batch \(B, 3, 16, 16\), got shape \(3, 16, 16\).*unsqueeze", torch.rand(3, 16, 16)),
        (ValueError, r"expected shape \(B, 3, 16, 16\), got \(2, 1, 16, 16\)", torch.rand(2, 1, 16, 16)),
        (ValueError, r"expected shape \(B, 3, 16, 16\), got \(2, 3, 32, 32\)", torch.rand(2, 3, 32, 32)),
        (ValueError, "empty batch", torch.rand(0, 3, 16, 16)),
        (ValueError, "got 1 NaN/Inf", _with_nan(torch.rand(2, 3, 16, 16))),
        (ValueError, r"pixel values in \[0, 1\]", torch.rand(2, 3, 16, 16) * 255),
    ]
    for exc, pattern, x in cases:
        with pytest.raises(exc, match=pattern):
            rescaler.adapt(x)
    with pytest.raises(ValueError, match=r"eps must be a number in \(0, 1\], got 1.5"):
        ReScaler(create("tiny_resnet"), eps=1.5)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got -1"):
        ReScaler(create("tiny_resnet"), alpha=-1)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        ReScalerConfig(steps=0)
    with pytest.raises(ValueError, match="found no adaptable residual blocks in Sequential"):
        ReScaler(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10)))
    with pytest.raises(TypeError, match="wraps an nn.Module"):
        ReScaler("resnet20")
    with pytest.raises(ValueError, match=r"scalars: expected shape \(4,\) or \(2, 4\), got \(3,\)"):
        rescaler.predict_with(torch.rand(2, 3, 16, 16), torch.zeros(3))
    with pytest.raises(RuntimeError, match="eval mode only"):
        rescaler.train()


def _with_nan(x: torch.Tensor) -> torch.Tensor:
    x[1, 2, 3, 4] = float("nan")
    return x


def test_config_pickles():
    cfg = ReScalerConfig(eps=0.05, alpha=0.5, steps=3)
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_register_a_new_block_type():
    class MyBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.body(x)

    register_block(MyBlock)(lambda block, resnext_pointwise=False: [ScalarSite(block.body)])
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(MyBlock(), MyBlock(), MyBlock()),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    blocks = find_blocks(net)
    assert [b.name for b in blocks] == ["1.1", "1.2"]  # the stage's first block gets no scalar
    rescaler = ReScaler(net, eps=0.1)
    out = rescaler.adapt(torch.randn(5, 3, 8, 8))  # plain nn.Module: no [0, 1] range check
    assert out.scalars.shape == (5, 2)


def test_overlap_similarity():
    a = torch.tensor([0.1, 0.0, 0.2])
    assert overlap_similarity(a, a).item() == pytest.approx(1.0)
    assert overlap_similarity(a, torch.tensor([0.0, 0.3, 0.0])).item() == 0.0
    b = torch.tensor([0.05, 0.0, 0.2])
    expected = torch.linalg.vector_norm(torch.minimum(a, b)) / torch.linalg.vector_norm(torch.maximum(a, b))
    assert overlap_similarity(a, b).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="both vectors are zero"):
        overlap_similarity(torch.zeros(3), torch.zeros(3))


def test_defended_accuracy_of_pretrained_resnet20(resnet20_weights, data_root):
    import numpy as np

    data = np.load(data_root / "cifar10" / "cifar10_test_lossless_first1000.npz")
    x = torch.from_numpy(data["x_test"][:200]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data["y_test"][:200])
    out = guard.ReScaler(create("resnet20", weights=resnet20_weights), eps=0.05).adapt(x)
    clean = (out.original_labels == y).float().mean()
    defended = (out.labels == y).float().mean()
    assert clean >= 0.88 and defended >= clean - 0.03


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu_and_autocast_keeps_bounds(amp):
    model = create("tiny_preact_resnet")
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cpu = ReScaler(model).adapt(x)
    gpu_model = copy.deepcopy(model).cuda()
    out = ReScaler(gpu_model, amp_dtype=amp).adapt(x.cuda())
    assert out.scalars.dtype == torch.float32 and out.logits.dtype == torch.float32
    assert out.scalars.min() >= 0 and out.scalars.max() <= 0.15
    tol = 1e-4 if amp is None else 5e-2
    assert torch.allclose(out.original_logits.cpu(), cpu.original_logits, atol=tol, rtol=tol)
    if amp is None:
        assert torch.allclose(out.scalars.cpu(), cpu.scalars, atol=1e-4)
        assert torch.allclose(out.logits.cpu(), cpu.logits, atol=1e-4)
