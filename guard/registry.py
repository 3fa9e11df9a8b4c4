"""The registry every kind of algorithm shares (attacks, detectors, defenses, cleansers), and their common base.

An algorithm is a class with a ``name``, a frozen validated config of type ``config_class`` and one verb; it is
built from a config or from the config's fields as keyword options (``create_attack("badnets", target=3)``), in
the style of timm's ``create_model``. Each kind keeps one :class:`Registry`; its public ``register_*``,
``list_*``, ``get_*`` and ``create_*`` functions are that registry's methods.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from ._validation import parse_config_options


class Configured:
    """Base of every registered algorithm: ``Cls(config)`` or ``Cls(**config_fields)``, never both."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    description: ClassVar[str] = ""

    def __init__(self, config: Any = None, **options: Any) -> None:
        if config is None:
            config = self.config_class(**options)
        elif options:
            raise TypeError(f"{type(self).__name__}: pass either a config or keyword options, not both")
        if type(config) is not self.config_class:
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


T = TypeVar("T", bound=Configured)


class Registry(Generic[T]):
    """Name -> class of one kind of algorithm. ``what`` names the kind in errors ("attack", "detector");
    ``kinds``, when given, are the values a registered class's ``kind`` may take and ``names`` filters on."""

    def __init__(self, what: str, base: type[T], kinds: tuple[str, ...] = ()) -> None:
        self.what, self.base, self.kinds = what, base, kinds
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator adding ``cls`` under ``cls.name``; a duplicate name raises ``ValueError``."""
        if not isinstance(cls, type) or not issubclass(cls, self.base):
            raise TypeError(f"a {self.what} must be a {self.base.__name__} subclass, got {cls!r}")
        if not cls.name:
            raise ValueError(f"{cls.__name__} has no name")
        if inspect.isabstract(cls):
            raise TypeError(f"{self.what} {cls.name!r} ({cls.__name__}) does not implement "
                            f"{', '.join(sorted(cls.__abstractmethods__))}")
        if self.kinds and getattr(cls, "kind", None) not in self.kinds:
            raise ValueError(f"{cls.__name__}.kind must be one of {self.kinds}, got {getattr(cls, 'kind', None)!r}")
        if cls.name in self._classes:
            raise ValueError(f"{self.what} {cls.name!r} is already registered (by {self._classes[cls.name].__name__})")
        self._classes[cls.name] = cls
        return cls

    def names(self, kind: str | None = None) -> list[str]:
        """Registered names (optionally only those of one ``kind``), sorted."""
        if kind is not None and kind not in self.kinds:
            raise ValueError(f"kind must be None or one of {self.kinds}, got {kind!r}")
        return sorted(n for n, c in self._classes.items() if kind is None or c.kind == kind)

    def get(self, name: str) -> type[T]:
        if name not in self._classes:
            raise ValueError(f"unknown {self.what} {name!r}; expected one of {', '.join(self.names())}")
        return self._classes[name]

    def create(self, name: str, **options: Any) -> T:
        """The class registered as ``name``, configured with ``options``."""
        return self.get(name)(**options)

    def parse(self, name: str, items: Sequence[str]) -> Any:
        """The validated config of ``name`` from ``key=value`` strings, the form of the CLI's ``--opt``
        (values are Python literals; ``outer.inner=value`` sets a field of a nested config)."""
        return parse_config_options(self.get(name).config_class, items, what=f"{self.what} {name!r}")

    def items(self) -> list[tuple[str, type[T]]]:
        """(name, class) pairs, sorted by name."""
        return [(name, self._classes[name]) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
