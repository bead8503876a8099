"""client.message_flags() inside a callback: the retain, QoS and DUP flags
of the message being delivered, as the broker set them in its PUBLISH."""

from peer import Peer
from scripted_broker import DISCONNECT, PUBACK, SUBSCRIBE, ScriptedBroker

RECORDING = """
        seen = []
        def record(client, payload, topic):
            flags = client.message_flags()
            seen.append((topic, flags & 1, (flags >> 1) & 3, flags >> 3))
"""


def test_a_retained_message_and_live_ones_from_mosquitto(broker, micropython):
    peer = Peer(broker.port)
    peer.publish("flags/kept", b"retained", qos=1, retain=True)
    process = micropython.start(
        RECORDING
        + """
        c = mqtt.Client("flags")
        c.connect(HOST, 30, port=PORT)
        print("outside a callback:", c.message_flags())
        c.subscribe("flags/#", record, qos=1)
        wait_until(lambda: seen)
        print("ready")
        wait_until(lambda: len(seen) == 3)
        for entry in seen:
            print(*entry)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert process.stdout.readline().strip() == "outside a callback: None"
    assert process.stdout.readline().strip() == "ready"
    peer.publish("flags/live1", b"x", qos=1)
    peer.publish("flags/live0", b"y", qos=0)
    output, _ = process.communicate(timeout=30)
    peer.close()
    # topic, retain, QoS, DUP
    assert output.split("\n")[:3] == ["flags/kept 1 1 0", "flags/live1 0 1 0", "flags/live0 0 0 0"], output


def test_a_resent_message_carries_dup(micropython):
    def resending(connection):
        connection.read()  # CONNECT
        connection.connack()
        subscribe = connection.read_until(SUBSCRIBE)
        connection.send(bytes([0x90, 3]) + subscribe.body[:2] + b"\x01")
        # QoS 1, DUP set (0x3A), then the same id sent fresh (0x32).
        for first in (0x3A, 0x32):
            connection.send(bytes([first, 8, 0, 3]) + b"a/b" + (7).to_bytes(2, "big") + b"m")
            assert connection.read_until(PUBACK).packet_id() == 7
        connection.read_until(DISCONNECT)

    scripted = ScriptedBroker([resending])
    try:
        output = micropython.run(
            RECORDING
            + """
        c = mqtt.Client("resent")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("a/#", record, qos=1)
        wait_until(lambda: len(seen) == 2)
        c.disconnect()
        for entry in seen:
            print(*entry)
        """,
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert output.split("\n")[:2] == ["a/b 0 1 1", "a/b 0 1 0"], output
    assert scripted.errors == []
