# Runs on the emulated board (MicroPython's qemu port), after a line that
# sets BOARD: its end of the serial link. The board's one UART carries the
# REPL too, and sys.stdin is not binary-safe, so MQTT bytes go through the
# UART's registers directly, wrapped as a stream for
# mqtt.Client.connect(stream=...).
# The qemu port has no `time` module: ticks_ms() reads a hardware counter.
import io
from machine import mem8, mem32

_STREAM_POLL = 3
_POLLIN = 0x1
_POLLOUT = 0x4

if BOARD == "MICROBIT":
    # The nRF51's UART.
    _UART_RXDRDY = 0x40002108
    _UART_RXD = 0x40002518
    _UART_TXD = 0x4000251C

    def _rx_ready():
        return mem32[_UART_RXDRDY]

    def _rx_byte():
        mem32[_UART_RXDRDY] = 0
        return mem32[_UART_RXD]

    def _tx_byte(byte):
        mem32[_UART_TXD] = byte

    # TIMER0, counting microseconds, 32 bits wide, as the firmware's clock
    # (ports/qemu/clock) sets it; that clock captures into CC[0], this into CC[1].
    mem32[0x40008508] = 3  # BITMODE: 32 bits
    mem32[0x40008510] = 4  # PRESCALER: 16 MHz / 2**4
    mem32[0x40008000] = 1  # TASKS_START
    _COUNTS_PER_MS = 1000

    def _counter():
        mem32[0x40008044] = 1  # TASKS_CAPTURE[1]
        return mem32[0x40008544] & 0xFFFFFFFF  # CC[1]

elif BOARD == "VIRT_RV32":
    # The virt machine's 16550 UART.
    _UART_DATA = 0x10000000
    _UART_LSR = 0x10000005
    _LSR_DATA_READY = 0x01
    _LSR_TX_EMPTY = 0x20

    def _rx_ready():
        return mem8[_UART_LSR] & _LSR_DATA_READY

    def _rx_byte():
        return mem8[_UART_DATA]

    def _tx_byte(byte):
        while not mem8[_UART_LSR] & _LSR_TX_EMPTY:
            pass
        mem8[_UART_DATA] = byte

    # The low word of the CLINT's mtime, 10 MHz.
    _COUNTS_PER_MS = 10000

    def _counter():
        return mem32[0x0200BFF8] & 0xFFFFFFFF


_TICKS_PERIOD = 0x100000000 // _COUNTS_PER_MS


def ticks_ms():
    return _counter() // _COUNTS_PER_MS


def ticks_diff(later, earlier):
    # The counter wraps at 2**32 counts.
    return (later - earlier) % _TICKS_PERIOD


class UartStream(io.IOBase):
    def readinto(self, buf):
        count = 0
        size = len(buf)
        while count < size and _rx_ready():
            buf[count] = _rx_byte()
            count += 1
        return count or None

    def write(self, buf):
        for byte in buf:
            _tx_byte(byte)
        return len(buf)

    def ioctl(self, request, arg):
        if request != _STREAM_POLL:
            return 0
        ready = _POLLOUT
        if _rx_ready():
            ready |= _POLLIN
        return arg & ready

    def drain(self, quiet_ms=200):
        # Discards input until none came for quiet_ms, so that nothing the
        # broker sent reaches the REPL after the session.
        quiet_since = ticks_ms()
        while ticks_diff(ticks_ms(), quiet_since) < quiet_ms:
            if _rx_ready():
                _rx_byte()
                quiet_since = ticks_ms()
