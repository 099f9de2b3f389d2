"""The systemd units in deploy/systemd/ pass ``systemd-analyze verify``, installed where they say they go.

Each unit is verified inside a throw-away root (``--root``): the units in ``/etc/systemd/system``, the host's
own system units beside them (for ``network-online.target``, ``multi-user.target``, ...), and an executable at
every path an ``Exec*=`` line names, the directories of ``WorkingDirectory=`` and ``ReadWritePaths=`` made, as
an installation following deploy/README.md would have them. Any complaint about one of our units (unknown key,
bad value, missing executable, unknown dependency) fails the test. Skips when systemd-analyze is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))
#: Where systemd keeps the distribution's units (merged /usr on Debian 12).
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def _paths(unit: Path, keys: tuple[str, ...]) -> list[str]:
    """Absolute paths named by ``keys`` in the unit (the command of Exec* lines, every path of the others)."""
    out = []
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if not sep or key.strip() not in keys:
            continue
        words = value.split()
        if key.startswith("Exec"):
            words = words[:1]
        out += [w.lstrip("-+!@:") for w in words if w.lstrip("-+!@:").startswith("/")]
    return out


def _make_root(root: Path) -> None:
    etc = root / "etc" / "systemd" / "system"
    etc.mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    for unit in UNITS:
        shutil.copy(unit, etc / unit.name)
        for exe in _paths(unit, ("ExecStart", "ExecStartPre", "ExecStartPost", "ExecStop", "ExecReload")):
            p = root / exe.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("#!/bin/sh\nexit 0\n")
            p.chmod(0o755)
        for d in _paths(unit, ("WorkingDirectory", "ReadWritePaths")):
            (root / d.lstrip("/")).mkdir(parents=True, exist_ok=True)


def test_units_found() -> None:
    names = {u.name for u in UNITS}
    assert {"dicomnode.service", "dicomnode-receive.service", "dicomnode-work.service"} <= names


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    if not SYSTEM_UNITS.is_dir():
        pytest.skip(f"no distribution units at {SYSTEM_UNITS} to verify the dependencies against")
    root = tmp_path / "root"
    _make_root(root)
    p = subprocess.run(
        [exe, "verify", "--man=no", f"--root={root}", str(root / "etc" / "systemd" / "system" / unit.name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = (p.stdout + p.stderr).strip()
    ours = [line for line in output.splitlines() if any(u.name in line for u in UNITS)]
    assert p.returncode == 0, output
    assert not ours, output
