"""The firmware whose `socket` module is MicroPython's own lwIP binding
(extmod/modlwip.c over lwIP 2.2.1, the stack of the Pico W and the other
lwIP boards), talking to mosquitto over a TAP device in a network
namespace of the test's own (lwip_network.py)."""

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from broker import free_port
from conftest import expect_line
from lwip_network import HOST, LwipNetwork

FIRMWARE = os.environ.get("MQTT_LWIP_FIRMWARE")

pytestmark = pytest.mark.skipif(
    not FIRMWARE or os.geteuid() != 0, reason="needs MQTT_LWIP_FIRMWARE (MQTT_LWIP=1 ports/unix/build.sh) and root"
)


@pytest.fixture
def network(tmp_path):
    network = LwipNetwork(tmp_path)
    yield network
    network.close()


def run_firmware(network, tmp_path, code, timeout=30):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    result = subprocess.run(
        network.command(str(Path(FIRMWARE).resolve()), str(script)),
        env=network.firmware_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_the_socket_module_is_lwip(network, tmp_path):
    result = run_firmware(network, tmp_path, "import mqtt, socket\nprint(socket.__name__, mqtt.LOOP)\n")
    assert result.stdout.split() == ["lwip", "scheduled"]


def test_messages_at_every_qos_and_size_reach_an_independent_peer(network, tmp_path):
    port = free_port()
    network.start_broker(port)
    # mosquitto_sub inside the namespace, as the independent peer; with -d
    # it reports its SUBACK, and the firmware publishes only after that.
    peer = network.start(
        "stdbuf", "-oL", "mosquitto_sub", "-d", "-h", HOST, "-p", str(port), "-t", "lwip/#", "-C", "6", "-v", "-q", "2",
        stdout=subprocess.PIPE,
    )
    seen = b""
    while b"received SUBACK" not in seen:
        line = peer.stdout.readline()
        assert line, f"mosquitto_sub ended: {seen!r}"
        seen += line
    # Up to 5,000 bytes: several of lwIP's 800-byte segments each way.
    result = run_firmware(
        network,
        tmp_path,
        f"""
        import mqtt, socket
        assert socket.__name__ == "lwip"
        got = []
        c = mqtt.Client("lwip-messages")
        c.connect("{HOST}", 30, port={port}, start_loop=False)
        c.subscribe("lwip/#", lambda client, payload, topic: got.append((topic, payload)), qos=2)
        sent = []
        for qos in (0, 1, 2):
            for size in (10, 5000):
                topic = "lwip/%d/%d" % (qos, size)
                c.publish(topic, bytes(i % 251 for i in range(size)), qos=qos)
                sent.append((topic, bytes(i % 251 for i in range(size))))
        for _ in range(500):
            if len(got) == len(sent):
                break
            c.cycle()
        print(sorted(got) == sorted(sent), len(got))
        c.disconnect()
        """,
    )
    assert result.stdout.split() == ["True", "6"], result.stdout + result.stderr
    # Nagle off: the binding sets TCP_NODELAY by the socket module's own
    # number, which lwIP accepts without a warning.
    assert "not implemented" not in result.stderr, result.stderr
    # Each message is "topic payload"; the binary payloads hold newlines too.
    rest, _ = peer.communicate(timeout=10)
    topics = sorted(line.split()[0].decode() for line in rest.split(b"\n") if line.startswith(b"lwip/"))
    assert topics == sorted(f"lwip/{qos}/{size}" for qos in (0, 1, 2) for size in (10, 5000)), rest


def test_the_scheduled_loop_runs_on_option_20_and_the_soft_timer(network, tmp_path):
    """The boards' loop for real: woken by modlwip.c's option 20 callback
    when a message arrives, and by machine.Timer (MicroPython's soft timer)
    for the keepalive, while the program only sleeps."""
    port = free_port()
    network.start_broker(port)
    firmware = network.start(
        str(Path(FIRMWARE).resolve()),
        "-c",
        textwrap.dedent(
            f"""
            import machine, mqtt, sys, time
            got = []
            c = mqtt.Client("lwip-loop")
            c.connect("{HOST}", 2, port={port})
            c.subscribe("lwip/loop", lambda client, payload, topic: got.append(payload))
            print(mqtt.LOOP, type(machine.Timer(-1)).__name__)
            print("ready")
            # Idle for three keepalive periods: only the timer's pings keep the
            # link. (sleep_ms runs what is scheduled meanwhile, as on a board;
            # the unix port's time.sleep() would not.)
            time.sleep_ms(6000)
            print("connected", c.connected())
            print("ready")
            start = time.ticks_ms()
            while not got and time.ticks_diff(time.ticks_ms(), start) < 5000:
                time.sleep_ms(50)
            print("got", got)
            c.disconnect()
            """
        ),
        env=network.firmware_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for expected_ready in range(2):
        while True:
            line = firmware.stdout.readline()
            assert line, "".join(lines)
            if line.strip() == "ready":
                break
            lines.append(line)
    # The message arrives while the program sleeps.
    subprocess.run(network.command("mosquitto_pub", "-h", HOST, "-p", str(port), "-t", "lwip/loop", "-m", "woken", "-q", "1"),
                   check=True, timeout=10)
    rest, _ = firmware.communicate(timeout=15)
    output = "".join(lines) + rest
    assert output.split("\n")[:3] == ["scheduled Timer", "connected True", "got [b'woken']"], output


RESETTING_BROKER = """
import socket, struct, sys, time
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(1)
print("listening", flush=True)
client, _ = server.accept()
client.recv(1024)
client.sendall(bytes([0x20, 0x02, 0x00, 0x00]))
time.sleep(1)
# A zero linger time makes close() reset the connection.
client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
client.close()
print("reset", flush=True)
time.sleep(30)
"""


def test_a_reset_link_is_noticed_soon(network, tmp_path):
    """lwIP reports a reset only through its error callback, which never
    calls option 20: the scheduled loop must still find the dead link
    soon, long before a keepalive ping would."""
    port = free_port()
    broker = network.start("python3", "-c", RESETTING_BROKER, HOST, str(port), stdout=subprocess.PIPE, text=True)
    expect_line(broker, "listening")
    result = run_firmware(
        network,
        tmp_path,
        f"""
        import mqtt, time
        failed_at = []
        def failed(client):
            failed_at.append(time.ticks_ms())
            return mqtt.BREAK_LOOP
        c = mqtt.Client("lwip-reset")
        c.connect("{HOST}", 60, port={port}, loop_failure=failed)
        connected_at = time.ticks_ms()
        while not failed_at and time.ticks_diff(time.ticks_ms(), connected_at) < 10000:
            time.sleep_ms(10)
        # The reset comes 1 s after CONNACK.
        print(bool(failed_at) and time.ticks_diff(failed_at[0], connected_at) < 3000, c.connected())
        """,
    )
    assert result.stdout.split() == ["True", "False"], result.stdout + result.stderr


def test_a_wake_up_lost_to_a_full_scheduler_queue_comes_again(network, tmp_path):
    """modlwip.c's option 20 callback and the soft timer drop their call
    when the scheduler's queue is full (a stand-in would rather retry): the loop's
    timer must still come back, or a quiet link gets no keepalive ping and
    the broker closes it."""
    port = free_port()
    network.start_broker(port, "allow_anonymous true\nlog_type all\n")
    result = run_firmware(
        network,
        tmp_path,
        f"""
        import micropython, mqtt, time
        c = mqtt.Client("lwip-lost-wake")
        c.connect("{HOST}", 4, port={port})
        def noop(unused):
            pass
        def hog(unused):
            # Nothing scheduled runs during a scheduled callback: fill the
            # queue, and keep it full for 1.2 s, over the loop's next
            # timer expiry (it wakes at least every second).
            try:
                while True:
                    micropython.schedule(noop, None)
            except RuntimeError:
                pass
            start = time.ticks_ms()
            while time.ticks_diff(time.ticks_ms(), start) < 1200:
                pass
        time.sleep_ms(500)
        micropython.schedule(hog, None)
        # Beyond one keepalive period: a ping is due.
        time.sleep_ms(6500)
        try:
            c.publish("lwip/alive", "yes", qos=1)
            print("alive")
        except Exception as e:
            print("dead", repr(e))
        c.disconnect()
        """,
    )
    assert result.stdout.split() == ["alive"], result.stdout + result.stderr
    # The broker saw the loop's ping while the program slept, before the
    # publish (which runs a cycle of its own).
    log = (tmp_path / f"mosquitto-{port}.log").read_text()
    pinged = log.find("Received PINGREQ from lwip-lost-wake")
    assert 0 <= pinged < log.find("Received PUBLISH from lwip-lost-wake"), log
