"""Fixtures for the integration tests: a real mosquitto on a free loopback
port, the real unix firmware, and helpers to run MicroPython scripts in it."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIRMWARE = Path(os.environ.get("MQTT_FIRMWARE", REPO / ".build" / "unix" / "micropython"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port, process, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"broker exited early with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"broker did not listen on port {port}")


class Broker:
    """A mosquitto process on 127.0.0.1, stopped by its PID at the end."""

    def __init__(self, directory, settings="allow_anonymous true\n"):
        self.directory = Path(directory)
        self.port = free_port()
        self.config = self.directory / "mosquitto.conf"
        # Started as root, mosquitto would switch to its own user, which
        # cannot read the tests' temporary files; "user root" keeps it as is.
        identity = "user root\n" if os.geteuid() == 0 else ""
        self.config.write_text(f"{identity}listener {self.port} 127.0.0.1\n{settings}")
        self.log = open(self.directory / "mosquitto.log", "ab")
        self.start()

    def start(self):
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, self.process)

    def terminate(self):
        """Stops mosquitto as a service manager would (SIGTERM: it saves
        its persistence database first)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self):
        self.terminate()
        self.start()

    def stop(self):
        self.terminate()
        if not self.log.closed:
            self.log.close()


@pytest.fixture
def broker(tmp_path):
    server = Broker(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def firmware():
    assert FIRMWARE.exists(), f"no firmware at {FIRMWARE}: run ports/unix/build.sh first"
    return FIRMWARE


PRELUDE = """
import mqtt, time

def wait_until(condition, timeout_ms=5000):
    start = time.ticks_ms()
    while not condition():
        if time.ticks_diff(time.ticks_ms(), start) > timeout_ms:
            return False
        time.sleep_ms(2)
    return True
"""


class Script:
    """Runs MicroPython code in the firmware, with `PORT` and other
    parameters defined at the top of the script, after a prelude that
    imports mqtt and time and defines wait_until(condition, timeout_ms)."""

    def __init__(self, firmware, directory):
        self.firmware = firmware
        self.directory = Path(directory)
        self.count = 0

    def source(self, code, **params):
        header = "".join(f"{name} = {value!r}\n" for name, value in params.items())
        return header + PRELUDE + textwrap.dedent(code)

    def start(self, code, **params):
        self.count += 1
        path = self.directory / f"script{self.count}.py"
        path.write_text(self.source(code, **params))
        return subprocess.Popen(
            [str(self.firmware), str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, code, timeout=60, expect_ok=True, **params):
        process = self.start(code, **params)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            raise AssertionError(f"script timed out after {timeout} s; output:\n{output}")
        if expect_ok:
            assert process.returncode == 0, f"script failed ({process.returncode}):\n{output}"
        return output


@pytest.fixture
def micropython(firmware, tmp_path):
    return Script(firmware, tmp_path)
