"""Regenerate docs/configuration.md from metal_guard.settings.VARIABLES.

Run: python tools/gen_config_doc.py   (tests check the doc lists every variable)
"""

from __future__ import annotations

from pathlib import Path

from metal_guard.settings import describe_variables

HEADER = """# Configuration

metal-guard reads its configuration in one place (`metal_guard/settings.py`), at call time:
keyword arguments beat environment variables, which beat the defaults below. The one exception
is the kill switch: `METALGUARD_DISABLED=1` in the environment wins over code.

A change of the environment at run time (`os.environ[...] = ...`, `del os.environ[...]`,
`monkeypatch.setenv`) takes effect at the next call. `get_settings()` without arguments answers
from memory while the raw text of every variable it reads (and `HOME`, which `~` expands to) is
unchanged; a value that does not parse is never remembered and raises on every call. A change
made only with `os.putenv` is not seen, as `os.environ` does not see it either.

A bad value raises `metal_guard.SettingsError` naming the variable and the accepted form (the
CLI turns that into exit code 64); the message repeats at most the first 80 characters of the
value. The single documented fallback is `METALGUARD_MODE`: an unknown mode logs a warning
(once per process and value) and stays `defensive`, so a typo never switches protection off.

Rules shared by every variable:

- An empty or blank value (`VAR=`, `VAR=" "`) is an error, never "off": unset the variable to
  get the default. (`METALGUARD_ADAPTERS=` or `=","` would otherwise select no adapter at all.)
- Values longer than 65536 characters are refused before they are parsed.
- Booleans accept `1/true/yes/on` and `0/false/no/off` (case-insensitive).
- Numbers must be finite and inside the range in the "Accepted" column (`[a, b]` includes
  both ends, `(a, b]` excludes `a`). Durations are seconds (`_SEC`) or hours (`_H`).
- Paths must be absolute after `~` is expanded (a relative path would name a different file
  in every working directory, so two processes could both hold "the" lock) and at most 4096
  bytes long.

| Variable | Default | Accepted | Meaning |
|---|---|---|---|
"""


def render() -> str:
    rows = [
        f"| `{row['variable']}` | `{row['default']}` | {row['accepted']} | {row['doc']} |"
        for row in describe_variables()
    ]
    footer = """
## Where state lives

| What | Default location | Overridden by |
|---|---|---|
| durable state (lock, breaker, cadence, peak ledger, panics.jsonl, breadcrumbs, ack, sentinel) | `platformdirs.user_state_dir("metal-guard")` (`~/.local/state/metal-guard` on Linux, `~/Library/Application Support/metal-guard` on macOS) | `METALGUARD_HOME` (→ `$METALGUARD_HOME/state`) |
| disposable data (status.json, status.prom, demo model) | `platformdirs.user_cache_dir("metal-guard")` | `METALGUARD_HOME` (→ `$METALGUARD_HOME/cache`) |

Directories are created `0700`, files `0600`. Every JSON state file is written atomically; a
corrupt one is moved aside to `<name>.corrupt-<utc>` and replaced by fresh state with a warning.
"""
    return HEADER + "\n".join(rows) + "\n" + footer


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    target.write_text(render())
    print(f"wrote {target}")
