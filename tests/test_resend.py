"""What goes over the wire when a link dies with QoS 1/2 messages in flight:
after the reconnect they go again with DUP set and their packet ids, and a
QoS 2 flow that got its PUBREC continues with PUBREL."""

from scripted_broker import CONNECT, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, ScriptedBroker

RECONNECTING = """
        def recover(client):
            for attempt in range(50):
                try:
                    if client.reconnect() == 0:
                        return mqtt.RECOVERED
                except OSError:
                    pass
                time.sleep_ms(50)
"""


def run_publish(micropython, broker, qos):
    return micropython.run(
        RECONNECTING
        + """
        c = mqtt.Client("resender", clean_session=False, command_timeout=5000)
        c.connect(HOST, 30, port=PORT, loop_failure=recover)
        c.publish("in/flight", b"precious", qos=QOS)
        print("acknowledged", c.connected())
        c.disconnect()
        """,
        PORT=broker.port,
        QOS=qos,
        timeout=30,
    )


def test_qos1_message_goes_again_with_dup_and_its_packet_id(micropython):
    seen = []

    def first_link(connection):
        assert connection.read().kind == CONNECT
        connection.connack()
        publish = connection.read_until(PUBLISH)
        seen.append(("first", publish.dup, publish.publish_fields()))
        # Close without PUBACK.

    def second_link(connection):
        connect = connection.read()
        assert connect.kind == CONNECT
        connection.connack(session_present=True)
        publish = connection.read_until(PUBLISH)
        topic, packet_id, payload = publish.publish_fields()
        seen.append(("second", publish.dup, (topic, packet_id, payload)))
        connection.ack(PUBACK, packet_id)
        connection.read_until(14)  # DISCONNECT

    broker = ScriptedBroker([first_link, second_link])
    try:
        output = run_publish(micropython, broker, 1)
    finally:
        broker.close()
    assert broker.errors == []
    assert output.strip() == "acknowledged True"
    (first, first_dup, (topic, first_id, payload)), (second, second_dup, resent) = seen
    assert (first_dup, topic, payload) == (False, "in/flight", b"precious")
    assert second_dup is True
    assert resent == ("in/flight", first_id, b"precious")


def test_qos2_flow_continues_with_pubrel_after_the_reconnect(micropython):
    seen = []

    def first_link(connection):
        assert connection.read().kind == CONNECT
        connection.connack()
        publish = connection.read_until(PUBLISH)
        _, packet_id, _ = publish.publish_fields()
        seen.append(("publish", packet_id))
        connection.ack(PUBREC, packet_id)
        release = connection.read_until(PUBREL)
        seen.append(("pubrel", release.packet_id()))
        # Close without PUBCOMP.

    def second_link(connection):
        assert connection.read().kind == CONNECT
        connection.connack(session_present=True)
        packet = connection.read()
        while packet.kind == 12:
            packet = connection.read()
        # Not the PUBLISH again: its PUBREC arrived, so the release goes.
        seen.append(("after reconnect", packet.kind, packet.packet_id()))
        connection.ack(PUBCOMP, packet.packet_id())
        connection.read_until(14)

    broker = ScriptedBroker([first_link, second_link])
    try:
        output = run_publish(micropython, broker, 2)
    finally:
        broker.close()
    assert broker.errors == []
    assert output.strip() == "acknowledged True"
    packet_id = seen[0][1]
    assert seen == [("publish", packet_id), ("pubrel", packet_id), ("after reconnect", PUBREL, packet_id)]
