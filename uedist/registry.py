"""A small name -> builder registry (models, datasets/sources, noise types, purifiers).

    MODELS = Registry("model")

    @MODELS.register("resnet18")
    def resnet18(num_classes: int = 10, **kw): ...

    MODELS.build("resnet18", num_classes=100)

Unknown names fail with the list of known ones (and the closest match); registering a name twice is an error,
so two modules can never silently shadow each other.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Iterator, List, Optional, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class RegistryError(KeyError):
    """An unknown or duplicate registry name. Subclasses KeyError; str() is the plain message."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, Callable[..., Any]] = {}

    def register(self, name: Optional[str] = None) -> Callable[[T], T]:
        """Decorator: register ``fn`` under ``name`` (default: the function's ``__name__``)."""

        def deco(fn: T) -> T:
            key = name or fn.__name__
            if key in self._items:
                raise RegistryError(f"{self.kind} {key!r} is already registered (by {self._items[key].__module__})")
            self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}{hint} known {self.kind}s: {', '.join(sorted(self._items)) or '(none)'}"
            ) from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


MODELS = Registry("model")
SOURCES = Registry("dataset source")
NOISES = Registry("noise type")
PURIFIERS = Registry("purifier")
