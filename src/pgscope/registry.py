"""A named registry: the one place where the algorithms (:mod:`pgscope.algos`) and the
probes (:mod:`pgscope.probes`) are looked up by name.

Modelled on gymnasium's env registry: a component registers itself under a name when its
module is imported; everything else finds it by that name and never branches on it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that is not registered (the message suggests close names)."""


class Registry(Generic[T]):
    """Entries of one kind (``"algorithm"``, ``"probe"``), in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, before: str | None = None) -> T:
        """Add ``entry`` under ``name``, last or just before the entry ``before``; a name
        can be registered once."""
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered.")
        if before is None:
            self._entries[name] = entry
            return entry
        self.get(before)  # an unknown name is an error, with close names
        entries = list(self._entries.items())
        at = [n for n, _ in entries].index(before)
        self._entries = dict([*entries[:at], (name, entry), *entries[at:]])
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (a plug-in's or a test's own)."""
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry named ``name``; :class:`UnknownNameError` names close matches."""
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'.{hint} Known: {', '.join(self._entries)}."
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def values(self) -> tuple[T, ...]:
        return tuple(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
