"""MQTT 5 (Client(protocol=mqtt.MQTTv5)) against mosquitto, checked with a
paho-mqtt peer that speaks MQTT 5 too, and with mosquitto's own log of
the protocol each client connected with."""

import re
import subprocess

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import Broker
from peer import Peer
from scripted_broker import CONNECT, ScriptedBroker


def connected_with(broker, client_id):
    """The protocol level mosquitto logged for `client_id`'s connection
    (2: MQTT 3.1.1 in mosquitto's numbering, 5: MQTT 5), and its keepalive."""
    text = (broker.directory / "mosquitto.log").read_text()
    found = re.findall(rf"New client connected from \S+ as {re.escape(client_id)} \(p(\d+), c\d+, k(\d+)", text)
    return [(int(level), int(keepalive)) for level, keepalive in found]


def test_messages_go_both_ways_over_mqtt5(broker, micropython):
    peer = Peer(broker.port, client_id="peer5", protocol=5)
    peer.subscribe("from-device/#", qos=2)
    process = micropython.start(
        """
        got = []
        c = mqtt.Client("device5", protocol=mqtt.MQTTv5)
        c.connect(HOST, 30, port=PORT)
        print(c.connected(), c.subscribe("to-device/#", lambda client, payload, topic: got.append((topic, payload)), qos=2))
        for qos in (0, 1, 2):
            c.publish("from-device/%d" % qos, b"v5 %d" % qos, qos=qos)
        print("published")
        print(wait_until(lambda: len(got) == 3, 10000), sorted(got))
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert process.stdout.readline().strip() == "True 2"
    assert process.stdout.readline().strip() == "published"
    # The peer's messages carry properties, which the client reads past.
    properties = Properties(PacketTypes.PUBLISH)
    properties.MessageExpiryInterval = 60
    properties.UserProperty = [("origin", "peer"), ("n", "1")]
    properties.ContentType = "text/plain"
    for qos in (0, 1, 2):
        peer.publish(f"to-device/{qos}", f"to {qos}".encode(), qos=qos, properties=properties)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert output.strip() == "True [('to-device/0', b'to 0'), ('to-device/1', b'to 1'), ('to-device/2', b'to 2')]"
    messages = peer.wait_for(3)
    assert sorted((m.topic, m.payload, m.qos) for m in messages) == [
        ("from-device/0", b"v5 0", 0),
        ("from-device/1", b"v5 1", 1),
        ("from-device/2", b"v5 2", 2),
    ]
    peer.close()
    assert connected_with(broker, "device5") == [(5, 30)]


def test_mqtt311_stays_the_default(broker, micropython):
    micropython.run(
        """
        c = mqtt.Client("device311")
        c.connect(HOST, 30, port=PORT)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert connected_with(broker, "device311") == [(2, 30)]


def test_a_refusal_carries_the_mqtt5_reason_code(tmp_path, micropython):
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "device", "s3cret"], check=True)
    broker = Broker(tmp_path, settings=f"allow_anonymous false\npassword_file {passwords}\n")
    try:
        output = micropython.run(
            """
            c = mqtt.Client("refused5", protocol=mqtt.MQTTv5)
            c.set_username_pw("device", "wrong")
            try:
                c.connect(HOST, 30, port=PORT)
                print("connected: WRONG")
            except mqtt.MQTTException as e:
                print(hex(e.args[0] - mqtt.REASON), e.args[1])
            print(c.get_return_code(), c.connected())
            c.set_username_pw("device", "s3cret")
            c.connect(HOST, 30, port=PORT)
            print(c.connected())
            c.disconnect()
            """,
            PORT=broker.port,
        )
    finally:
        broker.stop()
    assert output.strip().splitlines() == [
        # mosquitto refuses a wrong password as "not authorized".
        "0x87 connection refused: not authorized (0x87)",
        f"{0x87} False",
        "True",
    ]


def test_connect_states_its_limits_and_the_brokers_disconnect_reaches_loop_failure(micropython):
    # mosquitto 2.0.11 sends DISCONNECT to no MQTT 5 client that behaves
    # (a session taken over, or its own shutdown, just close the link):
    # a scripted broker sends one.
    seen = []

    def script(connection):
        connect = connection.read()
        assert connect.kind == CONNECT
        seen.append(connect.body)
        # CONNACK: accepted, no properties; then DISCONNECT "server
        # shutting down" with the reason string "maintenance".
        connection.send(bytes([0x20, 3, 0, 0, 0]))
        reason = b"maintenance"
        properties = bytes([0x1F, 0, len(reason)]) + reason
        connection.send(bytes([0xE0, 2 + len(properties), 0x8B, len(properties)]) + properties)
        try:
            connection.read()
        except EOFError:
            pass

    scripted = ScriptedBroker([script])
    try:
        output = micropython.run(
            """
            failures = []
            def failed(client):
                failures.append(client.disconnect_reason())
                return mqtt.BREAK_LOOP
            c = mqtt.Client("told", protocol=mqtt.MQTTv5, max_packet_size=1000)
            print(c.disconnect_reason())
            c.connect(HOST, 30, port=PORT, loop_failure=failed)
            print(wait_until(lambda: failures, 10000), failures, c.connected())
            """,
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert scripted.errors == []
    assert output.strip().splitlines() == ["None", "True [(139, 'maintenance')] False"]
    # CONNECT: level 5, clean start, keepalive 30, then its properties:
    # Receive Maximum 32 (the QoS 2 ids the client remembers) and Maximum
    # Packet Size 1,002 (1,000 + 2 bytes of remaining length + 1, less the
    # byte that mosquitto leaves out when it compares).
    body = seen[0]
    assert body[:10] == b"\x00\x04MQTT\x05\x02\x00\x1e"
    assert body[10:19] == bytes([8, 0x21, 0, 32, 0x27, 0, 0, 0x03, 0xEA])
    assert body[19:] == b"\x00\x04told"


def test_an_assigned_client_identifier_is_readable(broker, micropython):
    output = micropython.run(
        """
        c = mqtt.Client("", protocol=mqtt.MQTTv5)
        print(c.assigned_client_id())
        c.connect(HOST, 30, port=PORT)
        print(c.assigned_client_id())
        c.disconnect()
        """,
        PORT=broker.port,
    )
    before, after = output.strip().splitlines()
    assert before == "None"
    assert after.startswith("auto-") and len(after) > 10, output
    assert connected_with(broker, after) == [(5, 30)]


@pytest.mark.parametrize(
    "arguments, error",
    [
        ("protocol=3", "ValueError protocol must be MQTTv311 or MQTTv5"),
        ("session_expiry=60", "ValueError session_expiry needs protocol=MQTTv5"),
        ("protocol=mqtt.MQTTv5, session_expiry=-1", "ValueError"),
    ],
)
def test_bad_protocol_settings_are_refused(micropython, arguments, error):
    output = micropython.run(
        f"""
        try:
            mqtt.Client("x", {arguments})
            print("made: WRONG")
        except Exception as e:
            print(type(e).__name__, e)
        """
    )
    assert output.strip().startswith(error), output


@pytest.mark.parametrize("protocol", [4, 5], ids=["MQTT 3.1.1", "MQTT 5"])
def test_maximum_packet_size_at_the_limit_and_one_byte_over(broker, micropython, protocol):
    """A PUBLISH to the client whose remaining length is max_packet_size
    arrives; one byte more, and with MQTT 5 mosquitto never sends it (the
    client stated its Maximum Packet Size in CONNECT), while with 3.1.1
    it comes and the client reads it past and reports it dropped."""
    peer = Peer(broker.port, client_id="big-sender")
    process = micropython.start(
        """
        got = []
        drops = []
        c = mqtt.Client("small", protocol=PROTOCOL, max_packet_size=100)
        c.connect(HOST, 30, port=PORT, on_drop=lambda client, topic, length: drops.append((topic, length)))
        c.subscribe("m", lambda client, payload, topic: got.append(len(payload)))
        print("subscribed")
        print(wait_until(lambda: got[-1:] == [1], 10000), got, drops)
        c.disconnect()
        """,
        PORT=broker.port,
        PROTOCOL=protocol,
    )
    assert process.stdout.readline().strip() == "subscribed"
    # Remaining length: topic (3), in MQTT 5 an empty property block (1),
    # and the payload.
    header = 3 + (1 if protocol == 5 else 0)
    for size in (100 - header, 101 - header, 1):
        peer.publish("m", b"x" * size)
    output, _ = process.communicate(timeout=30)
    peer.close()
    assert process.returncode == 0, output
    at_limit, over = 100 - header, 101 - header
    if protocol == 5:
        assert output.strip() == f"True [{at_limit}, 1] []"
    else:
        assert output.strip() == f"True [{at_limit}, 1] [('m', {over})]"


def test_a_publish_over_the_brokers_maximum_packet_size_raises_before_it_is_sent(tmp_path, micropython):
    broker = Broker(tmp_path, settings="allow_anonymous true\nmax_packet_size 100\n")
    peer = Peer(broker.port, client_id="watcher", protocol=5)
    peer.subscribe("m")
    try:
        output = micropython.run(
            """
            c = mqtt.Client("bounded", protocol=mqtt.MQTTv5)
            c.connect(HOST, 30, port=PORT)
            # The whole packet: 2 bytes of fixed header, topic 3, an empty
            # property block 1, then the payload: 94 bytes make 100.
            c.publish("m", b"x" * 94)
            try:
                c.publish("m", b"x" * 95)
                print("sent: WRONG")
            except ValueError as e:
                print("ValueError", e)
            c.publish("m", b"end")
            print(c.connected())
            c.disconnect()
            """,
            PORT=broker.port,
        )
        messages = peer.wait_for(2)
    finally:
        peer.close()
        broker.stop()
    assert output.strip().splitlines() == [
        "ValueError not allowed by the broker (its maximum QoS, retain or packet size)",
        "True",
    ]
    assert [len(m.payload) for m in messages] == [94, 3]
