# A stream written in Python, as a modem or serial driver would be: it
# relays a socket and records what the client asked of it. Tests import it
# in the firmware (tests/conftest.py puts this folder beside each script).
import io, socket

class Relay(io.IOBase):
    def __init__(self, host, port):
        self.sock = socket.socket()
        self.sock.connect(socket.getaddrinfo(host, port)[0][-1])
        self.sock.setblocking(False)
        self.sent = 0
        self.closed = False

    def readinto(self, buf):
        try:
            return self.sock.readinto(buf)
        except OSError:
            return None  # nothing to read yet

    def write(self, buf):
        n = self.sock.write(buf)
        self.sent += n or 0
        return n

    def ioctl(self, request, arg):
        if request == 3:  # MP_STREAM_POLL
            import select
            p = select.poll()
            p.register(self.sock, select.POLLIN | select.POLLOUT)
            ready = 0
            for _, events in p.poll(0):
                ready |= events
            return ready & arg
        if request == 4:  # MP_STREAM_CLOSE
            self.closed = True
        return 0
