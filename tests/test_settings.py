from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from metal_guard.errors import SettingsError
from metal_guard.settings import VARIABLES, Settings, describe_variables, get_settings


def test_defaults_match_the_variable_table() -> None:
    defaults = Settings()
    for var in VARIABLES:
        assert getattr(defaults, var.field) == var.default, var.env


def test_every_field_has_a_variable() -> None:
    fields = {f.name for f in dataclasses.fields(Settings)} - {"from_env"}
    assert fields == {v.field for v in VARIABLES}


def test_env_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "5")
    assert get_settings().force_wait_sec == 5.0
    monkeypatch.setenv("MLX_FORCE_WAIT_SEC", "7.5")
    assert get_settings().force_wait_sec == 7.5
    assert "force_wait_sec" in get_settings().from_env


def test_kwargs_beat_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_PANIC_LOCKOUT_24H_N", "5")
    assert get_settings(panic_lockout_24h_n=9).panic_lockout_24h_n == 9


def test_kill_switch_beats_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_DISABLED", "1")
    assert get_settings(disabled=False).disabled is True


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("MLX_FORCE_WAIT_SEC", "-1"),
        ("MLX_FORCE_WAIT_SEC", "soon"),
        ("MLX_FORCE_WAIT_SEC", "nan"),
        ("METALGUARD_CROSS_MODEL_INTERVAL", "-5"),
        ("METALGUARD_PANIC_LOCKOUT_24H_N", "0"),
        ("METALGUARD_PANIC_LOCKOUT_24H_N", "2.5"),
        ("METALGUARD_PANIC_GATE_DISABLED", "maybe"),
        ("METALGUARD_PROCESS_MODE", "daemon"),
        ("METALGUARD_DIAGNOSTIC_REPORTS_DIRS", ":"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, raw: str) -> None:
    monkeypatch.setenv(var, raw)
    with pytest.raises(SettingsError) as info:
        get_settings()
    assert info.value.variable == var
    assert var in str(info.value) and "expected" in str(info.value)


def test_bad_mode_falls_back_to_defensive_with_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("METALGUARD_MODE", "obsrever")
    with caplog.at_level(logging.WARNING, logger="metal_guard.settings"):
        assert get_settings().mode == "defensive"
    assert "METALGUARD_MODE" in caplog.text
    monkeypatch.setenv("METALGUARD_MODE", "OBSERVER")
    assert get_settings().mode == "observer"


def test_bad_mode_kwarg_raises() -> None:
    with pytest.raises(SettingsError):
        get_settings(mode="loose")


def test_unknown_kwarg_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unknown metal-guard setting"):
        get_settings(not_a_setting=1)


def test_home_relocates_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_HOME", str(tmp_path / "mg"))
    monkeypatch.delenv("METALGUARD_BREADCRUMB_PATH", raising=False)
    s = get_settings()
    assert s.state_dir == tmp_path / "mg" / "state"
    assert s.cache_dir == tmp_path / "mg" / "cache"
    for p in (s.resolved_lock_path, s.resolved_breadcrumb_path, s.resolved_status_path):
        assert tmp_path in p.parents


def test_platformdirs_defaults_without_home(monkeypatch: pytest.MonkeyPatch) -> None:
    import platformdirs

    monkeypatch.delenv("METALGUARD_HOME", raising=False)
    s = get_settings()
    assert s.state_dir == Path(platformdirs.user_state_dir("metal-guard", appauthor=False))
    assert s.cache_dir == Path(platformdirs.user_cache_dir("metal-guard", appauthor=False))


def test_report_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    monkeypatch.setenv("METALGUARD_DIAGNOSTIC_REPORTS_DIRS", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert get_settings().report_dirs == (tmp_path / "a", tmp_path / "b")
    monkeypatch.delenv("METALGUARD_DIAGNOSTIC_REPORTS_DIRS")
    dirs = get_settings().report_dirs
    assert Path("/Library/Logs/DiagnosticReports/Retired") in dirs


def test_adapter_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_DISABLED_ADAPTERS", "mlx-vlm, langchain")
    assert get_settings().disabled_adapters == frozenset({"mlx_vlm", "langchain"})


def test_documentation_lists_every_variable() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    for row in describe_variables():
        assert f"`{row['variable']}`" in doc, row["variable"]
