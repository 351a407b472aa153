"""get_settings() remembers its last answer, but only for exactly the environment it read."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from metal_guard import settings as settings_mod
from metal_guard.errors import SettingsError
from metal_guard.settings import get_settings


def test_unchanged_environment_gives_the_same_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "4")
    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "4")  # same text again: still the same answer
    assert get_settings() is first


def test_every_kind_of_environment_change_is_seen_by_the_next_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METALGUARD_MODE", "defensive")  # restored after the test
    monkeypatch.delenv("MLX_FORCE_WAIT_SEC", raising=False)
    assert get_settings().force_wait_sec == 30.0
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "5")
    assert get_settings().force_wait_sec == 5.0
    os.environ["MLX_FORCE_WAIT_SEC"] = "6"  # a plain assignment, as user code does it
    assert get_settings().force_wait_sec == 6.0
    os.environ.update({"MLX_FORCE_WAIT_SEC": "6.5", "METALGUARD_MODE": "observer"})
    s = get_settings()
    assert (s.force_wait_sec, s.mode) == (6.5, "observer")
    del os.environ["MLX_FORCE_WAIT_SEC"]
    assert get_settings().force_wait_sec == 30.0
    assert "force_wait_sec" not in get_settings().from_env
    del os.environ["METALGUARD_MODE"]
    assert get_settings().mode == "defensive" and "mode" not in get_settings().from_env


def test_an_invalid_value_raises_on_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_BREAKER_THRESHOLD", "3")
    assert get_settings().breaker_panic_threshold == 3
    monkeypatch.setenv("METALGUARD_BREAKER_THRESHOLD", "three")
    messages = []
    for _ in range(3):
        with pytest.raises(SettingsError) as info:
            get_settings()
        assert info.value.variable == "METALGUARD_BREAKER_THRESHOLD"
        messages.append(str(info.value))
    assert len(set(messages)) == 1
    monkeypatch.setenv("METALGUARD_BREAKER_THRESHOLD", "4")
    assert get_settings().breaker_panic_threshold == 4
    monkeypatch.setenv("METALGUARD_BREAKER_THRESHOLD", "three")  # back to bad after a good one
    with pytest.raises(SettingsError):
        get_settings()


def test_explicit_env_and_overrides_are_not_served_from_the_remembered_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "5")
    remembered = get_settings()
    assert get_settings(env={}).force_wait_sec == 30.0
    assert get_settings(force_wait_sec=9.0).force_wait_sec == 9.0
    assert get_settings() is remembered
    # an invalid value for a field the code overrides is not read at all (code beats env)
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "soon")
    assert get_settings(force_wait_sec=1.0).force_wait_sec == 1.0


def test_a_change_of_home_re_expands_tilde_paths(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("METALGUARD_HOME", "~/mg")
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    assert get_settings().home == tmp_path / "a" / "mg"
    monkeypatch.setenv("HOME", str(tmp_path / "b"))
    assert get_settings().home == tmp_path / "b" / "mg"


def test_platform_dirs_follow_xdg_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import platformdirs

    monkeypatch.delenv("METALGUARD_HOME", raising=False)
    for home in ("h1", "h2"):
        monkeypatch.setenv("HOME", str(tmp_path / home))
        for xdg in ("x1", "x2"):
            monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / home / xdg / "state"))
            monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / home / xdg / "cache"))
            s = get_settings()
            assert s.state_dir == Path(platformdirs.user_state_dir("metal-guard", appauthor=False))
            assert s.cache_dir == Path(platformdirs.user_cache_dir("metal-guard", appauthor=False))
            assert str(tmp_path / home) in str(s.state_dir) and str(tmp_path / home) in str(s.cache_dir)


def test_a_replaced_os_environ_is_read_through_its_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = dict(os.environ, MLX_FORCE_WAIT_SEC="11")
    monkeypatch.setattr(os, "environ", fake)
    assert get_settings().force_wait_sec == 11.0
    fake["MLX_FORCE_WAIT_SEC"] = "12"
    assert get_settings().force_wait_sec == 12.0


def test_a_change_made_while_resolving_is_never_remembered_for_the_old_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another thread changes the environment while a call parses it (simulated
    deterministically: the first variable's parser makes the change). The answer must not be
    remembered for the environment the call started from."""
    monkeypatch.setenv("METALGUARD_DISABLED", "0")
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "1")
    first = settings_mod.VARIABLES[0]
    assert first.env == "METALGUARD_DISABLED"

    def racing_parse(name: str, raw: str) -> bool:
        os.environ["MLX_FORCE_WAIT_SEC"] = "2"  # the other thread's write, mid-resolve
        return settings_mod.parse_bool(name, raw)

    racy = dataclasses.replace(first, parse=racing_parse)
    monkeypatch.setattr(settings_mod, "VARIABLES", (racy, *settings_mod.VARIABLES[1:]))
    assert get_settings().force_wait_sec in (1.0, 2.0)
    monkeypatch.setattr(settings_mod, "VARIABLES", (first, *settings_mod.VARIABLES[1:]))
    os.environ["MLX_FORCE_WAIT_SEC"] = "1"  # the environment the racy call started from
    assert get_settings().force_wait_sec == 1.0
    os.environ["MLX_FORCE_WAIT_SEC"] = "2"
    assert get_settings().force_wait_sec == 2.0
