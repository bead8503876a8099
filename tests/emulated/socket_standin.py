# Runs on the emulated board after uart_stream.py, for clients that open
# their own socket (umqtt.simple): a stand-in `socket` module whose sockets
# are the UART stream `uart`, already "connected" through the host's bridge.
import sys


class UartSocket:
    def __init__(self, *args):
        self.blocking = True

    def settimeout(self, timeout):
        pass

    def setblocking(self, flag):
        self.blocking = flag

    def connect(self, address):
        pass

    def close(self):
        pass

    def write(self, buf, length=None):
        if isinstance(buf, str):
            buf = buf.encode()
        if length is not None:
            buf = memoryview(buf)[:length]
        return uart.write(buf)

    def read(self, size):
        data = bytearray(size)
        view = memoryview(data)
        got = 0
        while got < size:
            count = uart.readinto(view[got:])
            if count:
                got += count
            elif not self.blocking and got == 0:
                return None
        return bytes(data)


class SocketModule:
    socket = UartSocket

    @staticmethod
    def getaddrinfo(host, port, *args):
        return [(2, 1, 0, "", (host, port))]


sys.modules["socket"] = SocketModule
