"""Model families that get family-wide treatment, from ``data/model_families.json``.

One rule per family, used everywhere (the in-process cadence floor and the isolation
worker's first-generation flush ask the same function). A model is named by a hub id or a
local path; only its last path component is matched, in full and case-insensitively, so a
directory called ``gemma-4-31b-it-8bit`` anywhere on disk counts and ``gemma-4b-it`` (Gemma 3,
4B) does not. The data file carries examples that must and must not match; the test suite
checks them, and that every gemma-4 entry of the known-panic registry matches.

Importing this module does no I/O; the data file is read on first use.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["FamilyDataError", "family_patterns", "is_gemma4_family", "is_model_family"]

DATA_FILE = "model_families.json"
#: Longest name considered; anything longer is not a model name we recognise.
MAX_NAME_CHARS = 1024


class FamilyDataError(ValueError):
    """The packaged family file is unreadable or invalid (a packaging bug)."""


_lock = threading.Lock()
_patterns: Mapping[str, re.Pattern[str]] | None = None


def _read() -> Mapping[str, re.Pattern[str]]:
    from importlib import resources

    try:
        text = resources.files("metal_guard").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
        doc = json.loads(text)
        out = {str(name): re.compile(str(spec["pattern"]), re.IGNORECASE)
               for name, spec in doc["families"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, re.error) as exc:
        raise FamilyDataError(f"{DATA_FILE} cannot be read: {exc}") from exc
    return MappingProxyType(out)


def family_patterns() -> Mapping[str, re.Pattern[str]]:
    """Family name -> compiled pattern (read once)."""
    global _patterns
    pats = _patterns
    if pats is None:
        with _lock:
            if _patterns is None:
                _patterns = _read()
            pats = _patterns
    return pats


def _base_name(model_id: object) -> str | None:
    if isinstance(model_id, os.PathLike):
        model_id = os.fspath(model_id)
    if not isinstance(model_id, str) or len(model_id) > MAX_NAME_CHARS:
        return None
    base = model_id.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return base or None


def is_model_family(model_id: object, family: str) -> bool:
    """True when ``model_id``'s last path component is a model of ``family``.

    Raises :class:`KeyError` for a family the data file does not list.
    """
    pattern = family_patterns()[family]
    base = _base_name(model_id)
    return base is not None and pattern.fullmatch(base) is not None


def is_gemma4_family(model_id: object) -> bool:
    """True for a gemma-4 family model, named by hub id or local path, any publisher.

    ``mlx-community/gemma-4-31b-it-8bit``, ``google/gemma4-e4b``, ``/models/Gemma_4_12B`` and
    a bare ``gemma-4`` are; ``gemma-4b-it`` (Gemma 3, 4B), ``gemma-3-27b-it`` and
    ``gemma-42x`` are not. The hazard comes from the architecture, not the uploader, so the
    publisher is not part of the rule.
    """
    return is_model_family(model_id, "gemma-4")
