"""The base of metal-guard's result dataclasses: attributes, ``as_dict()``, and a read-only
``Mapping`` view.

Results (the install report, breaker status, cleanup results, the lock's records) are frozen dataclasses: read
``status.in_cooldown``, and call ``as_dict()`` for JSON. They were plain dicts in 0.11 (the
breaker's ``status()``) and in this package's first release, so ``status["in_cooldown"]``,
``.get()``, ``in`` and ``dict(status)`` keep working as a read-only view over the same fields
for one release (see docs/migrating.md). A field whose ``metadata`` has ``omit_none=True`` is
left out of the view and of ``as_dict()`` while it is ``None`` (a key some calls never had).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["ResultRecord", "jsonable"]


def jsonable(value: Any) -> Any:
    """``value`` with every result record turned into its ``as_dict()`` (for ``json.dumps``)."""
    if isinstance(value, ResultRecord):
        return value.as_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class ResultRecord(Mapping[str, Any]):
    """Mix into a ``@dataclass(frozen=True, eq=False)``; equality is the mapping's (a record
    equals a dict with the same keys and values)."""

    __slots__ = ()

    def _keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if not (f.metadata.get("omit_none") and getattr(self, f.name) is None)]

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-ready data (nested records and enums converted)."""
        return {key: jsonable(getattr(self, key)) for key in self._keys()}

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())
