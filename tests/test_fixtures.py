"""The tests' own helpers keep their promises: a broker is ready on every
listener it was given, and the ports handed out cannot be taken by an
outgoing connection in the meantime."""

import os
import socket
import threading
import time
from pathlib import Path

from broker import HOST, Broker, ephemeral_ports, free_port
from certificates import Certificates


def test_broker_is_ready_on_every_listener(tmp_path):
    """mosquitto opens its listeners one after the other and loads a TLS
    listener's certificates after opening it. Here the TLS listener's
    certificate comes through a pipe that is fed half a second late, so the
    listener after it opens only then.

    A fixture that waited for the first listener alone returned while the
    last one still refused connections: tests/test_tls.py's mutual-TLS test,
    whose listener is the last of four, failed with ECONNREFUSED that way.
    mosquitto opens the fourth listener about 2.6 ms after the first here,
    6 to 13 ms on a busy machine, and the firmware connects about 1.3 ms
    after it starts."""
    certificates = Certificates(tmp_path / "certificates")
    late_certificate = tmp_path / "late-server.pem"
    os.mkfifo(late_certificate)

    def feed():
        time.sleep(0.5)
        late_certificate.write_bytes(Path(certificates.path("server.pem")).read_bytes())

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    tls_port, last_port = free_port(), free_port()
    settings = (
        "allow_anonymous true\n"
        f"listener {tls_port} {HOST}\n"
        f"cafile {certificates.path('ca.pem')}\n"
        f"certfile {late_certificate}\n"
        f"keyfile {certificates.path('server.key')}\n"
        f"listener {last_port} {HOST}\n"
    )
    broker = Broker(tmp_path, settings=settings)
    try:
        assert broker.listeners == [broker.port, tls_port, last_port]
        for port in broker.listeners:
            socket.create_connection((HOST, port), timeout=2).close()
    finally:
        broker.stop()
        if feeder.is_alive():
            # mosquitto never read the pipe: read it here, so the feeder ends.
            reader = os.open(late_certificate, os.O_RDONLY | os.O_NONBLOCK)
            feeder.join(timeout=5)
            os.close(reader)


def test_free_ports_are_outside_the_ephemeral_range():
    """The kernel takes the local port of an outgoing connection from its
    ephemeral range: a port picked there could be taken between the moment
    a test picks it and the moment mosquitto binds it."""
    low, _ = ephemeral_ports()
    ports = {free_port() for _ in range(50)}
    assert all(1024 <= port < low for port in ports), sorted(ports)
