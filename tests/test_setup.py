"""ports/setup.sh, the installer behind the README's two commands: silent
when the machine has everything, and without the rights to install it
stops with the command to run."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO

SETUP = REPO / "ports" / "setup.sh"


def test_a_machine_that_has_everything_hears_nothing():
    # tests/run ran the installer before the tests: everything is here now.
    result = subprocess.run([str(SETUP), "tests"], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runuser") is None, reason="needs root to run the installer as another user"
)
def test_without_the_rights_to_install_it_prints_the_command_and_stops():
    # An unprivileged user (nobody; no sudo here) on a machine whose package
    # database is empty: every Debian package the demo needs is missing.
    # cargo and rustup are stand-ins that only need to exist: the installer
    # stops before it uses them.
    scratch = Path(tempfile.mkdtemp())
    try:
        scratch.chmod(0o755)
        (scratch / "dpkg").mkdir()
        (scratch / "dpkg" / "status").touch()
        (scratch / "bin").mkdir()
        for tool in ("cargo", "rustup"):
            (scratch / "bin" / tool).write_text("#!/bin/sh\nexit 0\n")
            (scratch / "bin" / tool).chmod(0o755)
        environment = {"PATH": f"{scratch}/bin:/usr/sbin:/usr/bin:/sbin:/bin", "DPKG_ADMINDIR": f"{scratch}/dpkg"}
        result = subprocess.run(
            ["runuser", "-u", "nobody", "--", "env", *(f"{k}={v}" for k, v in environment.items()), "bash", "-s", "demo"],
            stdin=open(SETUP),
            capture_output=True,
            text=True,
            cwd="/",
            timeout=60,
        )
    finally:
        shutil.rmtree(scratch)
    assert result.returncode == 1, result.stderr
    command = result.stderr.strip().splitlines()[-1].split()
    assert command[:5] == ["sudo", "apt-get", "update", "&&", "sudo"], result.stderr
    assert command[5:7] == ["apt-get", "install"], result.stderr
    for package in ("build-essential", "libffi-dev", "libmbedtls-dev", "mosquitto"):
        assert package in command, result.stderr
    # The demo needs no board toolchain.
    assert "gcc-arm-none-eabi" not in command, result.stderr
