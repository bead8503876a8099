"""The README's examples run as written against real brokers: only the
broker's address, port and CA file are put in."""

import re
import subprocess
import time

import pytest

from certificates import Certificates
from broker import Broker, free_port
from conftest import KILLED_KEEPALIVE, REPO, expect_line
from peer import Peer


def example(name):
    readme = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", readme, re.S)
    assert match, f"no example {name} in README.md"
    return match.group(1)


def for_broker(code, port, **replacements):
    code = code.replace('"broker.example"', 'HOST').replace("port=1883", f"port={port}")
    for old, new in replacements.items():
        assert old in code, old
        code = code.replace(old, new)
    return code


def indented(code):
    """Example code, indented like the test scripts it is joined with."""
    return "".join("        " + line + "\n" if line else "\n" for line in code.splitlines())


def test_quickstart(broker, micropython):
    # The example's callback prints; a print that also records lets the
    # script wait for the message instead of sleeping a guessed time.
    output = micropython.run(
        indented("printed = []\nbuiltin_print = print\ndef print(*args):\n    builtin_print(*args)\n    printed.append(args)\n")
        + indented(for_broker(example("quickstart"), broker.port))
        + """
        client.publish("lights/kitchen", b"on")
        wait_until(lambda: printed)
        client.disconnect()
        """
    )
    assert output.strip() == "lights/kitchen b'on'"


def test_credentials_and_will(tmp_path, micropython):
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "sensor-12", "secret"], check=True)
    broker = Broker(tmp_path, settings=f"allow_anonymous true\npassword_file {passwords}\n")
    process = None
    try:
        # The password file holds the example's user; the watcher is anonymous.
        watcher = Peer(broker.port, client_id="watcher")
        watcher.subscribe("sensors/12/status", qos=1)
        # Killed, the firmware says nothing: the broker publishes the will
        # when the socket closes, or when the keepalive runs out (lwIP).
        credentials = for_broker(example("credentials"), broker.port, **{"HOST, 60": f"HOST, {KILLED_KEEPALIVE}"})
        process = micropython.start(
            indented(credentials)
            + """
        print("online")
        time.sleep(60)
        """
        )
        expect_line(process, "online")
        assert [m.payload for m in watcher.wait_for(1)] == [b"online"]
        process.kill()
        process.communicate()
        assert [m.payload for m in watcher.wait_for(2)] == [b"online", b"offline"]
        watcher.close()
    finally:
        if process and process.poll() is None:
            process.kill()
        broker.stop()


def test_tls(tmp_path, micropython):
    certificates = Certificates(tmp_path / "certificates")
    tls_port = free_port()
    broker = Broker(tmp_path, settings="allow_anonymous true\n" + certificates.listener(tls_port))
    try:
        code = for_broker(example("tls"), broker.port, **{'"ca.der"': repr(certificates.path("ca.crt.der")), "port=8883": f"port={tls_port}"})
        output = micropython.run(indented(code) + "\n        print(client.connected())\n        client.disconnect()\n")
    finally:
        broker.stop()
    assert output.strip() == "True"


def test_reconnect(tmp_path, micropython):
    broker = Broker(tmp_path)
    process = micropython.start(
        indented(for_broker(example("reconnect"), broker.port))
        + """
        print("connected")
        time.sleep(60)
        """
    )
    try:
        expect_line(process, "connected")
        broker.restart()
        # The example resubscribes once reconnected; publish until it hears.
        commander = Peer(broker.port, client_id="commander")
        deadline = time.monotonic() + 20
        line = ""
        while time.monotonic() < deadline and not line:
            commander.publish("devices/12/commands", b"reboot", qos=1)
            line = read_line_within(process, 0.5)
        commander.close()
        assert line == "command: b'reboot'"
    finally:
        process.kill()
        process.communicate()
        broker.stop()


def read_line_within(process, seconds):
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    ready = selector.select(seconds)
    selector.close()
    return process.stdout.readline().strip() if ready else ""


def test_cycle(broker, micropython):
    loop = for_broker(example("cycle"), broker.port, **{"while True:": "for _ in range(4):"})
    # Something to receive, published before the loop runs.
    loop = loop.replace("for _ in range(4):", 'client.publish("lights/hall", b"off")\nfor _ in range(4):', 1)
    handler = "def on_message(client, payload, topic):\n    print(topic, payload)\n"
    output = micropython.run(indented(handler + loop + "client.disconnect()\n"))
    assert output.strip() == "lights/hall b'off'"


@pytest.mark.parametrize("name", ["asyncio", "blocking-twin"])
def test_asyncio_and_its_blocking_twin(name, broker, micropython):
    # A retained message, delivered as soon as the example subscribes; the
    # peer sees the example's publish.
    peer = Peer(broker.port)
    peer.publish("lights/porch", b"dim", qos=1, retain=True)
    peer.subscribe("sensors/#", qos=1)
    output = micropython.run(indented(for_broker(example(name), broker.port)))
    assert output.strip() == "lights/porch b'dim'"
    assert peer.wait_for(1)
    assert [(m.topic, m.payload) for m in peer.messages] == [("sensors/temperature", b"21.5")]
    peer.close()


def board_examples():
    readme = (REPO / "README.md").read_text()
    return re.findall(r"<!-- board example: (\S+) -->\n```python\n(.*?)```", readme, re.S)


@pytest.mark.parametrize("name", [name for name, _ in board_examples()])
def test_board_examples_compile(name, micropython):
    """Examples for boards (Wi-Fi, UART) cannot run here; MicroPython's own
    compiler checks them, so they cannot rot into syntax errors."""
    code = dict(board_examples())[name]
    output = micropython.run(f"compile({code!r}, {name!r}, 'exec')\nprint('compiled')\n")
    assert output.strip() == "compiled"
