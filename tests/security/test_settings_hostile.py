"""Items 13-16: hostile environment values, as properties over the whole variable table.

Every variable is tried with empty/blank, relative-path, huge, non-finite and 10 MB values;
each must either parse to a sane value or raise ``SettingsError`` naming the variable, with a
short message. The CLI turns that into exit 64.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metal_guard import settings as settings_mod
from metal_guard.errors import SettingsError
from metal_guard.settings import (
    FALLBACK_VARIABLES,
    MAX_VALUE_CHARS,
    SHOWN_VALUE_CHARS,
    VARIABLES,
    Number,
    get_settings,
    parse_path,
    parse_paths,
)

ALL = [v for v in VARIABLES]
STRICT = [v for v in VARIABLES if v.env not in FALLBACK_VARIABLES]
NUMERIC = [v for v in VARIABLES if isinstance(v.parse, Number)]
PATHS = [v for v in VARIABLES if v.parse in (parse_path, parse_paths)]
#: An error message may repeat at most this much of the value, plus the variable and form.
MESSAGE_MAX = SHOWN_VALUE_CHARS + 400

_FAST = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


def _env(var: settings_mod._Var, raw: str) -> dict[str, str]:
    return {var.env: raw}


def _rejects(var: settings_mod._Var, raw: str) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        get_settings(env=_env(var, raw))
    err = info.value
    assert err.variable == var.env
    assert var.env in str(err) and "expected" in str(err)
    assert len(str(err)) < MESSAGE_MAX + len(var.env)
    return err


def test_the_table_classes_are_not_empty() -> None:
    assert len(NUMERIC) >= 15 and len(PATHS) >= 5
    assert {"METALGUARD_HOME", "MLX_LOCK_PATH", "METALGUARD_BREADCRUMB_PATH",
            "METALGUARD_STATUS_PATH"} <= {v.env for v in PATHS}


# --------------------------------------------------------------------------- 13: empty values


blank = st.text(alphabet=" \t\n\r\x0b\x0c", max_size=8)


@pytest.mark.parametrize("var", STRICT, ids=lambda v: v.env)
@_FAST
@given(raw=blank)
def test_an_empty_or_blank_value_is_rejected_for_every_variable(var: settings_mod._Var,
                                                                 raw: str) -> None:
    _rejects(var, raw)


@_FAST
@given(raw=st.text(alphabet=" ,\t", max_size=12))
def test_adapters_made_of_separators_select_nothing_and_are_rejected(raw: str) -> None:
    for name in ("METALGUARD_ADAPTERS", "METALGUARD_DISABLED_ADAPTERS"):
        with pytest.raises(SettingsError) as info:
            get_settings(env={name: raw})
        assert info.value.variable == name


def test_adapters_still_parse_real_lists() -> None:
    assert get_settings(env={"METALGUARD_ADAPTERS": " mlx-lm , langchain,"}).adapters == \
        frozenset({"mlx_lm", "langchain"})


def test_an_empty_mode_falls_back_to_defensive() -> None:
    assert get_settings(env={"METALGUARD_MODE": ""}).mode == "defensive"


# --------------------------------------------------------------------------- 14: relative paths


relative = st.text(
    alphabet=st.characters(blacklist_characters="\x00/~:", blacklist_categories=("Cs",)),
    min_size=1, max_size=40,
).filter(lambda s: s.strip() != "").flatmap(
    lambda head: st.sampled_from([head, f"{head}/lock", f"./{head}", f"../{head}/x"]))


@pytest.mark.parametrize("var", PATHS, ids=lambda v: v.env)
@_FAST
@given(raw=relative)
def test_relative_paths_are_rejected(var: settings_mod._Var, raw: str) -> None:
    err = _rejects(var, raw)
    assert "absolute" in err.accepted


@pytest.mark.parametrize("var", PATHS, ids=lambda v: v.env)
def test_tilde_expands_to_an_absolute_path(var: settings_mod._Var, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    value = getattr(get_settings(env=_env(var, "~/mg/x")), var.field)
    first = value[0] if isinstance(value, tuple) else value
    assert first == tmp_path / "mg" / "x" and first.is_absolute()


def test_two_working_directories_resolve_one_lock(tmp_path: Path) -> None:
    """The original symptom: a relative MLX_LOCK_PATH meant one lock per cwd."""
    code = ("import json; from metal_guard.settings import get_settings; "
            "print(get_settings().resolved_lock_path)")
    out = set()
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        env = {**os.environ, "MLX_LOCK_PATH": "~/locks/mlx.lock", "HOME": str(tmp_path)}
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / sub, env=env,
                                capture_output=True, text=True, check=True)
        out.add(result.stdout.strip())
    assert out == {str(tmp_path / "locks" / "mlx.lock")}
    env = {**os.environ, "MLX_LOCK_PATH": "locks/mlx.lock"}
    result = subprocess.run([sys.executable, "-m", "metal_guard", "lock"], cwd=tmp_path / "a",
                            env=env, capture_output=True, text=True)
    assert result.returncode == 64 and "MLX_LOCK_PATH" in result.stderr


def test_an_overlong_path_is_rejected() -> None:
    with pytest.raises(SettingsError):
        get_settings(env={"METALGUARD_HOME": "/" + "a/" * 3000})


# --------------------------------------------------------------------------- 15: numeric ranges


@pytest.mark.parametrize("var", NUMERIC, ids=lambda v: v.env)
@_FAST
@given(data=st.data())
def test_numbers_outside_the_documented_range_are_rejected(var: settings_mod._Var,
                                                           data: st.DataObject) -> None:
    num: Number = var.parse
    above = data.draw(st.one_of(
        st.floats(min_value=num.maximum, exclude_min=True, allow_infinity=False),
        st.sampled_from(["1e12", "1e308", "1e400", "inf", "-inf", "nan", "NaN", "Infinity",
                         "9" * 5000]),
    ))
    raw = repr(above) if isinstance(above, float) else above
    if num.kind is int and isinstance(above, float):
        raw = str(max(math.ceil(above), int(num.maximum) + 1))
    _rejects(var, raw)
    below = num.minimum - data.draw(st.floats(min_value=1e-3, max_value=1e12))
    _rejects(var, str(math.floor(below)) if num.kind is int else repr(below))


@pytest.mark.parametrize("var", NUMERIC, ids=lambda v: v.env)
@_FAST
@given(data=st.data())
def test_numbers_inside_the_range_are_accepted(var: settings_mod._Var,
                                               data: st.DataObject) -> None:
    num: Number = var.parse
    if num.kind is int:
        value: float = data.draw(st.integers(min_value=int(num.minimum),
                                             max_value=int(num.maximum)))
    else:
        value = data.draw(st.floats(min_value=num.minimum, max_value=num.maximum,
                                    exclude_min=not num.allow_minimum))
    got = getattr(get_settings(env=_env(var, repr(value))), var.field)
    assert got == value and num.minimum <= got <= num.maximum


@pytest.mark.parametrize("var", NUMERIC, ids=lambda v: v.env)
def test_every_numeric_range_is_documented(var: settings_mod._Var) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith(f"| `{var.env}`"))
    assert var.parse.range_text in row
    assert math.isfinite(var.parse.maximum)


def test_huge_gate_values_give_exit_64_not_an_internal_error(tmp_path: Path) -> None:
    for name, raw in (("METALGUARD_PANIC_COOLDOWN_STAGE1_H", "1e12"),
                      ("METALGUARD_POSTMORTEM_SENTINEL_H", "1e308")):
        env = {**os.environ, name: raw}
        for cmd in (["status"], ["breaker", "check"]):
            result = subprocess.run([sys.executable, "-m", "metal_guard", *cmd], env=env,
                                    capture_output=True, text=True, cwd=tmp_path)
            assert result.returncode == 64, (cmd, result.stderr)
            assert name in result.stderr and "internal error" not in result.stderr


# --------------------------------------------------------------------------- 16: echoes


@pytest.mark.parametrize("var", ALL, ids=lambda v: v.env)
def test_a_10mb_value_is_refused_with_a_short_message(var: settings_mod._Var) -> None:
    raw = "7" * (10 << 20)
    if var.env in FALLBACK_VARIABLES:
        assert get_settings(env=_env(var, raw)).mode == "defensive"
        return
    err = _rejects(var, raw)
    assert str(MAX_VALUE_CHARS) in err.accepted


@pytest.mark.parametrize("var", ALL, ids=lambda v: v.env)
@_FAST
@given(raw=st.text(max_size=300))
def test_any_value_parses_or_fails_cleanly(var: settings_mod._Var, raw: str) -> None:
    """No value makes get_settings raise anything but SettingsError, nor echo it whole."""
    try:
        get_settings(env=_env(var, raw))
    except SettingsError as err:
        assert err.variable == var.env and len(str(err)) < MESSAGE_MAX + len(var.env)


def test_cli_echo_is_truncated(capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from metal_guard.cli import main

    for name in ("MLX_FORCE_WAIT_SEC", "METALGUARD_HOME", "METALGUARD_ADAPTERS"):
        monkeypatch.setenv(name, "\u2028x" * (5 << 20))  # 10 M characters
        assert main(["status"]) == 64
        err = capsys.readouterr().err
        assert name in err and len(err) < 1000
        monkeypatch.delenv(name)


def test_mode_warning_is_printed_once_per_command(tmp_path: Path) -> None:
    env = {**os.environ, "METALGUARD_MODE": "obsever-typo-16"}
    result = subprocess.run([sys.executable, "-m", "metal_guard", "status"], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("METALGUARD_MODE") == 1, result.stderr


def test_mode_warning_once_per_value_in_process(caplog: pytest.LogCaptureFixture) -> None:
    settings_mod._MODE_WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="metal_guard.settings"):
        for _ in range(5):
            assert get_settings(env={"METALGUARD_MODE": "loose-a"}).mode == "defensive"
        get_settings(env={"METALGUARD_MODE": "loose-b"})
    texts = [r.getMessage() for r in caplog.records]
    assert sum("loose-a" in t for t in texts) == 1 and sum("loose-b" in t for t in texts) == 1


@pytest.mark.parametrize("var", PATHS, ids=lambda v: v.env)
def test_relative_path_overrides_in_code_are_rejected_too(var: settings_mod._Var) -> None:
    value: object = ("rel/dir",) if var.parse is parse_paths else "rel/file"
    with pytest.raises(SettingsError) as info:
        get_settings(**{var.field: value})
    assert info.value.variable == var.field
    absolute: object = ("/abs/dir",) if var.parse is parse_paths else "/abs/file"
    got = getattr(get_settings(**{var.field: absolute}), var.field)
    assert (got[0] if isinstance(got, tuple) else got) == Path("/abs") / ("dir" if var.parse is parse_paths else "file")
