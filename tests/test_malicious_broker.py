"""A broker that sends garbage: the firmware neither crashes nor hangs,
reports the failure through loop_failure (or ignores what is harmless),
and then works with a healthy broker."""

import pytest

from scripted_broker import CONNECT, ScriptedBroker

SUBSCRIBE = 8


def publish(topic, payload=b"", qos=0, packet_id=1, flags=None, topic_length=None):
    """A PUBLISH packet, with room to lie about its fields."""
    topic_length = len(topic) if topic_length is None else topic_length
    body = topic_length.to_bytes(2, "big") + topic + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    first = 0x30 | (qos << 1) if flags is None else 0x30 | flags
    return bytes([first]) + varint(len(body)) + body


def varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# name: (bytes the broker sends after CONNACK and SUBACK, what the firmware must report)
GARBAGE = {
    "remaining length in five bytes": (bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]), "failure"),
    "remaining length of 256 MB": (bytes([0x30, 0xFF, 0xFF, 0xFF, 0x7F]), "failure"),
    "packet type 0": (bytes([0x00, 0x00]), "failure"),
    "packet type 15": (bytes([0xF0, 0x00]), "failure"),
    "reserved flags on PUBACK": (bytes([0x41, 0x02, 0x00, 0x01]), "failure"),
    "PUBREL without its flags": (bytes([0x60, 0x02, 0x00, 0x01]), "failure"),
    "CONNACK with code 6": (bytes([0x20, 0x02, 0x00, 0x06]), "failure"),
    "second CONNACK": (bytes([0x20, 0x02, 0x00, 0x00]), "failure"),
    "PINGREQ from the broker": (bytes([0xC0, 0x00]), "failure"),
    "topic length past the packet": (publish(b"t", topic_length=200), "failure"),
    "topic not UTF-8": (publish(b"\xff\xfe"), "failure"),
    "NUL in the topic": (publish(b"a\x00b"), "failure"),
    "wildcard in the topic": (publish(b"a/#"), "failure"),
    "empty topic": (publish(b""), "failure"),
    "QoS 3": (publish(b"t", flags=0b0110), "failure"),
    "DUP on QoS 0": (publish(b"t", flags=0b1000), "failure"),
    "packet id 0": (publish(b"t", qos=1, packet_id=0), "failure"),
    "SUBACK for an unknown id": (bytes([0x90, 0x03, 0x12, 0x34, 0x00]), "ignored"),
    "PUBACK for an unknown id": (bytes([0x40, 0x02, 0x12, 0x34]), "ignored"),
    "PUBREC for an unknown id": (bytes([0x50, 0x02, 0x12, 0x34]), "ignored"),
    "PUBCOMP for an unknown id": (bytes([0x70, 0x02, 0x12, 0x34]), "ignored"),
    "UNSUBACK for an unknown id": (bytes([0xB0, 0x02, 0x12, 0x34]), "ignored"),
    "a SUBACK larger than max_packet_size": (bytes([0x90, 0xA0, 0x27]) + bytes(5024), "failure"),
    "truncated packet, then close": (publish(b"t", b"x" * 100)[:20], "failure"),
}


def hostile(garbage, then_close=False, suback_codes=b"\x00"):
    def script(connection):
        assert connection.read().kind == CONNECT
        connection.connack()
        subscribe = connection.read_until(SUBSCRIBE)
        connection.send(bytes([0x90, 2 + len(suback_codes)]) + subscribe.body[:2] + suback_codes)
        connection.send(garbage)
        if then_close:
            return
        # Keep the link open until the client gives up on it.
        try:
            while True:
                connection.read()
        except EOFError:
            pass

    return script


@pytest.mark.parametrize("name", list(GARBAGE) + ["SUBACK with two codes"])
def test_garbage_from_the_broker(name, broker, micropython):
    if name == "SUBACK with two codes":
        garbage, expected = b"", "failure"
        scripted = ScriptedBroker([hostile(b"", suback_codes=b"\x00\x00")])
    else:
        garbage, expected = GARBAGE[name]
        scripted = ScriptedBroker([hostile(garbage, then_close=name.startswith("truncated"))])
    try:
        output = micropython.run(
            """
            failures = []
            got = []
            def failed(client):
                failures.append(client.connected())
                return mqtt.BREAK_LOOP
            c = mqtt.Client("victim", command_timeout=2000, max_packet_size=4096)
            c.connect(HOST, 30, port=HOSTILE, loop_failure=failed)
            try:
                c.subscribe("t", lambda client, payload, topic: got.append(payload))
            except OSError as e:
                # The loop's thread found the bad packet and closed the link.
                print("subscribe:", "link lost" if e.errno == 107 else e)
            except mqtt.MQTTException as e:
                # Without a thread, subscribe's own cycle found it.
                print("subscribe:", "link lost" if e.args[0] == mqtt.PROTOCOL_ERROR else e)
            reported = wait_until(lambda: failures, 3000)
            print("failure" if reported else "ignored", c.connected(), got)
            c.disconnect()
            # The same client then works with a healthy broker.
            c.connect(HOST, 30, port=HEALTHY)
            c.subscribe("t", lambda client, payload, topic: got.append(payload), qos=1)
            c.publish("t", "healthy", qos=1)
            print(wait_until(lambda: got), got)
            c.disconnect()
            """,
            HOSTILE=scripted.port,
            HEALTHY=broker.port,
            timeout=30,
        )
    finally:
        scripted.close()
    lines = [line for line in output.strip().splitlines() if not line.startswith("subscribe:")]
    if name == "SUBACK with two codes":
        assert "subscribe: link lost" in output, output
    if expected == "failure":
        assert lines[0] == "failure False []", output
    else:
        assert lines[0] == "ignored True []", output
    assert lines[1] == "True [b'healthy']", output


def test_byte_at_a_time_stream_is_read_whole(micropython):
    message = publish(b"slow/topic", b"patience", qos=1, packet_id=7)

    def dribbling(connection):
        assert connection.read().kind == CONNECT
        connection.connack()
        subscribe = connection.read_until(SUBSCRIBE)
        connection.send(bytes([0x90, 0x03]) + subscribe.body[:2] + b"\x01")
        import time

        for byte in message:
            connection.send(bytes([byte]))
            time.sleep(0.02)
        puback = connection.read_until(4)
        assert puback.packet_id() == 7
        connection.read_until(14)

    scripted = ScriptedBroker([dribbling])
    try:
        output = micropython.run(
            """
            got = []
            c = mqtt.Client("patient", command_timeout=3000)
            c.connect(HOST, 30, port=PORT)
            c.subscribe("slow/#", lambda client, payload, topic: got.append((topic, payload)), qos=1)
            print(wait_until(lambda: got, 5000), got)
            c.disconnect()
            """,
            PORT=scripted.port,
            timeout=30,
        )
    finally:
        scripted.close()
    assert scripted.errors == []
    assert output.strip() == "True [('slow/topic', b'patience')]"


def test_publish_flood_faster_than_callbacks(micropython):
    count = 3000

    def flooding(connection):
        assert connection.read().kind == CONNECT
        connection.connack()
        subscribe = connection.read_until(SUBSCRIBE)
        connection.send(bytes([0x90, 0x03]) + subscribe.body[:2] + b"\x00")
        connection.send(b"".join(publish(b"flood", b"%d" % i) for i in range(count)))
        connection.read_until(14)

    scripted = ScriptedBroker([flooding])
    try:
        output = micropython.run(
            """
            import gc
            state = {"next": 0, "in_order": True}
            def slow(client, payload, topic):
                state["in_order"] = state["in_order"] and int(payload) == state["next"]
                state["next"] += 1
                time.sleep_ms(1)
            c = mqtt.Client("flooded")
            c.connect(HOST, 30, port=PORT)
            gc.collect(); before = gc.mem_alloc()
            c.subscribe("flood", slow)
            wait_until(lambda: state["next"] == COUNT, 30000)
            gc.collect()
            # The flood waits in the socket, not in the heap.
            print(state["next"] == COUNT and state["in_order"], gc.mem_alloc() - before < 1024)
            c.disconnect()
            """,
            PORT=scripted.port,
            COUNT=count,
            timeout=60,
        )
    finally:
        scripted.close()
    assert output.strip() == "True True", output


# name: (bytes the broker sends after SUBACK, the rule the exception names)
BROKEN_RULES = {
    "remaining length in five bytes": (bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]), "remaining length over 4 bytes"),
    "packet type 15": (bytes([0xF0, 0x00]), "packet type 0 or 15"),
    "reserved flags on PUBACK": (bytes([0x41, 0x02, 0x00, 0x01]), "reserved flag bits set"),
    "QoS 3": (publish(b"t", flags=0b0110), "invalid QoS"),
    "topic length past the packet": (publish(b"t", topic_length=200), "lengths do not add up"),
    "topic not UTF-8": (publish(b"\xff\xfe"), "invalid topic name"),
    "wildcard in the topic": (publish(b"a/#"), "invalid topic name"),
    "packet id 0": (publish(b"t", qos=1, packet_id=0), "packet id 0"),
    "CONNACK with code 6": (bytes([0x20, 0x02, 0x00, 0x06]), "undefined return code"),
    "PINGREQ from the broker": (bytes([0xC0, 0x00]), "packet not allowed now"),
}


@pytest.mark.parametrize("name", list(BROKEN_RULES))
def test_a_protocol_error_names_the_broken_rule(name, micropython):
    garbage, rule = BROKEN_RULES[name]
    scripted = ScriptedBroker([hostile(garbage)])
    try:
        output = micropython.run(
            """
            c = mqtt.Client("victim", command_timeout=2000, max_packet_size=4096)
            c.connect(HOST, 30, port=HOSTILE, start_loop=False)
            def first_failure():
                try:
                    # The garbage may come in the same read as the SUBACK.
                    c.subscribe("t", lambda client, payload, topic: None)
                    for _ in range(50):
                        c.cycle()
                except mqtt.MQTTException as e:
                    return e
            e = first_failure()
            print(e is not None and e.args[0] == mqtt.PROTOCOL_ERROR, c.connected())
            print(e.args[1])
            """,
            HOSTILE=scripted.port,
            timeout=30,
        )
    finally:
        scripted.close()
    lines = output.strip().splitlines()
    assert lines == ["True False", "protocol error: " + rule], output
