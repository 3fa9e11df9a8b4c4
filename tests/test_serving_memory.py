"""A server batch that runs out of memory is answered in halves (guard.serving.memory); the real worker under a
memory cap is tested in test_serving_faults.py."""

from __future__ import annotations

import logging

import pytest
import torch

from guard.rescaler import Adaptation
from guard.serving.memory import concat, out_of_memory, run_in_halves

CPU_REFUSAL = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 67108864 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("exc, expected", [
    (CPU_REFUSAL, True), (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True), (RuntimeError("could not create a primitive"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False), (ValueError("out of memory"), False),
])
def test_out_of_memory_recognises_allocation_refusals_only(exc, expected):
    assert out_of_memory(exc) is expected


def _fits(most: int, calls: list):
    """A pass that refuses more than ``most`` items, as an allocator would, and returns the items' squares."""
    items = torch.arange(20.0)

    def run(a: int, b: int) -> torch.Tensor:
        calls.append((a, b))
        if b - a > most:
            raise CPU_REFUSAL
        return items[a:b] ** 2

    return run


@pytest.mark.parametrize("n, most", [(16, 16), (16, 5), (13, 3), (7, 1), (1, 1)])
def test_run_in_halves_answers_every_item_once_and_in_order(n, most, caplog):
    calls: list = []
    with caplog.at_level(logging.ERROR, logger="guard.serving.memory"):
        parts = run_in_halves(_fits(most, calls), n, what="test batch")
    assert [(a, b) for a, b, _ in parts] == sorted((a, b) for a, b, _ in parts)
    assert parts[0][0] == 0 and parts[-1][1] == n and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
    assert torch.equal(concat([out for _, _, out in parts]), torch.arange(float(n)) ** 2)
    assert all(b - a <= most for a, b, _ in parts)
    assert (n > most) == ("retrying in halves" in caplog.text)
    if n > most:
        assert f"out of memory on {n} requests of the test batch" in caplog.text


def test_a_single_item_that_does_not_fit_gets_the_error_and_its_neighbours_their_answers(caplog):
    items = torch.arange(4.0)

    def run(a: int, b: int) -> torch.Tensor:
        if a <= 2 < b or b - a > 1:  # item 2 never fits; more than one item never fits
            raise CPU_REFUSAL
        return items[a:b]

    with caplog.at_level(logging.ERROR, logger="guard.serving.memory"):
        parts = run_in_halves(run, 4)
    assert [(a, b) for a, b, _ in parts] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert isinstance(parts[2][2], MemoryError) and "can't allocate memory" in str(parts[2][2])
    assert [out.item() for i, (_, _, out) in enumerate(parts) if i != 2] == [0.0, 1.0, 3.0]
    assert "out of memory on a single request" in caplog.text


def test_other_errors_propagate_untouched():
    def run(a: int, b: int):
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug, not memory"):
        run_in_halves(run, 8)


def test_concat_joins_dataclasses_dicts_and_keeps_equal_scalars():
    parts = [Adaptation(logits=torch.full((n, 3), float(n)), original_logits=torch.zeros(n, 3),
                        scalars=torch.ones(n, 2)) for n in (2, 3)]
    joined = concat(parts)
    assert isinstance(joined, Adaptation) and joined.logits.shape == (5, 3)
    assert torch.equal(joined.logits[:2], torch.full((2, 3), 2.0))
    assert concat([{"a": torch.ones(1), "t": 0.5}, {"a": torch.zeros(2), "t": 0.5}])["a"].tolist() == [1, 0, 0]
    assert concat([None, None]) is None
    with pytest.raises(ValueError, match="differ in a non-tensor value"):
        concat([{"t": 0.5}, {"t": 0.7}])
