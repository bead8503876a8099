"""Fixtures for the integration tests: a real mosquitto on a free loopback
port, the real unix firmware, and helpers to run MicroPython scripts in it."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIRMWARE = Path(os.environ.get("MQTT_FIRMWARE", REPO / ".build" / "unix" / "micropython"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from broker import HOST, Broker, free_port  # noqa: E402 (found through the path above)
from certificates import Certificates  # noqa: E402
from proxy import Proxy  # noqa: E402
from rumqttd import Rumqttd  # noqa: E402

# MicroPython modules the scripts may import (a stream written in Python,
# the TLS context): copied beside each script.
MICROPYTHON_HELPERS = Path(__file__).resolve().parent / "micropython"


def firmware_facts():
    """What connect(start_loop=True) starts in the firmware under test
    ('thread', 'scheduled' or 'cycle'), and the name of its socket module
    ('socket', or 'lwip' for MicroPython's lwIP binding)."""
    if not FIRMWARE.exists():
        return "unknown", "unknown"
    result = subprocess.run(
        [str(FIRMWARE), "-c", "import mqtt, socket; print(mqtt.LOOP, socket.__name__)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    loop, sockets = result.stdout.split()
    return loop, sockets


LOOP, SOCKETS = firmware_facts()

# A firmware killed mid-connection: the kernel closes a unix socket at
# once, and the broker hears of it; lwIP's connections die with the
# process without a word, as on a board that loses power, and only the
# keepalive tells the broker (after 1.5 periods). Tests that kill a
# firmware and wait for the broker to notice use this keepalive.
KILLED_KEEPALIVE = 2 if SOCKETS == "lwip" else 60

# How long the firmware's loop may take to notice a link that the broker
# reset: the unix sockets report it at once; lwIP's error callback calls
# no socket callback (modlwip.c), and the scheduled loop's timer, which
# wakes it at least every second, finds the reset link.
RESET_NOTICE_S = 1.0 if SOCKETS == "lwip" else 0.0


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "long: a scenario of several seconds, run once per kind of loop (thread, scheduled,"
        " lwIP's scheduled): tests/run skips it on the sanitizer, esp32-path and newest"
        " MicroPython firmware, whose loop is the plain firmware's thread",
    )
    config.addinivalue_line(
        "markers",
        "longest: a long scenario that tests/run gives a pytest of its own (the 20 outages and"
        " the broker down for 30 s), beside the other long ones",
    )

# For tests of what only threads can do (two threads calling the client at
# once, a callback that blocks the loop's thread while the main one goes on).
needs_threads = pytest.mark.skipif(LOOP != "thread", reason="the firmware has no threads")


@pytest.fixture
def broker(tmp_path):
    server = Broker(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def persistent_broker(tmp_path):
    """A broker that keeps its sessions on disk, so that they outlive a
    restart."""
    store = tmp_path / "store"
    store.mkdir()
    server = Broker(tmp_path, settings=f"allow_anonymous true\npersistence true\npersistence_location {store}/\n")
    yield server
    server.stop()


@pytest.fixture
def rumqttd(tmp_path):
    """The second MQTT 5 broker (see rumqttd.py)."""
    second = Rumqttd(tmp_path)
    yield second
    second.stop()


@pytest.fixture
def proxy(broker):
    """A TCP proxy to `broker` that can swallow, cut or refuse traffic."""
    relay = Proxy(broker.port)
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return Certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture
def tls_broker(tmp_path, certificates):
    """A broker with a plain listener (for the peer) and three TLS
    listeners: right certificate, wrong host name, client certificate
    required."""
    ports = {"tls": free_port(), "wrong_host": free_port(), "mutual": free_port()}
    settings = (
        "allow_anonymous true\n"
        + certificates.listener(ports["tls"])
        + certificates.listener(ports["wrong_host"], server="wrong-host")
        + certificates.listener(ports["mutual"], require_certificate=True)
    )
    broker = Broker(tmp_path, settings=settings)
    broker.tls_ports = ports
    yield broker
    broker.stop()


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
    """Runs MicroPython code in the firmware, with `HOST` (the brokers'
    address), `PORT` and other parameters defined at the top of the script,
    after a prelude that imports mqtt and time and defines
    wait_until(condition, timeout_ms)."""

    def __init__(self, firmware, directory):
        self.firmware = firmware
        self.directory = Path(directory)
        self.count = 0
        self.processes = []
        for helper in MICROPYTHON_HELPERS.glob("*.py"):
            shutil.copy(helper, self.directory)

    def source(self, code, **params):
        params = {"HOST": HOST, **params}
        header = "".join(f"{name} = {value!r}\n" for name, value in params.items())
        return header + PRELUDE + textwrap.dedent(code)

    def start(self, code, options=(), **params):
        """Starts the script; `options` go to the firmware before it (for
        example ("-X", "heapsize=128k"))."""
        self.count += 1
        path = self.directory / f"script{self.count}.py"
        path.write_text(self.source(code, **params))
        process = subprocess.Popen(
            [str(self.firmware), *options, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.processes.append(process)
        return process

    def stop_all(self):
        """Ends the scripts still running (a test that failed or timed out
        before it collected its script)."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.communicate()

    def run(self, code, timeout=60, expect_ok=True, options=(), **params):
        process = self.start(code, options=options, **params)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            raise AssertionError(f"script timed out after {timeout} s; output:\n{output}")
        if expect_ok:
            assert process.returncode == 0, f"script failed ({process.returncode}):\n{output}"
        return output


def expect_line(process, expected):
    """Reads a started script's next line; when it is not `expected`,
    fails with everything else the script printed (a traceback, say)."""
    line = process.stdout.readline().strip()
    if line != expected:
        # A script that failed ends by itself; one that went on is ended.
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # Read through the text wrapper: readline() may hold the rest in
        # its buffer, which communicate() (reading the pipe) would miss.
        rest = process.stdout.read()
        raise AssertionError(f"the script printed {line!r}, not {expected!r}; then:\n{rest}")


@pytest.fixture
def micropython(firmware, tmp_path):
    scripts = Script(firmware, tmp_path)
    yield scripts
    scripts.stop_all()
