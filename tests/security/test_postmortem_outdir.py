"""Issue 11 item 8: ``postmortem`` into an existing OUTDIR must never follow a planted link.

The attack: OUTDIR already exists (e.g. a predictable name under a shared /tmp) and holds
``panics -> ~victim/.ssh``; the bundle's report copy then lands as a file of the attacker's
choosing in the victim's directory. Refused now: a symlinked, foreign-owned, non-empty-foreign
or linked OUTDIR stops the run with exit 4 before anything is written; inside a bundle every
write goes through the directory fd and replaces a link rather than following it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from report_factory import write_panic

from metal_guard.forensics.postmortem import run_postmortem

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _cli(out: Path, env_home: Path, reports: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env.update(METALGUARD_HOME=str(env_home), METALGUARD_DIAGNOSTIC_REPORTS_DIRS=str(reports))
    return subprocess.run([sys.executable, "-m", "metal_guard", "postmortem", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    d = tmp_path / "victim"
    d.mkdir()
    (d / "authorized_keys").write_text("ssh-ed25519 AAAA original\n")
    return d


def _victim_untouched(victim: Path) -> None:
    assert sorted(p.name for p in victim.iterdir()) == ["authorized_keys"]
    assert (victim / "authorized_keys").read_text() == "ssh-ed25519 AAAA original\n"


@pytest.mark.parametrize("planted", ["panics", "aborts", "index.md", "system.json", "postmortem.json"])
def test_planted_link_in_existing_outdir_refuses_the_run(
    tmp_path: Path, rdir: Path, metalguard_home: Path, victim: Path, planted: str
) -> None:
    write_panic(rdir, time.time() - 600)
    out = tmp_path / "bundle"
    out.mkdir()
    if planted != "postmortem.json":  # looks like an earlier bundle, so only the link can refuse it
        (out / "postmortem.json").write_text("{}\n")
    target = victim if planted in ("panics", "aborts") else victim / "authorized_keys"
    (out / planted).symlink_to(target)
    proc = _cli(out, metalguard_home, rdir)
    assert proc.returncode == 4, proc.stderr
    assert "symbolic link" in proc.stderr
    _victim_untouched(victim)
    assert (out / planted).is_symlink()  # refused before writing anything


def test_symlinked_outdir_is_refused(tmp_path: Path, rdir: Path, metalguard_home: Path,
                                     victim: Path) -> None:
    out = tmp_path / "bundle"
    out.symlink_to(victim)
    proc = _cli(out, metalguard_home, rdir)
    assert proc.returncode == 4 and "symbolic link" in proc.stderr
    _victim_untouched(victim)


def test_non_empty_directory_that_is_no_bundle_is_refused(tmp_path: Path, victim: Path) -> None:
    with pytest.raises(OSError, match="not empty"):
        run_postmortem(victim)
    _victim_untouched(victim)


@pytest.mark.skipif(not ROOT, reason="needs root to create a directory owned by another user")
def test_foreign_owned_outdir_is_refused(tmp_path: Path, rdir: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir(mode=0o777)
    os.chown(out, 65534, 65534)  # e.g. made in a shared /tmp by another user
    with pytest.raises(OSError, match="owned by uid 65534"):
        run_postmortem(out)
    assert list(out.iterdir()) == []


def test_fresh_bundle_is_private_and_a_rerun_reuses_it(tmp_path: Path, rdir: Path) -> None:
    write_panic(rdir, time.time() - 600)
    out = tmp_path / "a" / "bundle"
    first = run_postmortem(out)
    assert first["panic_count"] == 1
    assert (os.stat(out).st_mode & 0o777) == 0o700
    assert all((p.stat().st_mode & 0o077) == 0 for p in out.rglob("*"))
    second = run_postmortem(out)  # an earlier bundle may be refreshed in place
    assert second["files"] == first["files"]
    assert not [p for p in out.rglob(".*.tmp")]


def test_links_planted_after_opening_are_replaced_not_followed(tmp_path: Path, victim: Path) -> None:
    """Even a link that appears while the bundle is open (only we or root could plant one in a
    0700 directory) is never followed: subdirectories refuse it, files replace it."""
    from metal_guard.forensics.safefs import BundleDir, UnsafePathError

    with BundleDir.open(tmp_path / "bundle") as bundle:
        (bundle.path / "panics").symlink_to(victim)
        with pytest.raises(UnsafePathError):
            bundle.write_bytes("panics/authorized_keys", b"attacker key\n")
        (bundle.path / "index.md").symlink_to(victim / "authorized_keys")
        bundle.write_text("index.md", "# bundle\n")
        with pytest.raises(UnsafePathError):
            bundle.write_bytes("../escape", b"x")
    _victim_untouched(victim)
    assert not (bundle.path / "index.md").is_symlink()
    assert (bundle.path / "index.md").read_text() == "# bundle\n"
