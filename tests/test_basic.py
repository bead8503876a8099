"""The firmware's `mqtt` module against a real mosquitto."""

import pytest

from peer import Peer


def test_round_trip_through_the_broker(broker, micropython):
    """Publish to our own subscription and receive it; an independent
    subscriber sees the same message."""
    peer = Peer(broker.port)
    peer.subscribe("demo/#")
    output = micropython.run(
        """
        import mqtt, time
        got = []
        c = mqtt.Client("fw1")
        c.connect(HOST, 30, port=PORT)
        c.subscribe("demo/echo", lambda client, payload, topic: got.append((client is c, payload, topic)))
        c.publish("demo/echo", "hello")
        t0 = time.ticks_ms()
        while not got and time.ticks_diff(time.ticks_ms(), t0) < 5000:
            time.sleep_ms(5)
        print(got)
        c.disconnect()
        """,
        PORT=broker.port,
    )
    assert "[(True, b'hello', 'demo/echo')]" in output
    messages = peer.wait_for(1)
    assert [(m.topic, m.payload) for m in messages] == [("demo/echo", b"hello")]
    peer.close()
