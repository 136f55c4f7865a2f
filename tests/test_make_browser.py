"""`make test` on a machine without Chromium: installs it (root or sudo) or stops at once with the command.

The Makefile's `browser` step runs here with a PATH that holds only small stand-ins for `id`, `sudo` and
`apt-get` (recording what they were asked), so no package is really installed and nothing needs root.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")


def _tool(folder: Path, name: str, body: str) -> None:
    p = folder / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)


def _make_browser(tmp_path, *, uid: int, sudo: bool | None, apt: bool = True, browser: bool = False):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.log"
    _tool(bin_, "id", f"echo {uid}")
    if sudo is not None:
        _tool(
            bin_,
            "sudo",
            f'if [ "$1" = -n ] && [ "$2" = true ]; then exit {0 if sudo else 1}; fi\necho "sudo $*" >> {log}\n"$@"',
        )
    if apt:
        _tool(bin_, "apt-get", f'echo "apt-get $*" >> {log}')
    if browser:
        _tool(bin_, "chromium", "exit 0")
        _tool(bin_, "chromedriver", "exit 0")
    r = subprocess.run(
        [MAKE, "-s", "-C", str(ROOT), "browser"], env={"PATH": str(bin_)}, capture_output=True, text=True, timeout=60
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return r, calls


@pytest.fixture(autouse=True)
def _need_make():
    assert MAKE, "make is what the README's test command runs"


def test_root_installs_chromium_with_apt(tmp_path):
    r, calls = _make_browser(tmp_path, uid=0, sudo=None)
    assert r.returncode == 0, r.stderr
    assert calls == ["apt-get update -qq", "apt-get install -y -qq chromium chromium-driver"]


def test_passwordless_sudo_installs_through_sudo(tmp_path):
    r, calls = _make_browser(tmp_path, uid=1000, sudo=True)
    assert r.returncode == 0, r.stderr
    assert calls[0] == "sudo apt-get update -qq" and calls[-1] == "apt-get install -y -qq chromium chromium-driver"
    assert "sudo apt-get install -y -qq chromium chromium-driver" in calls


@pytest.mark.parametrize("sudo", [None, False])
def test_without_root_or_sudo_stops_at_once_with_the_command(tmp_path, sudo):
    r, calls = _make_browser(tmp_path, uid=1000, sudo=sudo)
    assert r.returncode != 0 and calls == []
    assert "sudo apt-get update && sudo apt-get install -y chromium chromium-driver" in r.stderr


def test_present_browser_needs_nothing(tmp_path):
    r, calls = _make_browser(tmp_path, uid=1000, sudo=None, browser=True)
    assert r.returncode == 0 and calls == [] and r.stderr == ""


def test_test_target_checks_the_browser_before_installing_anything():
    out = subprocess.run(
        [MAKE, "-n", "-C", str(ROOT), "test", "VENV=/nonexistent-venv"], capture_output=True, text=True, timeout=60
    ).stdout
    assert out.index("chromedriver") < out.index("python3 -m venv")
    assert "pytest" in out
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "apt-get" not in ci
