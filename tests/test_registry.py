"""The registry every kind of algorithm shares (guard.registry): what it refuses, and that every kind uses it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import pytest

from guard.attacks.base import ATTACKS
from guard.cleanse.base import CLEANSERS
from guard.detect.base import DETECTORS
from guard.registry import Configured, Registry
from guard.repair.base import DEFENSES


@dataclass(frozen=True)
class Config:
    steps: int = 1


class Base(Configured, ABC):
    config_class = Config
    kind = "a"

    @abstractmethod
    def run(self) -> int: ...


class Good(Base):
    name = "good"

    def run(self) -> int:
        return self.config.steps


def fresh() -> Registry[Base]:
    registry = Registry("widget", Base, kinds=("a", "b"))
    registry.register(Good)
    return registry


def test_register_create_and_list():
    registry = fresh()
    assert registry.names() == ["good"] == list(registry) and "good" in registry
    assert registry.names("a") == ["good"] and registry.names("b") == []
    widget = registry.create("good", steps=3)
    assert widget.run() == 3 and repr(widget) == "Good(Config(steps=3))"
    assert Good(Config(steps=2)).config.steps == 2
    assert registry.items() == [("good", Good)]
    assert registry.parse("good", ["steps=4"]) == Config(steps=4) and registry.parse("good", []) == Config()


def test_parse_refuses_unknown_options_and_names():
    registry = fresh()
    with pytest.raises(ValueError, match="widget 'good' has no option 'step'; expected one of steps"):
        registry.parse("good", ["step=4"])
    with pytest.raises(ValueError, match="unknown widget 'nope'"):
        registry.parse("nope", ["steps=4"])


def test_refusals_name_what_was_expected_and_received():
    registry = fresh()
    with pytest.raises(ValueError, match="widget 'good' is already registered \\(by Good\\)"):
        registry.register(type("Again", (Good,), {}))
    with pytest.raises(TypeError, match="widget 'half' \\(Half\\) does not implement run"):
        registry.register(type("Half", (Base,), {"name": "half"}))
    with pytest.raises(TypeError, match="must be a Base subclass"):
        registry.register(int)
    with pytest.raises(ValueError, match="Nameless has no name"):
        registry.register(type("Nameless", (Good,), {"name": ""}))
    with pytest.raises(ValueError, match="Odd.kind must be one of \\('a', 'b'\\), got 'c'"):
        registry.register(type("Odd", (Good,), {"name": "odd", "kind": "c"}))
    with pytest.raises(ValueError, match="unknown widget 'nope'; expected one of good"):
        registry.get("nope")
    with pytest.raises(ValueError, match="kind must be None or one of"):
        registry.names("c")
    with pytest.raises(TypeError, match="pass either a config or keyword options, not both"):
        Good(Config(), steps=2)
    with pytest.raises(TypeError, match="Good needs a Config, got dict"):
        Good({"steps": 2})
    assert registry.names() == ["good"]  # nothing half-registered


@pytest.mark.parametrize("registry, names", [
    (ATTACKS, {"badnets", "blend", "pcb", "fc"}), (DETECTORS, {"cnc", "nc"}),
    (DEFENSES, {"pivotal", "nc", "moth"}), (CLEANSERS, {"re", "ss", "ac", "ci"}),
])
def test_every_kind_of_algorithm_uses_one_registry(registry, names):
    assert isinstance(registry, Registry) and names <= set(registry.names())
    for name, cls in registry.items():
        assert issubclass(cls, Configured) and cls.name == name and cls.description
