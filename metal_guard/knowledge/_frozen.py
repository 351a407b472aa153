"""Deep-frozen data values and lazily loaded read-only mappings (knowledge-base internals)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any


def freeze(value: Any) -> Any:
    """Mappings become ``MappingProxyType`` and lists tuples, recursively."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A plain, mutable, JSON-serialisable deep copy of a frozen value."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return copy.copy(value)


class LazyMapping(Mapping[str, Any]):
    """A read-only mapping whose content (``_target()``) is loaded on first access."""

    def __init__(self, label: str) -> None:
        self._label = label

    def _target(self) -> Mapping[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self._target()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._target())

    def __len__(self) -> int:
        return len(self._target())

    def __repr__(self) -> str:
        return f"<{self._label}: {len(self)} entries (read-only)>"
