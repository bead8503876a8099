"""Timeouts against a broker of the tests' own that accepts the connection
and then stops answering, or stalls in the middle of a packet."""

import socket
import threading

import pytest

from broker import HOST

CONNACK = bytes([0x20, 2, 0, 0])


class MuteBroker:
    """Accepts one client on loopback, answers CONNECT with CONNACK, then
    sends `then` (if any) and swallows everything without answering."""

    def __init__(self, then=b""):
        self.then = then
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.received = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.listener.settimeout(30)
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(30)
            try:
                self.received += connection.recv(1024)
                connection.sendall(CONNACK + self.then)
                while True:
                    data = connection.recv(65536)
                    if not data:
                        return
                    self.received += data
            except OSError:
                return

    def close(self):
        self.listener.close()
        self.thread.join(timeout=5)


def test_unanswered_commands_time_out_and_the_client_stays_usable(micropython):
    broker = MuteBroker()
    try:
        output = micropython.run(
            """
            c = mqtt.Client("patient", command_timeout=700)
            c.connect(HOST, 0, port=PORT)
            for call in (lambda: c.publish("t", "x", qos=1), lambda: c.publish("t", "x", qos=2),
                         lambda: c.subscribe("t", print), lambda: c.unsubscribe("t")):
                start = time.ticks_ms()
                try:
                    call()
                    print("no exception")
                except mqtt.MQTTException as e:
                    elapsed = time.ticks_diff(time.ticks_ms(), start)
                    print(e.args[0] == mqtt.TIMEOUT, 600 <= elapsed < 2000)
            c.publish("t", "qos 0 still goes out")
            print(c.connected())
            c.disconnect()
            print(c.connected())
            """,
            PORT=broker.port,
            timeout=30,
        )
    finally:
        broker.close()
    assert output.split() == ["True", "True"] * 4 + ["True", "False"], output
    assert b"qos 0 still goes out" in broker.received


def test_connack_that_never_comes_times_out(micropython):
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(1)
    try:
        output = micropython.run(
            """
            c = mqtt.Client("waiting", command_timeout=500)
            start = time.ticks_ms()
            try:
                c.connect(HOST, 30, port=PORT)
            except OSError as e:
                print(e.errno == 110, time.ticks_diff(time.ticks_ms(), start) < 2000)
            print(c.connected())
            """,
            PORT=listener.getsockname()[1],
            timeout=30,
        )
    finally:
        listener.close()
    assert output.split() == ["True", "True", "False"], output


def test_packet_stalled_midway_fails_the_link_within_command_timeout(micropython):
    # The first bytes of a PUBLISH (type, remaining length 20, topic length),
    # then nothing more.
    broker = MuteBroker(then=bytes([0x30, 20, 0, 5, ord("a")]))
    try:
        output = micropython.run(
            """
            failures = []
            start = time.ticks_ms()
            def failed(client):
                failures.append(time.ticks_diff(time.ticks_ms(), start))
                return mqtt.BREAK_LOOP
            c = mqtt.Client("stalled", command_timeout=800)
            c.connect(HOST, 0, port=PORT, loop_failure=failed)
            print(wait_until(lambda: failures, 10000), c.connected())
            print(700 <= failures[0] < 3000)
            """,
            PORT=broker.port,
            timeout=30,
        )
    finally:
        broker.close()
    assert output.split() == ["True", "False", "True"], output


@pytest.mark.long
def test_silent_broker_is_detected_by_keepalive(micropython):
    broker = MuteBroker()
    try:
        output = micropython.run(
            """
            failures = []
            def failed(client):
                failures.append((time.ticks_ms(), client.connected()))
                return mqtt.BREAK_LOOP
            c = mqtt.Client("pinger")
            c.connect(HOST, 1, port=PORT, loop_failure=failed)
            connected = time.ticks_ms()
            print(wait_until(lambda: failures, 10000), failures[0][1])
            # Keepalive 1 s: PINGREQ after 1 s of quiet, dead after half a
            # period more (room for a loaded machine; a client that waited a
            # whole period for PINGRESP would take 2 s).
            print(time.ticks_diff(failures[0][0], connected) <= 1900)
            """,
            PORT=broker.port,
            timeout=30,
        )
    finally:
        broker.close()
    assert output.split() == ["True", "False", "True"], output
    assert bytes([0xC0, 0]) in broker.received


def test_a_packet_split_between_read_ahead_and_socket_costs_no_wait(micropython):
    """The engine reads 32 bytes ahead. Here a 30-byte PUBLISH and the
    PUBACK the client waits for arrive together, so the PUBACK is split:
    two bytes read ahead, two left in the stream. Once the PUBACK is
    handled, nothing more is waiting; a cycle that still believed its
    wait's "input ready" read on, and waited out command_timeout (then
    failed the link). Over a stream without a descriptor (a UART, a
    modem, here a stream written in Python), where the cycle's wait asks
    the stream even when it does not wait."""
    from scripted_broker import CONNECT, PUBLISH, ScriptedBroker

    # Fixed header, topic "t", packet id 9, 23 bytes of payload: 30 bytes.
    incoming = bytes([0x32, 28, 0, 1, ord("t"), 0, 9]) + b"p" * 23

    def splitting(connection):
        assert connection.read().kind == CONNECT
        connection.connack()
        published = connection.read_until(PUBLISH)
        _, packet_id, _ = published.publish_fields()
        connection.send(incoming + bytes([0x40, 2]) + packet_id.to_bytes(2, "big"))
        assert connection.read_until(4).packet_id() == 9
        connection.read_until(14)

    scripted = ScriptedBroker([splitting])
    try:
        output = micropython.run(
            """
            from relay import Relay
            relay = Relay(HOST, PORT)
            c = mqtt.Client("split", command_timeout=1500)
            c.connect(None, 30, stream=relay, start_loop=False)
            start = time.ticks_ms()
            c.publish("t", "x", qos=1)
            print(time.ticks_diff(time.ticks_ms(), start) < 1000, c.connected())
            c.disconnect()
            # The stream is the script's to close. On lwIP what a socket
            # holds back (Nagle: this one has no TCP_NODELAY) dies with the
            # process, DISCONNECT included, unless closing sends it.
            relay.sock.close()
            """,
            PORT=scripted.port,
            timeout=30,
        )
    finally:
        scripted.close()
    assert scripted.errors == [], output
    assert output.strip() == "True True", output
