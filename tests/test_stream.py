"""connect(stream=...): the client talks MQTT over a stream the application
connected itself (a modem, a serial bridge, a custom transport) instead of
opening a socket."""

from conftest import expect_line
from peer import Peer

# Helpers the scripts import (tests/micropython/): Relay, a stream written
# in Python that relays a socket; round_trips(client), QoS 0-2 both ways.
HELPERS = """
from relay import Relay
from round_trips import round_trips
"""


def test_a_stream_class_in_python_carries_the_session(broker, micropython):
    """QoS 0, 1 and 2 both ways over a Python stream class; an independent
    subscriber sees what went through it; the stream is never closed."""
    peer = Peer(broker.port)
    peer.subscribe("stream/#", qos=2)
    output = micropython.run(
        HELPERS
        + """
relay = Relay(HOST, PORT)
c = mqtt.Client("streamed", cycle_timeout=20)
c.connect(None, 30, stream=relay, start_loop=False)
print("connected", c.connected())
round_trips(c)
c.disconnect()
print("sent", relay.sent > 0, "closed", relay.closed)
""",
        PORT=broker.port,
    )
    assert "connected True" in output
    assert "got [('stream/0', b'qos 0'), ('stream/1', b'qos 1'), ('stream/2', b'qos 2')]" in output
    assert "sent True closed False" in output
    messages = peer.wait_for(3)
    assert sorted((m.topic, m.payload, m.qos) for m in messages) == [
        ("stream/0", b"qos 0", 0),
        ("stream/1", b"qos 1", 1),
        ("stream/2", b"qos 2", 2),
    ]
    peer.close()


def test_a_socket_connected_by_the_application_with_the_background_loop(broker, micropython):
    """A plain socket given as the stream, with the loop running; the
    client leaves the socket open after disconnect()."""
    peer = Peer(broker.port)
    peer.subscribe("given/out", qos=1)
    process = micropython.start(
        """
import socket
sock = socket.socket()
sock.connect(socket.getaddrinfo(HOST, PORT)[0][-1])
got = []
c = mqtt.Client("given-socket")
c.connect("broker.example", 30, stream=sock)
c.subscribe("given/in", lambda client, payload, topic: got.append(payload), qos=1)
c.publish("given/out", b"from the application's socket", qos=1)
print("ready")
print("received", wait_until(lambda: got), got)
c.disconnect()
# Open, the socket reads the end of the broker's side; closed, it would
# raise OSError(EBADF).
sock.settimeout(5)
print("still open", sock.read(1) == b"")
sock.close()
""",
        PORT=broker.port,
    )
    expect_line(process, "ready")
    peer.publish("given/in", b"to the application's socket", qos=1)
    output, _ = process.communicate(timeout=30)
    assert "received True [b\"to the application's socket\"]" in output
    assert "still open True" in output
    assert [m.payload for m in peer.wait_for(1)] == [b"from the application's socket"]
    peer.close()


def test_tls_over_a_given_stream(tls_broker, certificates, micropython):
    """ssl_ctx wraps the given stream: TLS over a transport written in Python."""
    output = micropython.run(
        HELPERS
        + """
from tls_context import context
relay = Relay(HOST, PORT)
c = mqtt.Client("tls-streamed", cycle_timeout=20)
c.connect(HOST, 30, ssl_ctx=context(CA), stream=relay, start_loop=False)
round_trips(c)
c.disconnect()
""",
        PORT=tls_broker.tls_ports["tls"],
        CA=certificates.path("ca.crt.der"),
    )
    assert "got [('stream/0', b'qos 0'), ('stream/1', b'qos 1'), ('stream/2', b'qos 2')]" in output


def test_a_stream_argument_that_is_not_a_stream_is_refused(broker, micropython):
    output = micropython.run(
        """
c = mqtt.Client("not-a-stream")
for bad in (42, "text", object()):
    try:
        c.connect(HOST, 30, stream=bad)
    except TypeError:
        print("TypeError")
try:
    c.connect(None, 30, port=PORT)
except TypeError:
    print("host needed without a stream")
c.connect(HOST, 30, port=PORT)
print("usable", c.connected())
c.disconnect()
""",
        PORT=broker.port,
    )
    assert output.count("TypeError") == 3
    assert "host needed without a stream" in output
    assert "usable True" in output


def test_a_stream_that_raises_leaves_the_client_usable(broker, micropython):
    """A stream written in Python may raise from any method, also while
    the engine is working: the client reports it as a failure of the link
    (never as a crash), and a new connection works."""
    output = micropython.run(
        HELPERS
        + """
class Flaky(Relay):
    # Raises from the nth call of `method` (counting from when armed).
    def arm(self, method, nth):
        self.method, self.left = method, nth

    def fails(self, method):
        if getattr(self, "method", None) == method:
            self.left -= 1
            if self.left == 0:
                raise OSError(5)

    def ioctl(self, request, arg):
        if request == 3:
            self.fails("ioctl")
        return super().ioctl(request, arg)

    def readinto(self, buf):
        self.fails("readinto")
        return super().readinto(buf)

    def write(self, buf):
        self.fails("write")
        return super().write(buf)

got = []
for loop in (False, True):
    for method in ("ioctl", "readinto", "write"):
        for nth in (1, 2, 3):
            link = Flaky(HOST, PORT)
            c = mqtt.Client("flaky", cycle_timeout=20, command_timeout=2000)
            c.connect(None, 30, stream=link, start_loop=loop)
            c.subscribe("flaky/t", lambda client, payload, topic: got.append(payload), qos=1)
            link.arm(method, nth)
            outcome = "ok"
            try:
                for i in range(5):
                    c.publish("flaky/t", b"m", qos=1)
                    if not loop:
                        c.cycle()
            except (OSError, mqtt.MQTTException) as e:
                outcome = type(e).__name__
            # Whatever happened, the client is usable on a new stream. It
            # leaves a given stream open: the script closes each one (lwIP
            # has few sockets, and no finaliser closes them).
            c.disconnect(1000)
            link.sock.close()
            again = Relay(HOST, PORT)
            c.connect(None, 30, stream=again, start_loop=loop)
            c.publish("flaky/t", b"again", qos=1)
            print(loop, method, nth, outcome, c.connected())
            c.disconnect(1000)
            again.sock.close()
print("done")
""",
        PORT=broker.port,
    )
    lines = output.strip().splitlines()
    assert lines[-1] == "done", output
    assert len(lines) == 19, output
    for line in lines[:-1]:
        loop, method, nth, outcome, connected = line.split()
        assert connected == "True", line
        # Without the loop, a raising read or write fails the call that met
        # it; a raising poll is followed by a read that shows whether the
        # stream really is in trouble. With the loop, the loop meets them.
        if method != "ioctl" and loop == "False":
            assert outcome in ("OSError", "MQTTException"), line
