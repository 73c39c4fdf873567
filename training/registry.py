"""Named constructors: what configs and model cards refer to by name (losses, miners, methods,
heads). One helper for all of them, so every registry lists its choices and checks parameters
the same way (after pytorch-metric-learning's and timm's name-to-class registries)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class UnknownName(KeyError, ValueError):
    """A name no registry entry has; a ValueError for callers, a KeyError for `in` and `get`."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Mapping[str, Callable[..., T]], Generic[T]):
    """A read-only mapping name -> constructor, filled at definition or with `register`."""

    def __init__(self, kind: str, entries: Mapping[str, Callable[..., T]] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = dict(entries or {})

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: make `factory` constructible as `name`; a name is registered once."""

        def decorate(factory: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory

        return decorate

    def __getitem__(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise UnknownName(f"unknown {self.kind} {name!r}; choose one of: {self.choices()}")
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def choices(self) -> str:
        return ", ".join(sorted(self._entries))

    def build(
        self, name: str, params: Mapping[str, Any], context: Mapping[str, Any] | None = None
    ) -> T:
        """Instantiate `name` with `params`, failing with a message that lists the choices.

        `context` values (e.g. `num_classes`) go only to constructors that declare them, so every
        entry can be built with the same call; a constructor that takes `**params` receives the
        context and the parameters as they are and checks them itself."""
        factory = self[name]
        signature = inspect.signature(factory).parameters.values()
        if any(parameter.kind is parameter.VAR_KEYWORD for parameter in signature):
            return factory(**(context or {}), **params)
        accepted = [
            parameter.name
            for parameter in signature
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        ]
        context = {key: value for key, value in (context or {}).items() if key in accepted}
        settable = [parameter for parameter in accepted if parameter not in context]
        unknown = sorted(set(params) - set(settable))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)} for {self.kind} {name!r}; "
                f"accepted: {', '.join(settable) or '(none)'}"
            )
        return factory(**context, **params)
