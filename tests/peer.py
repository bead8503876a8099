"""An independent MQTT peer (paho-mqtt on CPython) to check what the
firmware really sent and to publish to it."""

import threading
import time

import paho.mqtt.client as paho

from broker import HOST


class Peer:
    """Connected (CONNACK received) when the constructor returns."""

    def __init__(self, port, client_id="peer", clean_session=True, protocol=4):
        """`protocol` 5 speaks MQTT 5 (clean_session is then Clean Start)."""
        self.messages = []
        self.arrived = threading.Condition()
        if protocol == 5:
            self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        else:
            self.client = paho.Client(
                paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session
            )
        self.client.on_message = self._on_message
        connack = []
        connected = threading.Event()

        def on_connect(client, userdata, flags, reason_code, properties):
            connack.append(reason_code)
            connected.set()

        self.client.on_connect = on_connect
        if protocol == 5:
            self.client.connect(HOST, port, clean_start=clean_session)
        else:
            self.client.connect(HOST, port)
        self.client.loop_start()
        # paho's connect() returns once CONNECT is sent: a test that relies
        # on the peer's session (a message queued for it, its will) must not
        # go on before the broker has answered.
        if not connected.wait(10) or connack[0].is_failure:
            self.client.loop_stop()
            raise AssertionError(f"peer {client_id} not connected: {connack}")

    def _on_message(self, client, userdata, message):
        with self.arrived:
            self.messages.append(message)
            self.arrived.notify_all()

    def subscribe(self, topic, qos=0):
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic, qos)
        assert done.wait(5), "peer subscription not acknowledged"

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(10)

    def wait_for(self, count, timeout=10):
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.arrived.wait(left)
            return list(self.messages)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()
