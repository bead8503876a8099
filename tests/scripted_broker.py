"""A broker of the tests' own, on loopback, that plays a script per
connection: it reads the client's packets and answers as the test says,
so a test can see exactly what went over the wire."""

import socket
import threading

from broker import HOST


class Packet:
    def __init__(self, first, body):
        self.kind = first >> 4
        self.flags = first & 0x0F
        self.body = body

    @property
    def dup(self):
        return bool(self.flags & 0x08)

    @property
    def qos(self):
        return (self.flags >> 1) & 3

    def publish_fields(self):
        """(topic, packet id or None, payload) of a PUBLISH."""
        length = int.from_bytes(self.body[:2], "big")
        topic = self.body[2 : 2 + length].decode()
        rest = self.body[2 + length :]
        if self.qos:
            return topic, int.from_bytes(rest[:2], "big"), rest[2:]
        return topic, None, rest

    def packet_id(self):
        return int.from_bytes(self.body[:2], "big")


class Connection:
    def __init__(self, sock):
        self.sock = sock

    def _exactly(self, count):
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError("client closed the connection")
            data += chunk
        return data

    def read(self):
        first = self._exactly(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._exactly(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return Packet(first, self._exactly(length) if length else b"")

    def read_until(self, kind):
        """Reads packets (answering PINGREQ) until one of `kind` arrives."""
        while True:
            packet = self.read()
            if packet.kind == kind:
                return packet
            if packet.kind == 12:
                self.send(bytes([0xD0, 0]))

    def send(self, data):
        self.sock.sendall(data)

    def connack(self, session_present=False, code=0):
        self.send(bytes([0x20, 2, int(session_present), code]))

    def ack(self, kind, packet_id, flags=0):
        self.send(bytes([(kind << 4) | flags, 2]) + packet_id.to_bytes(2, "big"))


CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, DISCONNECT = 8, 14


class ScriptedBroker:
    """Runs `scripts[i](connection)` for the i-th connection, then closes it."""

    def __init__(self, scripts):
        self.scripts = list(scripts)
        self.errors = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.listener.settimeout(30)
        for script in self.scripts:
            try:
                sock, _ = self.listener.accept()
            except OSError as error:
                self.errors.append(error)
                return
            with sock:
                sock.settimeout(30)
                try:
                    script(Connection(sock))
                except Exception as error:  # reported by the test through .errors
                    self.errors.append(error)

    def close(self):
        self.listener.close()
        self.thread.join(timeout=30)
