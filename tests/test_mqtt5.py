"""MQTT 5 (Client(protocol=mqtt.MQTTv5)) against mosquitto, checked with a
paho-mqtt peer that speaks MQTT 5 too, and with mosquitto's own log of
the protocol each client connected with."""

import re
import subprocess
import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import Broker
from conftest import KILLED_KEEPALIVE, expect_line
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


def test_subscription_options(broker, micropython):
    """No Local keeps the client's own messages from it; Retain Handling 2
    sends no retained message on subscribing; Retain As Published keeps a
    live message's retain flag (which the broker otherwise clears)."""
    peer = Peer(broker.port, client_id="options-peer", protocol=5)
    peer.publish("held/t", b"retained", qos=1, retain=True)
    process = micropython.start(
        """
        got = []
        def keep(client, payload, topic):
            got.append((topic, payload, client.message_flags() & 1))
        c = mqtt.Client("options", protocol=mqtt.MQTTv5)
        c.connect(HOST, 30, port=PORT)
        c.subscribe("own/#", keep, qos=1, no_local=True)
        c.subscribe("held/#", keep, qos=1, retain_handling=2)
        c.subscribe("flag/as-published", keep, qos=1, retain_as_published=True)
        c.subscribe("flag/cleared", keep, qos=1)
        c.publish("own/mine", b"not back", qos=1)
        print("subscribed")
        print(wait_until(lambda: len(got) >= 3, 10000))
        time.sleep_ms(300)
        print(sorted(got))
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert process.stdout.readline().strip() == "subscribed"
    peer.publish("own/theirs", b"from the peer", qos=1)
    peer.publish("flag/as-published", b"a", qos=1, retain=True)
    peer.publish("flag/cleared", b"b", qos=1, retain=True)
    output, _ = process.communicate(timeout=30)
    peer.close()
    assert process.returncode == 0, output
    assert output.strip().splitlines() == [
        "True",
        "[('flag/as-published', b'a', 1), ('flag/cleared', b'b', 0), ('own/theirs', b'from the peer', 0)]",
    ]


def test_subscription_options_need_mqtt5(micropython):
    output = micropython.run(
        """
        c = mqtt.Client("old")
        for options in ({"no_local": True}, {"retain_as_published": True}, {"retain_handling": 1}):
            try:
                c.subscribe("t", lambda *args: None, **options)
            except ValueError as e:
                print(e)
        try:
            mqtt.Client("new", protocol=mqtt.MQTTv5).subscribe("t", lambda *args: None, retain_handling=3)
        except ValueError as e:
            print(e)
        """
    )
    need = "no_local, retain_as_published, retain_handling and subscription_id need MQTTv5"
    assert output.strip().splitlines() == [need, need, need, "retain_handling must be 0, 1 or 2"]


@pytest.mark.parametrize("protocol", [4, 5], ids=["MQTT 3.1.1", "MQTT 5"])
def test_a_shared_subscription_delivers_to_its_callback(broker, micropython, protocol):
    """$share/GROUP/FILTER: the broker sends each message to one member of
    the group; the member's callback gets it under its topic (mosquitto
    takes shared subscriptions from 3.1.1 clients too)."""
    peer = Peer(broker.port, client_id="share-peer")
    process = micropython.start(
        """
        got = []
        c = mqtt.Client("member", protocol=PROTOCOL)
        c.connect(HOST, 30, port=PORT)
        c.subscribe("$share/workers/jobs/+", lambda client, payload, topic: got.append((topic, payload)), qos=1)
        print("subscribed")
        print(wait_until(lambda: len(got) == 2, 10000), got)
        try:
            c.subscribe("$share/bad+group/jobs", lambda *args: None)
        except ValueError as e:
            print(e)
        c.disconnect()
        """,
        PORT=broker.port,
        PROTOCOL=protocol,
    )
    assert process.stdout.readline().strip() == "subscribed"
    peer.publish("jobs/1", b"first", qos=1)
    peer.publish("jobs/2", b"second", qos=1)
    output, _ = process.communicate(timeout=30)
    peer.close()
    assert process.returncode == 0, output
    assert output.strip().splitlines() == [
        "True [('jobs/1', b'first'), ('jobs/2', b'second')]",
        "invalid topic filter",
    ]


def test_a_will_carries_its_properties_and_waits_its_delay(broker, micropython):
    peer = Peer(broker.port, client_id="will-watcher", protocol=5)
    peer.subscribe("wills/#", qos=1)
    process = micropython.start(
        """
        c = mqtt.Client("leaver", protocol=mqtt.MQTTv5)
        c.set_will("wills/leaver", b"gone", qos=1, delay=2, expiry=600, content_type="text/plain",
                   response_topic="replies/leaver", correlation_data=b"\\x01\\x02", payload_format=1)
        c.connect(HOST, KEEPALIVE, port=PORT)
        print("connected")
        time.sleep(60)
        """,
        PORT=broker.port,
        KEEPALIVE=KILLED_KEEPALIVE,
    )
    expect_line(process, "connected")
    process.kill()
    process.communicate()
    lost_at = time.monotonic()
    # The broker holds the will back for its delay (2 s) once it knows the
    # link is gone (at once, or after 1.5 keepalives on lwIP).
    assert peer.wait_for(1, timeout=1.5) == []
    (will,) = peer.wait_for(1, timeout=15)
    assert time.monotonic() - lost_at >= 1.5
    properties = will.properties
    assert (will.topic, will.payload, will.qos) == ("wills/leaver", b"gone", 1)
    assert properties.ContentType == "text/plain"
    assert properties.ResponseTopic == "replies/leaver"
    assert properties.CorrelationData == b"\x01\x02"
    assert properties.PayloadFormatIndicator == 1
    assert 0 < properties.MessageExpiryInterval <= 600
    peer.close()


def test_will_properties_are_checked(micropython):
    output = micropython.run(
        """
        old = mqtt.Client("old")
        new = mqtt.Client("new", protocol=mqtt.MQTTv5)
        for client, options in ((old, {"delay": 5}), (new, {"payload_format": 2}),
                                (new, {"response_topic": "a/#"}), (new, {"expiry": -1}),
                                (new, {"content_type": 7})):
            try:
                client.set_will("w", "x", **options)
                print("accepted: WRONG")
            except (TypeError, ValueError) as e:
                print(type(e).__name__)
        """
    )
    assert output.strip().splitlines() == ["ValueError", "ValueError", "ValueError", "ValueError", "TypeError"]


def string(text):
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


# Every property a broker may put in CONNACK, each with a valid value.
CONNACK_PROPERTIES = {
    "session expiry": bytes([0x11, 0, 0, 0, 60]),
    "receive maximum": bytes([0x21, 0, 10]),
    "maximum QoS": bytes([0x24, 1]),
    "retain available": bytes([0x25, 0]),
    "maximum packet size": bytes([0x27, 0, 0, 4, 0]),
    "assigned client identifier": bytes([0x12]) + string("given-id"),
    "topic alias maximum": bytes([0x22, 0, 5]),
    "reason string": bytes([0x1F]) + string("welcome"),
    "user property": bytes([0x26]) + string("k") + string("v"),
    "wildcard subscription available": bytes([0x28, 1]),
    "subscription identifiers available": bytes([0x29, 0]),
    "shared subscription available": bytes([0x2A, 1]),
    "server keep alive": bytes([0x13, 0, 20]),
    "response information": bytes([0x1A]) + string("replies/"),
    "server reference": bytes([0x1C]) + string("other.example"),
    "authentication method": bytes([0x15]) + string("none"),
    "authentication data": bytes([0x16]) + string(b"\x00\x01"),
}

# CONNACK property blocks that break a rule, and the rule.
MALFORMED_CONNACK = {
    "unknown identifier": (bytes([0x7E, 0]), "invalid property"),
    "a PUBLISH property": (bytes([0x23, 0, 1]), "invalid property"),
    "repeated": (bytes([0x24, 1, 0x24, 1]), "invalid property"),
    "maximum QoS 2": (bytes([0x24, 2]), "invalid property"),
    "receive maximum 0": (bytes([0x21, 0, 0]), "invalid property"),
    "maximum packet size 0": (bytes([0x27, 0, 0, 0, 0]), "invalid property"),
    "reason string not UTF-8": (bytes([0x1F]) + string(b"\xff"), "bad UTF-8 or U+0000"),
    "string past the block": (bytes([0x1F, 0, 9, 0x41]), "lengths do not add up"),
}


def connack_script(properties, seen):
    def script(connection):
        assert connection.read().kind == CONNECT
        block = bytes([len(properties)]) + properties
        connection.send(bytes([0x20, 2 + len(block), 0, 0]) + block)
        try:
            seen.append(connection.read().kind)
        except EOFError:
            seen.append(None)

    return script


@pytest.mark.parametrize("name", sorted(CONNACK_PROPERTIES))
def test_every_connack_property_is_taken(micropython, name):
    seen = []
    scripted = ScriptedBroker([connack_script(CONNACK_PROPERTIES[name], seen)])
    try:
        output = micropython.run(
            """
            c = mqtt.Client("", protocol=mqtt.MQTTv5)
            c.connect(HOST, 30, port=PORT, start_loop=False)
            print(c.connected(), c.assigned_client_id())
            c.disconnect()
            """,
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert scripted.errors == []
    assigned = "given-id" if name == "assigned client identifier" else "None"
    assert output.strip() == f"True {assigned}"
    # The client ended the link as it should: with DISCONNECT.
    assert seen == [14]


@pytest.mark.parametrize("name", sorted(MALFORMED_CONNACK))
def test_a_malformed_connack_property_fails_the_connection(micropython, name):
    properties, rule = MALFORMED_CONNACK[name]
    seen = []
    scripted = ScriptedBroker([connack_script(properties, seen)])
    try:
        output = micropython.run(
            """
            c = mqtt.Client("strict", protocol=mqtt.MQTTv5, command_timeout=5000)
            try:
                c.connect(HOST, 30, port=PORT, start_loop=False)
                print("connected: WRONG")
            except mqtt.MQTTException as e:
                print(e.args[0] == mqtt.PROTOCOL_ERROR, e.args[1])
            print(c.connected())
            """,
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert scripted.errors == []
    assert output.strip().splitlines() == [f"True protocol error: {rule}", "False"]
    # The client closed the link without a word more.
    assert seen == [None]


# Every property a broker may put in a PUBLISH (Topic Alias aside: the
# client allows none), each with a valid value, the repeatable ones twice.
PUBLISH_PROPERTIES = (
    bytes([0x01, 1])
    + bytes([0x02, 0, 0, 0, 30])
    + bytes([0x03]) + string("text/plain")
    + bytes([0x08]) + string("replies/x")
    + bytes([0x09]) + string(b"\x00\xff")
    + bytes([0x26]) + string("k") + string("v")
    + bytes([0x26]) + string("k") + string("w")
    + bytes([0x0B, 0x80, 0x01])
    + bytes([0x0B, 7])
)

MALFORMED_PUBLISH = {
    "topic alias the client never allowed": bytes([0x23, 0, 1]),
    "subscription identifier 0": bytes([0x0B, 0]),
    "payload format 2": bytes([0x01, 2]),
    "content type twice": bytes([0x03]) + string("a") + bytes([0x03]) + string("b"),
    "a CONNACK property": bytes([0x21, 0, 1]),
}


def subscribed_script(publish_properties, seen):
    """CONNACK, a SUBACK with a reason string and a user property, then a
    QoS 1 PUBLISH with `publish_properties`; records what the client sends."""

    def script(connection):
        assert connection.read().kind == CONNECT
        connection.send(bytes([0x20, 3, 0, 0, 0]))
        subscribe = connection.read()
        packet_id = subscribe.body[:2]
        suback_properties = bytes([0x1F]) + string("ok") + bytes([0x26]) + string("a") + string("b")
        body = packet_id + bytes([len(suback_properties)]) + suback_properties + bytes([1])
        connection.send(bytes([0x90, len(body)]) + body)
        body = string("t/1") + bytes([0, 9, len(publish_properties)]) + publish_properties + b"payload"
        connection.send(bytes([0x32, len(body)]) + body)
        while True:
            try:
                packet = connection.read()
            except EOFError:
                seen.append(None)
                return
            seen.append((packet.kind, packet.body))

    return script


def test_every_publish_property_is_read_past(micropython):
    seen = []
    scripted = ScriptedBroker([subscribed_script(PUBLISH_PROPERTIES, seen)])
    try:
        output = micropython.run(
            """
            got = []
            c = mqtt.Client("reader", protocol=mqtt.MQTTv5)
            c.connect(HOST, 30, port=PORT)
            print(c.subscribe("t/+", lambda client, payload, topic: got.append((topic, payload)), qos=1))
            print(wait_until(lambda: got, 5000), got)
            c.disconnect()
            """,
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert scripted.errors == []
    assert output.strip().splitlines() == ["1", "True [('t/1', b'payload')]"]
    # PUBACK for packet id 9 (the short form), then DISCONNECT.
    assert seen == [(4, b"\x00\x09"), (14, b""), None]


@pytest.mark.parametrize("name", sorted(MALFORMED_PUBLISH))
def test_a_malformed_publish_property_fails_the_link(micropython, name):
    seen = []
    scripted = ScriptedBroker([subscribed_script(MALFORMED_PUBLISH[name], seen)])
    try:
        output = micropython.run(
            """
            got, failures = [], []
            def failed(client):
                failures.append(1)
                return mqtt.BREAK_LOOP
            c = mqtt.Client("reader", protocol=mqtt.MQTTv5)
            c.connect(HOST, 30, port=PORT, loop_failure=failed)
            c.subscribe("t/+", lambda client, payload, topic: got.append(payload), qos=1)
            print(wait_until(lambda: failures, 5000), got, c.connected())
            """,
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert scripted.errors == []
    assert output.strip() == "True [] False"
    # Nothing acknowledged: the link closed.
    assert seen == [None]


def test_publish_properties_reach_an_mqtt5_peer(broker, micropython):
    peer = Peer(broker.port, client_id="properties-watcher", protocol=5)
    peer.subscribe("requests/#", qos=2)
    micropython.run(
        """
        c = mqtt.Client("requester", protocol=mqtt.MQTTv5)
        c.connect(HOST, 30, port=PORT)
        for qos in (0, 1, 2):
            c.publish("requests/%d" % qos, "é %d" % qos, qos=qos, message_expiry=600, content_type="text/plain",
                      response_topic="replies/requester", correlation_data=bytes([qos, 255]), payload_format=1,
                      user_properties=[("trace", "a"), ("trace", "b"), ("qos", str(qos))])
        # A dict gives its pairs; a message without properties has none.
        c.publish("requests/dict", b"d", qos=1, user_properties={"k": "v"})
        c.publish("requests/bare", b"b", qos=1)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    messages = {message.topic: message for message in peer.wait_for(5)}
    assert sorted(messages) == ["requests/0", "requests/1", "requests/2", "requests/bare", "requests/dict"]
    for qos in (0, 1, 2):
        message = messages[f"requests/{qos}"]
        properties = message.properties
        assert (message.payload, message.qos) == (f"é {qos}".encode(), qos)
        assert 0 < properties.MessageExpiryInterval <= 600
        assert properties.ContentType == "text/plain"
        assert properties.ResponseTopic == "replies/requester"
        assert properties.CorrelationData == bytes([qos, 255])
        assert properties.PayloadFormatIndicator == 1
        # Names may repeat, and the order is kept.
        assert properties.UserProperty == [("trace", "a"), ("trace", "b"), ("qos", str(qos))]
    assert messages["requests/dict"].properties.UserProperty == [("k", "v")]
    assert not hasattr(messages["requests/bare"].properties, "UserProperty")
    assert not hasattr(messages["requests/bare"].properties, "ContentType")
    peer.close()


def test_a_publish_in_flight_goes_again_with_its_properties_after_a_reconnect(micropython):
    seen = []

    def first(connection):
        assert connection.read().kind == CONNECT
        connection.send(bytes([0x20, 3, 0, 0, 0]))
        publish = connection.read()
        seen.append(publish)
        # No PUBACK: the link ends with the publish in flight.

    def second(connection):
        assert connection.read().kind == CONNECT
        connection.send(bytes([0x20, 3, 1, 0, 0]))
        publish = connection.read()
        seen.append(publish)
        connection.ack(4, publish.publish_fields()[1])
        try:
            connection.read()
        except EOFError:
            pass

    scripted = ScriptedBroker([first, second])
    try:
        output = micropython.run(
            """
            c = mqtt.Client("resender", clean_session=False, protocol=mqtt.MQTTv5)
            c.connect(HOST, 30, port=PORT, auto_reconnect=(100, 1000))
            c.publish("orders/1", b"order", qos=1, message_expiry=60, correlation_data=b"id-1",
                      user_properties=[("shop", "north")])
            print("acknowledged")
            c.disconnect()
            """,
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert scripted.errors == []
    assert output.strip() == "acknowledged"
    original, again = seen
    assert (original.dup, again.dup) == (False, True)
    assert original.body == again.body
    topic_len = int.from_bytes(again.body[:2], "big")
    properties, used = Properties(PacketTypes.PUBLISH).unpack(again.body[2 + topic_len + 2 :])
    assert properties.MessageExpiryInterval == 60
    assert properties.CorrelationData == b"id-1"
    assert properties.UserProperty == [("shop", "north")]
    assert again.body[2 + topic_len + 2 + used :] == b"order"


def test_connect_carries_its_user_properties(micropython):
    seen = []

    def script(connection):
        connect = connection.read()
        seen.append(connect.body)
        connection.send(bytes([0x20, 3, 0, 0, 0]))
        try:
            connection.read()
        except EOFError:
            pass

    scripted = ScriptedBroker([script])
    try:
        micropython.run(
            """
            c = mqtt.Client("labelled", protocol=mqtt.MQTTv5)
            c.set_will("wills/labelled", b"gone", user_properties=[("why", "lost")])
            c.connect(HOST, 30, port=PORT, user_properties={"firmware": "1.2"})
            c.disconnect()
            """,
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert scripted.errors == []
    body = seen[0]
    properties, used = Properties(PacketTypes.CONNECT).unpack(body[10:])
    assert properties.UserProperty == [("firmware", "1.2")]
    rest = body[10 + used :]
    rest = rest[2 + int.from_bytes(rest[:2], "big") :]  # the client id
    will_properties, _ = Properties(PacketTypes.WILLMESSAGE).unpack(rest)
    assert will_properties.UserProperty == [("why", "lost")]


def test_message_properties_are_checked_and_the_client_stays_usable(broker, micropython):
    peer = Peer(broker.port, client_id="checker", protocol=5)
    peer.subscribe("checked", qos=1)
    output = micropython.run(
        """
        old = mqtt.Client("old")
        old.connect(HOST, 30, port=PORT)
        c = mqtt.Client("new", protocol=mqtt.MQTTv5)
        c.connect(HOST, 30, port=PORT)
        for client, options in ((old, {"message_expiry": 5}), (old, {"user_properties": [("a", "b")]}),
                                (c, {"payload_format": 1, "payload": b"\\xff"}), (c, {"payload_format": 3}),
                                (c, {"response_topic": "a/+"}), (c, {"message_expiry": -1}),
                                (c, {"user_properties": [("a",)]}), (c, {"user_properties": [("a", 1)]}),
                                (c, {"user_properties": 5}), (c, {"content_type": b"bytes"})):
            arguments = {"payload": b"x", "qos": 1}
            arguments.update(options)
            try:
                client.publish("checked", **arguments)
                print("accepted: WRONG")
            except (TypeError, ValueError) as e:
                print(type(e).__name__)
        for client, options in ((old, {"user_properties": {"a": "b"}}), (c, {"user_properties": [1]})):
            try:
                client.connect(HOST, 30, port=PORT, **options)
                print("accepted: WRONG")
            except (TypeError, ValueError) as e:
                print(type(e).__name__)
        c.publish("checked", "fine", qos=1, payload_format=1)
        print(c.connected(), old.connected())
        c.disconnect()
        old.disconnect()
        """,
        PORT=broker.port,
    )
    assert output.strip().splitlines() == [
        "ValueError",
        "ValueError",
        "ValueError",
        "ValueError",
        "ValueError",
        "ValueError",
        "ValueError",
        "TypeError",
        "TypeError",
        "TypeError",
        "ValueError",
        "TypeError",
        "True True",
    ]
    (message,) = peer.wait_for(1)
    assert (message.payload, message.properties.PayloadFormatIndicator) == (b"fine", 1)
    peer.close()


def test_a_callback_reads_its_messages_properties_and_answers_a_request(broker, micropython):
    """Request/response: the peer asks with a response topic and
    correlation data; the device's callback reads them with
    message_properties() and answers where it was told."""
    peer = Peer(broker.port, client_id="asker", protocol=5)
    peer.subscribe("answers/asker", qos=1)
    process = micropython.start(
        """
        seen = []
        def on_request(client, payload, topic):
            properties = client.message_properties()
            seen.append(properties)
            if "response_topic" in properties:
                client.publish(properties["response_topic"], b"answer to " + payload, qos=1,
                               correlation_data=properties["correlation_data"])
        c = mqtt.Client("answerer", protocol=mqtt.MQTTv5)
        c.connect(HOST, 30, port=PORT)
        print(c.subscribe("requests/#", on_request, qos=1), c.message_properties())
        print(wait_until(lambda: len(seen) == 2, 10000))
        for properties in seen:
            users = properties.pop("user_properties", None)
            # Compared here: MicroPython's repr escapes non-ASCII text.
            print(sorted(properties.items()), users == [("a", "1"), ("a", "2"), ("é", "ü")])
        print(c.message_properties())
        c.disconnect()
        """,
        PORT=broker.port,
    )
    expect_line(process, "1 None")
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = "answers/asker"
    properties.CorrelationData = b"\x00req-7"
    properties.ContentType = "text/plain"
    properties.PayloadFormatIndicator = 1
    properties.MessageExpiryInterval = 3600
    properties.UserProperty = [("a", "1"), ("a", "2"), ("é", "ü")]
    peer.publish("requests/time", b"time?", qos=1, properties=properties)
    peer.publish("requests/bare", b"nothing", qos=1)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    lines = output.strip().splitlines()
    assert lines[0] == "True", output
    # The broker counts the expiry down: at most what was sent.
    match = re.fullmatch(
        r"\[\('content_type', 'text/plain'\), \('correlation_data', b'\\x00req-7'\), "
        r"\('message_expiry', (\d+)\), \('payload_format', 1\), \('response_topic', 'answers/asker'\)\] True",
        lines[1],
    )
    assert match and 3590 <= int(match.group(1)) <= 3600, output
    assert lines[2:] == ["[] False", "None"], output
    (answer,) = peer.wait_for(1)
    assert (answer.topic, answer.payload) == ("answers/asker", b"answer to time?")
    assert answer.properties.CorrelationData == b"\x00req-7"
    peer.close()


def test_messages_gives_the_properties_of_the_message_it_gave_last(broker, micropython):
    peer = Peer(broker.port, client_id="async-sender", protocol=5)
    process = micropython.start(
        """
        import asyncio
        async def main():
            c = mqtt.Client("async-reader", protocol=mqtt.MQTTv5)
            await c.aconnect(HOST, 30, port=PORT)
            await c.asubscribe("queued/#", qos=1)
            print("subscribed", c.message_properties())
            got = []
            async for topic, payload in c.messages():
                got.append((topic, c.message_properties()))
                if len(got) == 2:
                    break
            for entry in got:
                print(entry)
            await c.adisconnect()
        asyncio.run(main())
        """,
        PORT=broker.port,
    )
    expect_line(process, "subscribed None")
    properties = Properties(PacketTypes.PUBLISH)
    properties.UserProperty = [("k", "v")]
    peer.publish("queued/1", b"one", qos=1, properties=properties)
    peer.publish("queued/2", b"two", qos=0)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert output.strip().splitlines() == [
        "('queued/1', {'user_properties': [('k', 'v')]})",
        "('queued/2', {})",
    ]
    peer.close()


def test_mqtt311_messages_have_no_properties(broker, micropython):
    peer = Peer(broker.port, client_id="plain-sender")
    process = micropython.start(
        """
        seen = []
        c = mqtt.Client("plain")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("plain", lambda client, payload, topic: seen.append(client.message_properties()))
        print("subscribed")
        print(wait_until(lambda: seen, 10000), seen)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    expect_line(process, "subscribed")
    peer.publish("plain", b"x")
    output, _ = process.communicate(timeout=30)
    assert output.strip() == "True [None]", output
    peer.close()


def test_subscription_identifiers_come_back_with_the_messages(broker, micropython):
    peer = Peer(broker.port, client_id="id-sender", protocol=5)
    process = micropython.start(
        """
        seen = []
        def recorder(name):
            def on_message(client, payload, topic):
                seen.append((name, topic, client.message_properties().get("subscription_ids")))
            return on_message
        c = mqtt.Client("identified", protocol=mqtt.MQTTv5)
        c.connect(HOST, 30, port=PORT)
        c.subscribe("ids/a", recorder("a"), subscription_id=7)
        c.subscribe("ids/+", recorder("plus"), subscription_id=268435455)
        c.subscribe("ids/#", recorder("hash"))
        print("subscribed")
        print(wait_until(lambda: len(seen) >= 8, 10000))
        time.sleep_ms(300)
        for entry in sorted(seen, key=repr):
            print(entry)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    expect_line(process, "subscribed")
    peer.publish("ids/a", b"1", qos=1)
    peer.publish("ids/b", b"2", qos=1)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    # mosquitto sends a copy per matching subscription, each with its
    # identifier: a subscription with one gets only its own copy; the one
    # without (ids/#) gets every copy its filter matches.
    assert output.strip().splitlines() == [
        "True",
        "('a', 'ids/a', [7])",
        "('hash', 'ids/a', None)",
        "('hash', 'ids/a', [268435455])",
        "('hash', 'ids/a', [7])",
        "('hash', 'ids/b', None)",
        "('hash', 'ids/b', [268435455])",
        "('plus', 'ids/a', [268435455])",
        "('plus', 'ids/b', [268435455])",
    ], output
    peer.close()


def test_subscription_identifiers_are_checked(micropython, broker):
    output = micropython.run(
        """
        old = mqtt.Client("old-ids")
        new = mqtt.Client("new-ids", protocol=mqtt.MQTTv5)
        new.connect(HOST, 30, port=PORT)
        for client, value in ((old, 1), (new, 0), (new, 268435456), (new, -1), (new, "1")):
            try:
                client.subscribe("x", print, subscription_id=value)
                print("accepted: WRONG")
            except (TypeError, ValueError) as e:
                print(type(e).__name__)
        print(new.subscribe("x", print, subscription_id=1), new.connected())
        new.disconnect()
        """,
        PORT=broker.port,
    )
    assert output.strip().splitlines() == ["ValueError", "ValueError", "ValueError", "ValueError", "TypeError", "0 True"]


def test_a_repeated_topic_goes_by_its_alias(micropython):
    """The broker takes two topic aliases (CONNACK): the client sets one
    with a topic's first publish and then sends the alias alone."""
    seen = []

    def script(connection):
        assert connection.read().kind == CONNECT
        connection.send(bytes([0x20, 6, 0, 0, 3, 0x22, 0, 2]))
        while True:
            try:
                packet = connection.read()
            except EOFError:
                return
            seen.append(packet)
            if packet.kind == 3 and packet.qos == 1:
                connection.ack(4, packet.publish_fields()[1])

    scripted = ScriptedBroker([script])
    try:
        micropython.run(
            """
            c = mqtt.Client("aliased", protocol=mqtt.MQTTv5)
            c.connect(HOST, 30, port=PORT)
            for topic in ("sensors/kitchen/temperature", "sensors/kitchen/temperature", "other"):
                c.publish(topic, b"21", qos=1)
            c.publish("sensors/kitchen/temperature", b"22")
            c.disconnect()
            """,
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert scripted.errors == []
    publishes = [packet for packet in seen if packet.kind == 3]
    named = []
    for packet in publishes:
        topic_len = int.from_bytes(packet.body[:2], "big")
        start = 2 + topic_len + (2 if packet.qos else 0)
        properties, _ = Properties(PacketTypes.PUBLISH).unpack(packet.body[start:])
        named.append((packet.body[2 : 2 + topic_len].decode(), properties.TopicAlias))
    assert named == [
        ("sensors/kitchen/temperature", 1),
        ("", 1),
        ("other", 2),
        ("", 1),
    ]


def test_messages_by_alias_reach_the_peer_under_their_topics(broker, micropython):
    peer = Peer(broker.port, client_id="alias-watcher", protocol=5)
    peer.subscribe("aliases/#", qos=1)
    micropython.run(
        """
        c = mqtt.Client("alias-sender", protocol=mqtt.MQTTv5)
        c.connect(HOST, 30, port=PORT)
        # mosquitto takes 10 aliases; the client sets 8 at most, then sets
        # them again in turn.
        for round in range(2):
            for n in range(10):
                c.publish("aliases/topic/number/%d" % n, b"%d-%d" % (round, n), qos=n % 3)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    messages = peer.wait_for(20)
    assert sorted((m.topic, m.payload) for m in messages) == sorted(
        (f"aliases/topic/number/{n}", f"{r}-{n}".encode()) for r in range(2) for n in range(10)
    )
    peer.close()


def alias_publish(topic, alias, payload, packet_id=None):
    """A PUBLISH from the broker naming its topic (empty: by the alias alone)
    and a Topic Alias (0: none)."""
    properties = bytes([3, 0x23, 0, alias]) if alias else b"\x00"
    body = string(topic) + (packet_id.to_bytes(2, "big") if packet_id else b"") + properties + payload
    first = 0x32 if packet_id else 0x30
    return bytes([first, len(body)]) + body


def test_the_brokers_topic_aliases_are_taken_when_asked_for(micropython):
    seen = []

    def script(connection):
        connect = connection.read()
        seen.append(connect.body)
        connection.send(bytes([0x20, 3, 0, 0, 0]))
        assert connection.read().kind == 8  # SUBSCRIBE
        connection.send(bytes([0x90, 4, 0, 1, 0, 1]))
        connection.send(alias_publish("a/long/topic", 1, b"1"))
        connection.send(alias_publish("", 1, b"2"))
        connection.send(alias_publish("a/other", 2, b"3", packet_id=7))
        connection.send(alias_publish("", 2, b"4"))
        connection.send(alias_publish("", 1, b"5"))
        connection.send(alias_publish("", 1, b"6"))
        while True:
            try:
                packet = connection.read()
            except EOFError:
                return
            seen.append((packet.kind, packet.body))

    scripted = ScriptedBroker([script])
    try:
        output = micropython.run(
            """
            got = []
            c = mqtt.Client("taker", protocol=mqtt.MQTTv5, topic_aliases=2)
            c.connect(HOST, 30, port=PORT)
            c.subscribe("a/#", lambda client, payload, topic: got.append((topic, payload)), qos=1)
            print(wait_until(lambda: len(got) == 6, 5000))
            for entry in got:
                print(entry)
            c.disconnect()
            """,
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert scripted.errors == []
    assert output.strip().splitlines() == [
        "True",
        "('a/long/topic', b'1')",
        "('a/long/topic', b'2')",
        "('a/other', b'3')",
        "('a/other', b'4')",
        "('a/long/topic', b'5')",
        "('a/long/topic', b'6')",
    ]
    properties, _ = Properties(PacketTypes.CONNECT).unpack(seen[0][10:])
    assert properties.TopicAliasMaximum == 2
    # The QoS 1 message by alias was acknowledged.
    assert (4, b"\x00\x07") in seen[1:]


def test_an_alias_the_broker_never_set_fails_the_link(micropython):
    def script(connection):
        assert connection.read().kind == CONNECT
        connection.send(bytes([0x20, 3, 0, 0, 0]))
        connection.send(alias_publish("", 2, b"lost"))
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
                failures.append(client.connected())
                return mqtt.BREAK_LOOP
            c = mqtt.Client("strict", protocol=mqtt.MQTTv5, topic_aliases=2)
            c.connect(HOST, 30, port=PORT, loop_failure=failed)
            print(wait_until(lambda: failures, 5000), failures)
            for bad in ({"topic_aliases": 17}, {"topic_aliases": -1}, {"topic_aliases": 1, "protocol": mqtt.MQTTv311}):
                try:
                    mqtt.Client("x", **dict({"protocol": mqtt.MQTTv5}, **bad))
                    print("accepted: WRONG")
                except ValueError:
                    print("ValueError")
            """,
            PORT=scripted.port,
        )
    finally:
        scripted.close()
    assert scripted.errors == []
    assert output.strip().splitlines() == ["True [False]", "ValueError", "ValueError", "ValueError"]
