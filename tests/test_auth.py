"""Credentials against mosquitto's password file, and refusals: the code
reaches the exception and get_return_code(), and no socket stays open."""

import os
import subprocess
import time

import pytest

from broker import Broker


@pytest.fixture
def password_broker(tmp_path):
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "device", "s3cret"], check=True)
    broker = Broker(tmp_path, settings=f"allow_anonymous false\npassword_file {passwords}\n")
    yield broker
    broker.stop()


def open_sockets(pid):
    """The kernel sockets a firmware holds (none ever on the lwIP firmware,
    whose sockets live in the process: see unclosed_connections)."""
    fd_dir = f"/proc/{pid}/fd"
    return sum(1 for fd in os.listdir(fd_dir) if os.readlink(os.path.join(fd_dir, fd)).startswith("socket:"))


def unclosed_connections(port, timeout=3.0):
    """The broker's ends of connections to `port` that the other side has
    not closed, seen from the kernel: a client that closed its socket leaves
    the broker's end in TIME-WAIT, one that did not leaves it open. Waits
    up to `timeout` seconds for the closing handshakes to finish."""
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(
            ["ss", "-Htn", "state", "established", "state", "close-wait", "state", "fin-wait-1",
             "state", "fin-wait-2", f"( sport = :{port} )"],
            capture_output=True, text=True, check=True,
        )
        lines = result.stdout.splitlines()
        if not lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_right_credentials_connect(password_broker, micropython):
    output = micropython.run(
        """
        got = []
        c = mqtt.Client("device-1")
        c.set_username_pw("device", "s3cret")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("auth/t", lambda client, payload, topic: got.append(payload), qos=1)
        c.publish("auth/t", "authenticated", qos=1)
        print(wait_until(lambda: got), got, c.get_return_code())
        c.disconnect()
        """,
        PORT=password_broker.port,
    )
    assert output.strip() == "True [b'authenticated'] 0"


@pytest.mark.parametrize("credentials", [("device", "wrong"), ("nobody", "s3cret"), None], ids=["wrong password", "unknown user", "none"])
def test_wrong_credentials_are_refused_and_nothing_stays_open(password_broker, micropython, credentials):
    process = micropython.start(
        """
        c = mqtt.Client("device-2")
        if CREDENTIALS:
            c.set_username_pw(*CREDENTIALS)
        try:
            c.connect(HOST, 30, port=PORT)
            print("connected: WRONG")
        except mqtt.MQTTException as e:
            print(e.args[0], e.args[1])
        print(c.get_return_code(), c.connected(), c.reconnect(), c.connected())
        import sys
        sys.stdin.readline()
        """,
        PORT=password_broker.port,
        CREDENTIALS=credentials,
    )
    # Keep stdin open so the script waits while its sockets are counted.
    first = process.stdout.readline().strip()
    second = process.stdout.readline().strip()
    try:
        assert first == "5 connection refused: not authorized"
        assert second == "5 False 5 False"
        assert open_sockets(process.pid) == 0
        assert unclosed_connections(password_broker.port) == []
    finally:
        process.kill()
        process.communicate()


def test_broker_rejecting_the_client_id_gives_its_code(tmp_path, micropython):
    broker = Broker(tmp_path, settings="allow_anonymous true\nallow_zero_length_clientid false\n")
    try:
        output = micropython.run(
            """
            c = mqtt.Client("")
            try:
                c.connect(HOST, 30, port=PORT)
            except mqtt.MQTTException as e:
                print(e.args[0] == mqtt.CONNECTION_REFUSED_IDENTIFIER_REJECTED, e.args[1])
            print(c.get_return_code(), c.connected())
            """,
            PORT=broker.port,
        )
    finally:
        broker.stop()
    assert output.strip().splitlines() == ["True connection refused: identifier rejected", "2 False"]
