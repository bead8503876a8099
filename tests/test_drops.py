"""A message the client cannot take (no memory for it, or larger than
max_packet_size) is read past without being allocated, acknowledged, and
reported once: it can never wedge the client, and the next messages flow."""

import subprocess

import pytest

from broker import HOST
from scripted_broker import CONNECT, DISCONNECT, PUBACK, SUBSCRIBE, ScriptedBroker

BIG = 300_000
SMALL = 5

DROP_SCRIPT = """
drops = []
got = []
def on_drop(client, topic, length):
    drops.append((topic, length))
def on_message(client, payload, topic):
    got.append(payload)
client = mqtt.Client('dropper', clean_session=False, **CLIENT)
if REPORT:
    client.connect(HOST, 30, port=PORT, on_drop=on_drop)
else:
    client.connect(HOST, 30, port=PORT)
client.subscribe('drop/#', on_message, 1)
# Nothing printed meanwhile: the loop's report must not be cut by a line
# of this thread's.
wait_until(lambda: len(got) == SMALL, 30000)
print('drops', drops)
print('got', len(got), sorted(got) == sorted(b'small%d' % i for i in range(SMALL)))
client.disconnect()
"""


def publish_packet(topic, packet_id, payload):
    body = len(topic).to_bytes(2, "big") + topic.encode() + packet_id.to_bytes(2, "big") + payload
    length = len(body)
    encoded = b""
    while True:
        byte = length & 0x7F
        length >>= 7
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    return bytes([0x32]) + encoded + body


def broker_sending(size, acknowledged):
    """One connection's script: a QoS 1 message of `size` bytes, then SMALL
    small ones; records the packet ids the client acknowledges."""

    def script(connection):
        connection.read_until(CONNECT)
        connection.connack()
        subscribe = connection.read_until(SUBSCRIBE)
        connection.send(bytes([0x90, 3]) + subscribe.packet_id().to_bytes(2, "big") + bytes([1]))
        connection.send(publish_packet("drop/big", 1, b"x" * size))
        for i in range(SMALL):
            connection.send(publish_packet("drop/small", 2 + i, b"small%d" % i))
        while True:
            packet = connection.read_until(PUBACK) if len(acknowledged) < SMALL + 1 else connection.read_until(DISCONNECT)
            if packet.kind == DISCONNECT:
                return
            acknowledged.append(packet.packet_id())

    return script


@pytest.mark.parametrize(
    "case, size, client, options",
    [
        ("no memory", BIG, {}, ("-X", "heapsize=128k")),
        ("too large", 5000, {"max_packet_size": 4096}, ()),
    ],
)
@pytest.mark.parametrize("report", [True, False], ids=["on_drop", "printed"])
def test_a_message_that_cannot_be_taken_is_dropped_once(micropython, case, size, client, options, report):
    """The broker's script serves one connection only: a client that failed
    its link to have the message sent again would find no broker. Every
    message is acknowledged exactly once, the big one included."""
    acknowledged = []
    scripted = ScriptedBroker([broker_sending(size, acknowledged)])
    try:
        output = micropython.run(
            DROP_SCRIPT, options=options, PORT=scripted.port, CLIENT=client, REPORT=report, SMALL=SMALL, timeout=60
        )
    finally:
        scripted.close()
    assert scripted.errors == []
    assert sorted(acknowledged) == list(range(1, SMALL + 2)), output
    assert f"got {SMALL} True" in output, output
    if report:
        assert f"drops [('drop/big', {size})]" in output, output
    else:
        reason = "out of memory" if case == "no memory" else "larger than max_packet_size"
        assert output.count("dropped") == 1, output
        assert f"mqtt: message of {size} bytes on drop/big dropped: {reason}" in output, output


MOSQUITTO_SCRIPT = """
drops = []
got = []
client = mqtt.Client('persistent', clean_session=False)
def on_drop(client, topic, length):
    drops.append((topic, length))
def on_message(client, payload, topic):
    got.append(payload)
client.connect(HOST, 30, port=PORT, on_drop=on_drop, auto_reconnect=True)
client.subscribe('drop/#', on_message, 1)
print('ready')
wait_until(lambda: len(got) == 1, 30000)
print('drops', drops, 'got', got, 'connected', client.connected())
client.disconnect()
"""


def test_a_message_too_big_for_the_heap_from_mosquitto(broker, micropython, tmp_path):
    """The measured case: a persistent-session subscriber on a 128 KB heap,
    one 300,000-byte QoS 1 message from mosquitto_pub, then a 5-byte one:
    one drop reported, the small one delivered, the link never failed."""
    process = micropython.start(MOSQUITTO_SCRIPT, options=("-X", "heapsize=128k"), PORT=broker.port)
    assert process.stdout.readline().strip() == "ready"
    big = tmp_path / "big"
    big.write_bytes(b"y" * BIG)
    publish = ["mosquitto_pub", "-h", HOST, "-p", str(broker.port), "-q", "1", "-t"]
    subprocess.run([*publish, "drop/big", "-f", str(big)], check=True, timeout=30)
    subprocess.run([*publish, "drop/small", "-m", "small"], check=True, timeout=30)
    output, _ = process.communicate(timeout=60)
    assert f"drops [('drop/big', {BIG})] got [b'small'] connected True" in output, output
