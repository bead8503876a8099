"""A TCP proxy of the tests' own, between the firmware and the broker, that
can be told to swallow all traffic without closing (a dead link as a
client on Wi-Fi sees it), to cut every connection, to close every new one
at once (a broker's host that is up, its broker down), or to forward again."""

import socket
import threading

from broker import HOST


class Proxy:
    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.swallowing = threading.Event()
        self.refusing = threading.Event()
        self.lock = threading.Lock()
        self.connections = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection((HOST, self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source, destination):
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                for end in (source, destination):
                    try:
                        end.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            if self.swallowing.is_set():
                continue
            try:
                destination.sendall(data)
            except OSError:
                return

    def swallow(self):
        """From now on, read everything and deliver nothing; close nothing."""
        self.swallowing.set()

    def forward(self):
        self.swallowing.clear()
        self.refusing.clear()

    def refuse(self):
        """Cut every connection, and close each new one as soon as it is made."""
        self.refusing.set()
        self.cut()

    def cut(self):
        """Close every connection made so far (new ones are still accepted)."""
        with self.lock:
            connections, self.connections = self.connections, []
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def close(self):
        self.listener.close()
        self.cut()
