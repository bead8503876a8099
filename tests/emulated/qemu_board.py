"""An emulated board: MicroPython's qemu port (ports/qemu/build.sh) under
qemu, its one UART on a loopback TCP socket.

The host drives the board's raw REPL over that socket. A script that wants
to talk MQTT prints BRIDGE_MARKER on a line of its own and from then on
drives the UART itself (binary-safe, see uart_stream.py): the host then
forwards bytes between the UART and a broker, until the board sends
DISCONNECT, and reads what the script prints after that as REPL output
again. While bridged, the script must print nothing."""

import selectors
import shlex
import socket
import subprocess
import time
from pathlib import Path

BRIDGE_MARKER = b"<<mqtt-bridge>>\r\n"

RAW_REPL_BANNER = b"raw REPL; CTRL-B to exit\r\n>"
CTRL_A = b"\x01"
CTRL_D = b"\x04"
DISCONNECT = 0xE0


class BoardError(Exception):
    pass


class DisconnectFinder:
    """Follows the MQTT packets a client sends, split anyhow into chunks,
    to find where its DISCONNECT ends."""

    def __init__(self):
        self.header = None  # the packet's first byte, once read
        self.length = 0  # its remaining length, as far as read
        self.shift = 0
        self.body_left = 0  # bytes of its body still to come

    def feed(self, data):
        """Returns the offset in `data` just after a DISCONNECT, or None."""
        for offset, byte in enumerate(data):
            if self.body_left:
                self.body_left -= 1
                if self.body_left == 0:
                    self.header = None
                continue
            if self.header is None:
                self.header = byte
                self.length = self.shift = 0
                continue
            # A remaining-length byte.
            self.length |= (byte & 0x7F) << self.shift
            self.shift += 7
            if byte & 0x80:
                continue
            if self.length:
                self.body_left = self.length
                continue
            finished, self.header = self.header, None
            if finished == DISCONNECT:
                return offset + 1
        return None


# The boards of ports/qemu/build.sh, by qemu machine.
BOARDS = {"microbit": "MICROBIT", "virt": "VIRT_RV32"}


def qemu_command(firmware):
    """How the port starts qemu for the board `firmware` was built for."""
    return shlex.split((Path(firmware).parent / "qemu-command").read_text())


def board_name(command):
    return BOARDS.get(command[command.index("-machine") + 1])


class EmulatedBoard:
    """One qemu process running `firmware` (an .elf whose folder holds the
    qemu-command that ports/qemu/build.sh wrote), stopped by close().
    `name` is the board (MICROBIT or VIRT_RV32)."""

    def __init__(self, firmware, log_path, boot_timeout=20.0):
        command = qemu_command(firmware)
        self.name = board_name(command)
        # The board connects to the host: listening first leaves no race.
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(boot_timeout)
        port = self.listener.getsockname()[1]
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            command + ["-serial", f"tcp:127.0.0.1:{port}", "-kernel", str(firmware)],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.serial = None
        self.pending = b""  # bytes read from the board and not consumed yet
        self.bridged = b""  # the last bytes the board sent to a broker
        try:
            self.serial, _ = self.listener.accept()
            self.serial.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.read_until(b">>> ", boot_timeout)
            self.serial.sendall(CTRL_A)
            self.read_until(RAW_REPL_BANNER, boot_timeout)
        except BaseException:
            self.close()
            raise

    def close(self):
        for sock in (self.serial, self.listener):
            if sock is not None:
                sock.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def timed_out(self):
        return BoardError(
            f"board timed out; it last said {self.pending[-300:]!r}, "
            f"and last sent to the broker {self.bridged[-300:]!r}"
        )

    def receive(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise self.timed_out()
        self.serial.settimeout(left)
        try:
            data = self.serial.recv(4096)
        except socket.timeout:
            raise self.timed_out() from None
        if not data:
            raise BoardError(f"board closed its serial line (qemu exit code {self.process.poll()})")
        return data

    def read_until(self, marker, timeout):
        """Consumes and returns the board's output up to and including `marker`."""
        deadline = time.monotonic() + timeout
        while marker not in self.pending:
            self.pending += self.receive(deadline)
        end = self.pending.index(marker) + len(marker)
        text, self.pending = self.pending[:end], self.pending[end:]
        return text

    def run(self, code, broker_port=None, timeout=60.0):
        """Runs `code` through the raw REPL and returns what it printed
        (as str). With `broker_port`, bridges the script's MQTT session to
        the broker on 127.0.0.1:broker_port. Raises BoardError with the
        traceback when the script fails."""
        deadline = time.monotonic() + timeout
        self.bridged = b""
        self.serial.sendall(code.encode() + CTRL_D)
        self.read_until(b"OK", timeout)
        output = b""
        while True:
            while CTRL_D not in self.pending and BRIDGE_MARKER not in self.pending:
                self.pending += self.receive(deadline)
            marker_at = self.pending.find(BRIDGE_MARKER)
            end_at = self.pending.find(CTRL_D)
            if marker_at >= 0 and (end_at < 0 or marker_at < end_at):
                output += self.read_until(BRIDGE_MARKER, 0)[: -len(BRIDGE_MARKER)]
                if broker_port is None:
                    raise BoardError("the script asked for a broker, but the test gave none")
                self.bridge(broker_port, deadline)
                continue
            output += self.read_until(CTRL_D, 0)[:-1]
            break
        errors = self.read_until(CTRL_D, max(deadline - time.monotonic(), 1.0))[:-1]
        self.read_until(b">", max(deadline - time.monotonic(), 1.0))
        text = output.decode(errors="replace")
        if errors:
            raise BoardError(f"script failed:\n{errors.decode(errors='replace')}\noutput:\n{text}")
        return text

    def bridge(self, broker_port, deadline):
        """Forwards bytes between the board and the broker until the board
        has sent DISCONNECT. Raises BoardError when the broker closes the
        connection first, with what the board sent last (a traceback that
        went down the bridge, perhaps)."""
        broker = socket.create_connection(("127.0.0.1", broker_port), timeout=5)
        broker.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        broker.setblocking(False)
        finder = DisconnectFinder()
        selector = selectors.DefaultSelector()
        selector.register(self.serial, selectors.EVENT_READ)
        selector.register(broker, selectors.EVENT_READ)
        try:
            from_board, self.pending = self.pending, b""
            while True:
                if from_board:
                    end = finder.feed(from_board)
                    self.bridged = (self.bridged + from_board)[-4096:]
                    broker.setblocking(True)
                    broker.sendall(from_board if end is None else from_board[:end])
                    broker.setblocking(False)
                    if end is not None:
                        self.pending = from_board[end:]
                        return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BoardError("MQTT session on the board timed out")
                from_board = b""
                for key, _ in selector.select(min(left, 1.0)):
                    if key.fileobj is broker:
                        try:
                            data = broker.recv(4096)
                        except ConnectionResetError:
                            data = b""
                        if not data:
                            raise BoardError(
                                "the broker closed the connection; the board last sent "
                                f"{self.bridged[-600:]!r}"
                            )
                        self.serial.sendall(data)
                    else:
                        from_board = self.serial.recv(4096)
                        if not from_board:
                            raise BoardError("board closed its serial line while bridged")
        finally:
            selector.close()
            broker.close()
