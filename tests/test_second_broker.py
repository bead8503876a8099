"""MQTT 5 against rumqttd, the second broker (see rumqttd.py), with a
paho-mqtt MQTT 5 peer: what mosquitto's tests (test_mqtt5.py) check of
any broker, here against an implementation of its own. rumqttd 0.20
leaves some of MQTT 5 out (it ignores No Local and Retain Handling, and
delivers every message at the subscription's QoS, and closes a refused
connection without a CONNACK): those are tested against mosquitto only."""

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import expect_line
from peer import Peer


def test_messages_and_their_properties_go_both_ways(rumqttd, micropython):
    peer = Peer(rumqttd.port, client_id="second-peer", protocol=5)
    peer.subscribe("to-peer/#", qos=2)
    process = micropython.start(
        """
        got = []
        def on_message(client, payload, topic):
            properties = client.message_properties()
            users = properties.pop("user_properties", None)
            got.append((topic, payload, sorted(properties.items()), users == [("é", "1"), ("é", "2")]))
        c = mqtt.Client("second-device", protocol=mqtt.MQTTv5)
        c.connect(HOST, 30, port=PORT, user_properties={"firmware": "1"})
        print(c.subscribe("to-device/#", on_message, qos=2))
        for qos in (0, 1, 2):
            c.publish("to-peer/%d" % qos, b"out %d" % qos, qos=qos, message_expiry=600, content_type="text/plain",
                      response_topic="to-device/answers", correlation_data=bytes([qos]), payload_format=1,
                      user_properties=[("n", str(qos)), ("n", "again")])
        print("published")
        print(wait_until(lambda: len(got) == 3, 10000))
        for entry in sorted(got):
            print(entry)
        c.disconnect()
        """,
        PORT=rumqttd.port,
    )
    expect_line(process, "2")
    expect_line(process, "published")
    messages = {message.topic: message for message in peer.wait_for(3)}
    for qos in (0, 1, 2):
        message = messages[f"to-peer/{qos}"]
        properties = message.properties
        # rumqttd 0.20 delivers at the subscription's QoS (2), not at the
        # message's: the QoS a message keeps is checked against mosquitto.
        assert message.payload == f"out {qos}".encode()
        assert 0 < properties.MessageExpiryInterval <= 600
        assert properties.ContentType == "text/plain"
        assert properties.ResponseTopic == "to-device/answers"
        assert properties.CorrelationData == bytes([qos])
        assert properties.PayloadFormatIndicator == 1
        assert properties.UserProperty == [("n", str(qos)), ("n", "again")]
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = "to-peer/answer"
    properties.CorrelationData = b"\x01\x02"
    properties.UserProperty = [("é", "1"), ("é", "2")]
    for qos in (0, 1, 2):
        peer.publish(f"to-device/{qos}", f"in {qos}".encode(), qos=qos, properties=properties)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    lines = output.strip().splitlines()
    assert lines[0] == "True", output
    for qos, line in enumerate(lines[1:]):
        assert line == (
            f"('to-device/{qos}', b'in {qos}', [('correlation_data', b'\\x01\\x02'), "
            "('response_topic', 'to-peer/answer')], True)"
        ), output
    peer.close()


def test_an_assigned_client_identifier(rumqttd, micropython):
    output = micropython.run(
        """
        c = mqtt.Client("", protocol=mqtt.MQTTv5)
        print(c.assigned_client_id())
        c.connect(HOST, 30, port=PORT)
        assigned = c.assigned_client_id()
        print(type(assigned).__name__, len(assigned) > 0)
        c.disconnect()
        """,
        PORT=rumqttd.port,
    )
    assert output.strip().splitlines() == ["None", "str True"]


def test_subscription_identifiers_and_shared_subscriptions(rumqttd, micropython):
    peer = Peer(rumqttd.port, client_id="second-sender", protocol=5)
    process = micropython.start(
        """
        seen = []
        def recorder(name):
            def on_message(client, payload, topic):
                seen.append((name, topic, payload, client.message_properties().get("subscription_ids")))
            return on_message
        c = mqtt.Client("second-subscriber", protocol=mqtt.MQTTv5)
        c.connect(HOST, 30, port=PORT)
        c.subscribe("ids/#", recorder("identified"), qos=1, subscription_id=42)
        c.subscribe("$share/group/shared/#", recorder("shared"), qos=1)
        print("subscribed")
        print(wait_until(lambda: len(seen) == 2, 10000))
        for entry in sorted(seen):
            print(entry)
        c.disconnect()
        """,
        PORT=rumqttd.port,
    )
    expect_line(process, "subscribed")
    peer.publish("ids/1", b"with id", qos=1)
    peer.publish("shared/1", b"to the group", qos=1)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert output.strip().splitlines() == [
        "True",
        "('identified', 'ids/1', b'with id', [42])",
        "('shared', 'shared/1', b'to the group', None)",
    ], output
    peer.close()

