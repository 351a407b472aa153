"""One vocabulary of guard options for install(), @guarded_generate(...) and guard_policy(...)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from metal_guard import installer, options, policy
from metal_guard.adapters.base import guard_wrapper, make_guard
from metal_guard.errors import PanicCooldownActive, SettingsError
from metal_guard.guards import guard_policy, guarded_generate
from metal_guard.policy import CallInfo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    policy.configure(None)
    yield
    installer.uninstall()
    policy.configure(None)


def _via_install(**kw: Any) -> None:
    try:
        installer.install(adapters=[], **kw)
    finally:
        installer.uninstall()


def _via_decorator(**kw: Any) -> None:
    guarded_generate(**kw)


def _via_scope(**kw: Any) -> None:
    with guard_policy(**kw):
        pass


ENTRY_POINTS: list[Callable[..., None]] = [_via_install, _via_decorator, _via_scope]


@pytest.mark.parametrize("enter", ENTRY_POINTS, ids=["install", "guarded_generate", "guard_policy"])
def test_every_option_is_accepted_by_every_entry_point(enter: Callable[..., None]) -> None:
    for opt in options.OPTIONS:
        if opt.per_call and enter is _via_install:
            continue
        value = {"bool": True, "int": 3, "float": 1.5, "choice": opt.choices[:1] and opt.choices[0],
                 "text": "some/model"}[opt.kind]
        enter(**{opt.name: value})


@pytest.mark.parametrize("enter", ENTRY_POINTS, ids=["install", "guarded_generate", "guard_policy"])
def test_the_same_checks_everywhere(enter: Callable[..., None]) -> None:
    with pytest.raises(TypeError, match="'colour'"):
        enter(colour="red")
    with pytest.raises(TypeError, match="cadence must be True or False"):
        enter(cadence="no")  # a string is not a boolean, even "0"
    with pytest.raises(TypeError, match="flush_every_n"):
        enter(flush_every_n=True)
    with pytest.raises(SettingsError, match="flush_every_n"):
        enter(flush_every_n=-1)
    with pytest.raises(SettingsError, match="cadence_min_interval_sec"):
        enter(cadence_min_interval_sec=float("nan"))
    with pytest.raises(SettingsError, match="cross_model_interval_sec"):
        enter(cross_model_interval_sec=-5)
    with pytest.raises(ValueError, match="mode"):
        enter(mode="reckless")
    with pytest.raises(SettingsError, match="fit_level"):
        enter(fit_level="loose")
    with pytest.raises(TypeError, match=r"label.*removed"):
        enter(label="nightly")


def test_per_call_and_install_only_keys() -> None:
    with pytest.raises(TypeError, match=r"model_id.*one call"):
        installer.install(model_id="x")
    with pytest.raises(TypeError, match="adapters"):
        guarded_generate(adapters=["mlx_lm"])
    with pytest.raises(TypeError, match="strict must be True or False"):
        installer.install(strict="yes")
    with pytest.raises(SettingsError, match="model_id"):
        guarded_generate(model_id="a\nb")
    with pytest.raises(SettingsError, match="model_id"):
        guarded_generate(model_id="x" * 501)


def test_old_spellings_warn_and_mean_the_new_ones() -> None:
    with pytest.warns(DeprecationWarning, match=r"panic_gate_disabled=True is deprecated; write gate=False"):
        checked = options.validate_options({"panic_gate_disabled": True}, where="t")
    assert checked == {"gate": False}
    with pytest.warns(DeprecationWarning, match="gemma4_firstgen_flush=True"):
        checked = options.validate_options({"gemma4_firstgen_disabled": False}, where="t")
    assert checked == {"gemma4_firstgen_flush": True}
    with pytest.raises(TypeError, match="contradicts"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        options.validate_options({"panic_gate_disabled": True, "gate": True}, where="t")
    with pytest.warns(DeprecationWarning) as record:
        guarded_generate(panic_gate_disabled=False)
    assert record[0].filename == __file__  # the warning points at the caller's line


def _loader() -> Any:
    calls: list[str] = []

    def load(path: str) -> tuple[Any, str]:
        calls.append(path)
        return SimpleNamespace(), "tok"

    fn = make_guard(load, guard_wrapper("load", "call", site="t:load",
                                        describe=lambda i, a, k: CallInfo("t:load", model_id=a[0])),
                    site="t:load", generation=None)
    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def test_gate_false_means_the_same_from_every_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """gate=False (install, scope, the old spelling) and METALGUARD_PANIC_GATE_DISABLED=1 all let a
    load through a panic cooldown; nothing else does."""
    from metal_guard.forensics.gate import mark_panic_sentinel_cooldown

    mark_panic_sentinel_cooldown(1.0, reason="test")
    load = _loader()
    base = {"cadence": False, "fit_check": False}
    with pytest.raises(PanicCooldownActive), guard_policy(**base):
        load("m/a")
    with guard_policy(gate=False, **base):
        load("m/b")
    with pytest.warns(DeprecationWarning), guard_policy(panic_gate_disabled=True, **base):
        load("m/c")
    installer.install(adapters=[], gate=False, **base)
    load("m/d")  # install()'s options apply to every guarded call, decorators included
    with pytest.raises(PanicCooldownActive), guard_policy(gate=True):
        load("m/e")  # the inner scope wins
    installer.uninstall()
    monkeypatch.setenv("METALGUARD_PANIC_GATE_DISABLED", "1")
    with guard_policy(**base):
        load("m/f")
    assert load.calls == ["m/b", "m/c", "m/d", "m/f"]


def test_install_options_reach_policy_only_keys() -> None:
    """Keys that are not Settings fields (prefill_guard, oom_retries, breaker ...) work from
    install() too, and show in current_policy()."""
    installer.install(adapters=[], prefill_guard=False, oom_retries=2)
    assert dict(policy.current_policy()) == {"prefill_guard": False, "oom_retries": 2}
    with guard_policy(oom_retries=0):
        assert policy.current_policy()["oom_retries"] == 0
    installer.uninstall()
    assert dict(policy.current_policy()) == {}


def test_docs_table_is_generated_from_the_vocabulary() -> None:
    text = (ROOT / "docs" / "integration.md").read_text(encoding="utf-8")
    assert options.markdown_table() in text
    # the documentation names no removed or deprecated key as current
    table = text[text.index(options.markdown_table()):][:len(options.markdown_table())]
    assert not re.search(r"`(label|panic_gate_disabled|gemma4_firstgen_disabled)`", table)


def test_policy_keys_are_the_vocabulary() -> None:
    assert options.option_names() == policy.POLICY_KEYS
    assert all(o.name.endswith("_sec") for o in options.OPTIONS if o.kind == "float")
