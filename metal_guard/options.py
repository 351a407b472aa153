"""The one vocabulary of guard options: ``install()``, ``@guarded_generate(...)``, ``guard_policy(...)``.

The three entry points take the same keys (:data:`OPTIONS`), checked the same way as the
environment variables behind them: a value of the wrong type is a ``TypeError`` naming the key,
a value out of range a :class:`~metal_guard.errors.SettingsError` (a ``ValueError``) naming the
key and the accepted form, an unknown key a ``TypeError`` naming it. Booleans say what is *on*
(``gate=False`` switches the panic gate off) and every duration ends in ``_sec``.

``install()`` applies them to every guarded call of the process; ``guard_policy(...)`` to the
guarded calls inside its block, ``@guarded_generate(...)`` to each call of the function (the
inner one wins). ``model_id`` names the model of a call and is not an ``install()`` option.

Keys that override a :class:`~metal_guard.settings.Settings` field carry its name in
:attr:`Option.field` (``invert`` when the field is the negation, e.g. ``gate`` ↔
``panic_gate_disabled``); :func:`settings_overrides` turns options into those fields.
``docs/integration.md`` carries the table made by :func:`markdown_table` (a test keeps them equal).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from metal_guard.errors import SettingsError

__all__ = [
    "DEPRECATED", "OPTIONS", "REMOVED", "Option", "markdown_table", "option_names",
    "settings_overrides", "validate_options",
]

MODEL_ID_MAX_CHARS = 500


@dataclass(frozen=True)
class Option:
    """One guard option. ``kind`` is ``bool``, ``int``, ``float`` or ``choice``/``text``."""

    name: str
    kind: str
    default: Any
    doc: str
    env: str | None = None
    field: str | None = None  # the Settings field it overrides (None: policy-only)
    invert: bool = False  # the Settings field is the negation of the option
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is accepted (and means the documented default)
    per_call: bool = False  # names one call: not an install() option

    def check(self, value: Any) -> Any:
        """The value, checked (type → ``TypeError``, range → ``SettingsError``)."""
        if value is None and self.optional:
            return None
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"{self.name} must be True or False, not {value!r}")
            return value
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{self.name} must be a whole number, not {value!r}")
            if self.minimum is not None and value < self.minimum:
                raise SettingsError(self.name, value, f"a whole number >= {self.minimum:g}")
            return value
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{self.name} must be a number of seconds, not {value!r}")
            if not math.isfinite(value) or (self.minimum is not None and value < self.minimum):
                raise SettingsError(self.name, value, f"a finite number >= {self.minimum or 0:g}")
            return float(value)
        if self.kind == "choice":
            if not isinstance(value, str):
                raise TypeError(f"{self.name} must be a string, not {value!r}")
            if value not in self.choices:
                raise SettingsError(self.name, value, "one of " + ", ".join(self.choices))
            return value
        # text: a model id — bounded, one line, no control characters
        if not isinstance(value, str):
            raise TypeError(f"{self.name} must be a string, not {value!r}")
        if not value.strip() or len(value) > MODEL_ID_MAX_CHARS \
                or any(not ch.isprintable() for ch in value):
            raise SettingsError(self.name, value,
                                f"1 to {MODEL_ID_MAX_CHARS} printable characters on one line")
        return value

    @property
    def accepted(self) -> str:
        if self.kind == "bool":
            return "bool"
        if self.kind == "choice":
            return " / ".join(f"`{c}`" for c in self.choices)
        if self.kind == "text":
            return "str"
        base = "int" if self.kind == "int" else "float"
        text = f"{base} >= {self.minimum:g}" if self.minimum is not None else base
        return text + (" or None" if self.optional else "")


_MODES = ("defensive", "observer")
_FIT_LEVELS = ("strict", "balanced", "relaxed", "off")

#: Every guard option, in the order of the documentation table.
OPTIONS: tuple[Option, ...] = (
    Option("mode", "choice", "defensive", "defensive refuses and cleans up; observer records "
           "what it would have refused and lets the call through", "METALGUARD_MODE", "mode",
           choices=_MODES),
    Option("gate", "bool", True, "L10 panic gate before a load (cooldown after a kernel panic)",
           "METALGUARD_PANIC_GATE_DISABLED=1 → False", "panic_gate_disabled", invert=True),
    Option("breaker", "bool", True, "L9 circuit breaker before a load", None),
    Option("registry", "bool", True, "known-panic registry check before a load", None),
    Option("allow_panic_models", "bool", False, "load registry models of tier `panic` anyway "
           "(with a warning)", "METALGUARD_ALLOW_PANIC_MODELS", "allow_panic_models"),
    Option("fit_check", "bool", True, "L4 fit check before a load", "METALGUARD_FIT_CHECK",
           "fit_check"),
    Option("fit_level", "choice", "balanced", "how cautious the fit check is (memory.md); "
           "an unknown size is refused only at `strict`", "METALGUARD_FIT_LEVEL", "fit_level",
           choices=_FIT_LEVELS),
    Option("cadence", "bool", True, "L9 cadence between loads", "METALGUARD_CADENCE", "cadence"),
    Option("cadence_min_interval_sec", "float", None, "seconds between two loads of one model "
           "(None: scaled to the risk; 0: off)", "METALGUARD_CADENCE_MIN_INTERVAL_SEC",
           "cadence_min_interval_sec", minimum=0.0, optional=True),
    Option("cross_model_interval_sec", "float", 0.0, "seconds between loads of different models",
           "METALGUARD_CROSS_MODEL_INTERVAL", "cross_model_interval_sec", minimum=0.0),
    Option("use_lock", "bool", False, "hold the L8 cross-process lock around a load",
           "METALGUARD_USE_LOCK", "use_lock"),
    Option("flush_every_n", "int", 50, "release MLX's cache every N guarded generate calls "
           "(0: off)", "METALGUARD_FLUSH_EVERY_N", "flush_every_n", minimum=0),
    Option("prefill_guard", "bool", True, "R4 prefill guard on prompts given as tokens", None),
    Option("oom_retries", "int", 0, "retry a plain (non-streaming) call this many times after "
           "a Metal OOM, cleaning up in between", None, minimum=0),
    Option("gemma4_firstgen_flush", "bool", True, "C7 flush and pause before a gemma-4 model's "
           "first generation", "METALGUARD_GEMMA4_FIRSTGEN_DISABLED=1 → False",
           "gemma4_firstgen_disabled", invert=True),
    Option("gemma4_firstgen_sleep_sec", "float", 3.0, "the pause of that flush",
           "METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC", "gemma4_firstgen_sleep_sec", minimum=0.0),
    Option("model_id", "text", None, "the model a call is about, when the call cannot tell "
           "(per call: not an `install()` option)", None, per_call=True),
)
_BY_NAME = {o.name: o for o in OPTIONS}

#: Old spellings still accepted for one release, with a ``DeprecationWarning``:
#: ``old -> (new, inverted)``.
DEPRECATED: dict[str, tuple[str, bool]] = {
    "panic_gate_disabled": ("gate", True),
    "gemma4_firstgen_disabled": ("gemma4_firstgen_flush", True),
}
#: Keys that were accepted once and now are not, with the reason (still a ``TypeError``).
REMOVED: dict[str, str] = {
    "label": "it was accepted but never used",
}


def option_names() -> frozenset[str]:
    return frozenset(_BY_NAME)


def validate_options(options: Mapping[str, Any], *, where: str, per_call: bool = True,
                     stacklevel: int = 3) -> dict[str, Any]:
    """Check ``options`` for ``where`` (the entry point's name, for messages) and return them
    in the current spelling. ``per_call=False`` (``install()``) refuses per-call keys."""
    out: dict[str, Any] = {}
    for key in options:
        if key in REMOVED:
            raise TypeError(f"{where}: option {key!r} was removed ({REMOVED[key]})")
        if key in DEPRECATED:
            continue
        opt = _BY_NAME.get(key)
        if opt is None:
            raise TypeError(f"{where}: unknown option {key!r} (known: {', '.join(_BY_NAME)})")
        if opt.per_call and not per_call:
            raise TypeError(f"{where}: {key!r} names the model of one call; pass it to "
                            "guard_policy(...) or @guarded_generate(...)")
        out[key] = opt.check(options[key])
    for old, (new, inverted) in DEPRECATED.items():
        if old not in options:
            continue
        value = options[old]
        if not isinstance(value, bool):
            raise TypeError(f"{old} must be True or False, not {value!r}")
        replacement = (not value) if inverted else value
        warnings.warn(f"{where}: {old}={options[old]!r} is deprecated; write {new}={replacement!r} "
                      "(the old spelling goes in the next release)", DeprecationWarning,
                      stacklevel=stacklevel)
        if new in out and out[new] != replacement:
            raise TypeError(f"{where}: {old}={options[old]!r} contradicts {new}={out[new]!r}")
        out[new] = replacement
    return out


def settings_overrides(options: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`~metal_guard.settings.Settings` fields that (validated) ``options`` set."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        opt = _BY_NAME.get(key)
        if opt is None or opt.field is None:
            continue
        out[opt.field] = (not value) if opt.invert else value
    return out


def markdown_table() -> str:
    """The options table of ``docs/integration.md``."""
    rows = ["| option | type | default | environment | what it does |", "|---|---|---|---|---|"]
    for o in OPTIONS:
        default = "—" if o.default is None else f"`{o.default!r}`"
        rows.append(f"| `{o.name}` | {o.accepted} | {default} | "
                    f"{'`' + o.env + '`' if o.env else '—'} | {o.doc} |")
    return "\n".join(rows)
